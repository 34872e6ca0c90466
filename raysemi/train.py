"""`python -m raysemi.train`: train one strategy with one config, log to MLflow, report test metrics.

    python -m raysemi.train --method mean_teacher --data data/ACDC --labeled-patients 7
    python -m raysemi.train --config runs/x/config.yaml --max-iterations 1000
    python -m raysemi.train --list-methods
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raysemi import checkpoint
from raysemi.config import TrainConfig, add_config_arguments, resolve, save_yaml
from raysemi.errors import ArgumentParser, UserError, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.train", description=(
        "Train one semi-supervised strategy on a dataset in the SSL4MIS ACDC layout (or the built-in "
        "phantom), validating every --eval-interval iterations, keeping the best checkpoint, logging to "
        "MLflow, and ending with per-class Dice/HD95/ASD/Jaccard tables on the validation and test splits. "
        "Values come from the defaults, then --config, then the flags below."))
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields (flags override it)")
    p.add_argument("--list-methods", action="store_true", help="list the strategies and their hyperparameters, then exit")
    p.add_argument("--resume", metavar="LAST.pt", help="continue from a full checkpoint (a run folder's last.pt)")
    p.add_argument("--overwrite", action="store_true", help="allow an --output folder that already holds a run")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    add_config_arguments(p)
    return p


def describe_methods() -> str:
    from raysemi.methods import get_method, list_methods

    defaults = TrainConfig()
    lines = []
    for name in list_methods():
        cls = get_method(name)
        alias = f" (alias: {', '.join(cls.aliases)})" if cls.aliases else ""
        lines.append(f"{name}{alias}: {cls.summary}")
        params = ", ".join(f"{h}={getattr(defaults, h)!r}" for h in cls.hyperparameters)
        lines.append(f"    model: {' | '.join(cls.models)}; hyperparameters: {params}")
    return "\n".join(lines)


def default_output(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise UserError(f"{out}: output folder exists and is not empty; choose another --output, or pass "
                        "--overwrite (files there are replaced, none deleted) or --resume")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print(describe_methods())
        return 0
    config = resolve(args, args.config)
    from raysemi.tracking import (MLflowCallback, MLflowRun, PicturesCallback, check_tracking_uri,
                                  resolve_tracking_uri)

    uri = resolve_tracking_uri(config.tracking_uri)
    if not args.no_mlflow:
        check_tracking_uri(uri)
    # heavy imports after the cheap checks, so bad input answers at once
    from raysemi.console import ConsoleCallback, progress
    from raysemi.data import load_dataset, load_volumes, read_list
    from raysemi.loop import Trainer, TrainingDiverged

    out = Path(config.output) if config.output else default_output(config)
    check_output(out, args.overwrite, bool(args.resume))
    data = load_dataset(config.data, config.labeled_patients, config.num_classes)
    # the trainer checks device, model and strategy options before anything is written
    trainer = Trainer(config, data)
    if args.resume:
        trainer.load(args.resume)
    out.mkdir(parents=True, exist_ok=True)
    config.output = str(out)
    trainer.output_dir = out
    save_yaml(config, out / "config.yaml")
    console = ConsoleCallback(out / "train.log", progress=True)
    trainer.callbacks.append(console)
    run = None
    if not args.no_mlflow:
        run = MLflowRun(uri, config.experiment, config.run_name or out.name, tags={"run_dir": str(out.resolve())})
        trainer.callbacks.append(MLflowCallback(run, out))
    trainer.callbacks.append(PicturesCallback(out, run))  # overlays/ and plots/ in the run folder (and MLflow)
    console.write(f"run folder: {out}" + (f"; MLflow run {run.run_id} in {uri}" if run else ""))
    try:
        result = trainer.fit()
    except TrainingDiverged as err:
        console.write(f"error: training diverged: {err}")
        if run:
            run.set_tags({"status": "failed", "failure_reason": str(err)})
            run.end("FAILED")
        return 1
    except BaseException:
        if run:
            run.end("KILLED")
        raise
    finally:
        console.close_progress()

    # final report: the best checkpoint on the validation split, and on the test split if listed
    best = checkpoint.load(out / "best.pt", trainer.device)
    net = trainer.eval_network()
    checkpoint.load_network(net, best["networks"][config.eval_model], out / "best.pt", config.eval_model)
    results = {"best_iteration": result.best_iteration, "val": {}, "test": {}}
    for split in ("val", "test"):
        try:
            read_list(data.root, split)
        except UserError:
            continue
        volumes = data.val if split == "val" else load_volumes(data.root, split, config.num_classes)
        summary = trainer.evaluate(progress(volumes, f"{split} volumes", unit="vol", stream=console.stream),
                                   distances=True)
        means = summary.means()
        results[split] = means
        console.write(f"\n{split} split, best checkpoint (iteration {result.best_iteration}, {config.eval_model}):\n"
                      + summary.format())
        if run:
            run.log_metrics({f"{split}_best/{k}": v for k, v in means.items()}, result.iterations)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if run:
        for name in ("results.json", "train.log", "best.pt"):
            run.log_artifact(out / name)
        run.end("FINISHED")
    return 0


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())

"""`python -m raysemi.train`: train one strategy with one config, log to MLflow, report test metrics.

    python -m raysemi.train --method mean_teacher --data data/ACDC --labeled-patients 7
    python -m raysemi.train --config runs/x/config.yaml --max-iterations 1000
    python -m raysemi.train --config runs/<search>/best_config.yaml --max-iterations 30000 --seeds 3
    python -m raysemi.train --from-run <mlflow run id> --max-iterations 30000 --seeds 3
    python -m raysemi.train --list-methods

One seed trains into the --output folder; `--seeds K` trains K seeds one after the other into
`<output>/seed<k>/` and aggregates them (raysemi.retrain: the seeds loop, the mean and stds over
volumes and seeds, the comparison with the supervised baseline, reading a config from MLflow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from raysemi import checkpoint
from raysemi.config import TrainConfig, add_config_arguments, resolve, save_yaml
from raysemi.errors import ArgumentParser, UserError, run_cli
from raysemi.files import write_text_atomic


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.train", description=(
        "Train one semi-supervised strategy on a dataset in the SSL4MIS ACDC layout (or the built-in "
        "phantom), validating every --eval-interval iterations, keeping the best checkpoint, logging to "
        "MLflow, and ending with per-class Dice/HD95/ASD/Jaccard tables on the validation and test splits. "
        "Values come from the defaults, then --config, then the flags below."))
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields (flags override it)")
    p.add_argument("--from-run", metavar="RUN_ID", help=(
        "take the config from an MLflow run instead of --config (its config.yaml artifact, a search's "
        "best_config.yaml, else its params), read from --tracking-uri; flags override it; the old run's output, "
        "run name, device and tracking URI are not taken"))
    p.add_argument("--seeds", type=int, default=None, metavar="K", help=(
        "train K seeds (seed, seed+1, ...) one after the other into <output>/seed<k>/ and report the mean and "
        "std over volumes and over seeds (default: 1, a single run in <output>)"))
    p.add_argument("--list-methods", action="store_true", help="list the strategies and their hyperparameters, then exit")
    p.add_argument("--resume", metavar="LAST.pt|DIR", help=(
        "continue from a full checkpoint (a run folder's last.pt, or the folder itself), with the config it was trained with and in its "
        "folder unless --config, --from-run or flags say otherwise; with several seeds, the retrain folder: finished "
        "seeds are kept, interrupted ones resumed from their last.pt, the rest trained (its config.yaml and seed "
        "count are used unless given). A run resumed in its own folder goes on in its MLflow run, in the store it "
        "was logged to unless --tracking-uri is given"))
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


def check_output(out: Path, overwrite: bool, resume: str | None, in_place: bool) -> None:
    """Refuse an --output that holds another run, unless --overwrite, or a --resume that goes on
    in that folder (its own last.pt, or the retrain folder)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --output: is a file; expected a folder (new, empty, or a run to --resume)")
    if not out.exists() or not any(out.iterdir()) or overwrite or in_place:
        return
    if resume:
        raise UserError(f"{out}: output folder exists and is not empty, and --resume {resume} is another folder's "
                        "checkpoint; expected a new or empty --output for the continued run (or --overwrite), "
                        f"or no --output to go on in {Path(resume).parent}")
    raise UserError(f"{out}: output folder exists and is not empty; choose another --output, or pass "
                    "--overwrite (the run's files there are replaced, others kept) or --resume")


def start_run_folder(out: Path, resume: str | None, trainer) -> None:
    """Make `out` hold this run only, unless it goes on in its own folder: an earlier run's
    checkpoints, results and retrain state there (--overwrite) must not be resumed, kept as a
    finished seed or reported as this run's. A run resumed from another folder brings that
    folder's best.pt, whose score the trainer carries on (without one, or with another run's
    there, the best is counted afresh, so there must be iterations left to find it)."""
    import shutil

    from raysemi.retrain import RUN_FILES, STATE_FILE, resumes_in_place

    if resumes_in_place(resume, out):
        out.mkdir(parents=True, exist_ok=True)
        return
    found = Path(resume).resolve().parent / "best.pt" if resume else None
    found = found if found is not None and found.is_file() else None
    other = best_of_another_run(found, trainer) if found is not None else None
    best = None if other else found
    beside = f"the best.pt beside it is not its run's ({other})" if other else "no best.pt beside it"
    if resume and best is None and trainer.iteration >= trainer.config.max_iterations:
        raise UserError(f"--resume: {resume}: {beside} and no iteration left to train "
                        f"({trainer.iteration} of --max-iterations {trainer.config.max_iterations}); expected its "
                        "run folder's best.pt beside it, or a larger --max-iterations")
    if other:
        print(f"note: --resume: {resume}: {beside}; left out, the best checkpoint is counted afresh")
    out.mkdir(parents=True, exist_ok=True)
    for name in (*RUN_FILES, STATE_FILE):
        (out / name).unlink(missing_ok=True)
    if best is not None:
        shutil.copy2(best, out / "best.pt")
    elif resume:
        trainer.forget_best()


def best_of_another_run(best: Path, trainer) -> str | None:
    """Why `best` is not the best checkpoint of the run the trainer resumed, or None if it is: a
    run's best.pt was written at the iteration, with the Dice, that its last.pt keeps as its best
    (a last.pt copied beside another run's best.pt would otherwise report that run's model)."""
    try:
        ckpt = checkpoint.load(best)
    except UserError:
        return "not a raysemi checkpoint that loads"
    saved = (int(ckpt.get("iteration", -1)), float(ckpt.get("best", {}).get("dice", float("nan"))))
    if saved == (int(trainer.best["iteration"]), float(trainer.best["dice"])):
        return None
    ours = (f"its run's best was at iteration {trainer.best['iteration']}" if trainer.best["iteration"] >= 0
            else "its run had no best yet")
    return f"written at iteration {saved[0]} with Dice {saved[1]:.4f}; {ours}"


def resolve_config(args) -> tuple[TrainConfig, int, Path | None]:
    """(config, number of seeds, retrain folder to resume or None) from --config / --from-run /
    --resume DIR and the flags; every check that needs no data or training."""
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds: {args.seeds} is invalid; expected an integer >= 1 (the number of seeds to train)")
    if args.from_run and args.config:
        raise UserError("--from-run and --config: both give the config to train; expected one of them "
                        "(flags override either)")
    seeds, resume_dir, config_file, base = args.seeds, None, args.config, None
    if args.resume and Path(args.resume).is_dir():
        from raysemi.retrain import STATE_FILE

        run_dir = Path(args.resume)
        if not (run_dir / STATE_FILE).is_file() and (run_dir / "last.pt").is_file():
            args.resume = str(run_dir / "last.pt")  # a single run's folder: go on from its last.pt
    if args.resume and Path(args.resume).is_dir():
        from raysemi.retrain import read_state

        resume_dir = Path(args.resume)
        if seeds == 1:
            raise UserError(f"--resume: {resume_dir} is a folder; with --seeds 1 expected a run's last.pt")
        seeds = seeds or int(read_state(resume_dir)["seeds"])
        if getattr(args, "output", None) and Path(args.output).resolve() != resume_dir.resolve():
            raise UserError(f"--output: {args.output} differs from the retrain folder given to --resume "
                            f"({resume_dir}); expected the same folder, or no --output")
        if not (args.config or args.from_run):
            from raysemi.config import read_yaml

            # as for a single run: the machine's choices are made again (a retrain started on a GPU
            # goes on on a CPU); seed folders may differ in them (retrain._PER_SEED)
            path = resume_dir / "config.yaml"
            saved = read_yaml(path)
            if not isinstance(saved, dict):
                raise UserError(f"{path}: not a raysemi config (a YAML mapping of config fields expected)")
            base = ({**saved, "device": "auto", "compile": "auto"}, str(path))
    seeds = seeds or 1
    if seeds > 1 and args.resume and resume_dir is None:
        raise UserError(f"--resume: {args.resume}: with --seeds {seeds}, expected the retrain folder (the --output "
                        "folder holding seed0/, seed1/, ...), not a checkpoint")
    if args.resume and resume_dir is None and not (args.config or args.from_run):
        from raysemi import checkpoint
        from raysemi.retrain import NOT_FROM_RUN

        # a single run goes on with the config it was trained with, in the checkpoint's folder (and
        # so in its MLflow run); flags still override it, e.g. a longer --max-iterations
        from raysemi.config import ALIASES, FIELDS

        saved = checkpoint.load(args.resume)["config"]
        gone = sorted(k for k in saved if k not in FIELDS and k not in ALIASES)  # fields of an older version
        if gone:
            print(f"note: {args.resume}: config fields this version no longer has, left out: {', '.join(gone)}")
        values = {**{k: v for k, v in saved.items() if k not in gone}, **NOT_FROM_RUN,
                  "output": str(Path(args.resume).parent)}
        base = (values, f"{args.resume}: config")
    if args.from_run:
        from raysemi.retrain import config_from_run
        from raysemi.tracking import resolve_tracking_uri

        base = config_from_run(args.from_run, resolve_tracking_uri(getattr(args, "tracking_uri", "")))
    config = resolve(args, config_file, base=base)
    if resume_dir is not None:
        config.output = str(resume_dir)
    return config, seeds, resume_dir


def eval_splits(data, num_classes: int) -> dict[str, list]:
    """The volumes each run's best checkpoint is evaluated on: val, and test when listed."""
    from raysemi.data import load_volumes, read_list

    splits = {}
    for split in ("val", "test"):
        try:
            read_list(data.root, split)
        except UserError:
            continue
        splits[split] = data.val if split == "val" else load_volumes(data.root, split, num_classes)
    return splits


def attach_callbacks(trainer, out: Path, run):
    """The callbacks of every training run, in one place: console and train.log, then MLflow."""
    from raysemi.console import ConsoleCallback
    from raysemi.tracking import MLflowCallback, PicturesCallback

    console = ConsoleCallback(out / "train.log", progress=True)
    trainer.callbacks.append(console)
    if run is not None:
        trainer.callbacks.append(MLflowCallback(run, out))
    trainer.callbacks.append(PicturesCallback(out, run))  # overlays/ and plots/ in the run folder (and MLflow)
    return console


def train_one(config: TrainConfig, data, splits: dict[str, list], out: Path, *, resume: str | None = None,
              open_run=None, end_run: bool = True):
    """Train one config (one seed) into `out`: config.yaml, last.pt, best.pt, train.log, then the
    best checkpoint's tables on `splits` and results.json. `open_run()` gives the MLflow run (or
    None) once the trainer has accepted the config; it is ended here unless `end_run` is False
    and training succeeded. A diverged loss is a result with `failure` set, not an exception."""
    from raysemi.loop import Trainer, TrainingDiverged
    from raysemi.retrain import SeedResult, as_first_saved, resumes_in_place

    # the trainer checks device, model and strategy options before anything is written
    trainer = Trainer(config, data)
    if resume:
        trainer.load(resume)
        if trainer.iteration > config.max_iterations:  # before config.yaml is rewritten with the smaller value
            raise UserError(f"--max-iterations: {config.max_iterations} is below the {trainer.iteration} iterations "
                            f"{resume} has trained; expected at least {trainer.iteration}")
    in_place = resumes_in_place(resume, out)
    start_run_folder(out, resume, trainer)  # makes `out`
    config.output = str(out)
    trainer.output_dir = out
    save_yaml(as_first_saved(config, out / "config.yaml") if in_place else config, out / "config.yaml")
    run = open_run() if open_run else None
    console = attach_callbacks(trainer, out, run)
    console.write(f"run folder: {out}" + (f"; MLflow run {run.run_id} in {run.uri}" if run else "")
                  + (" (continued)" if run and run.reopened else ""))
    outcome = SeedResult(0, config.seed, out, run_id=run.run_id if run else None, run=run)
    try:
        result = trainer.fit()
    except TrainingDiverged as err:
        console.write(f"error: training diverged: {err}")
        if run:
            run.set_tags({"status": "failed", "failure_reason": str(err)})
            run.end("FAILED")
        outcome.failure = f"training diverged: {err}"
        return outcome
    except BaseException:
        if run:
            run.end("KILLED")
        raise
    finally:
        console.close_progress()

    try:  # the final report is part of the run: an interruption here ends it KILLED too
        _final_report(config, trainer, result, splits, out, console, run, outcome, end_run)
    except BaseException:
        if run:
            run.end("KILLED")
        raise
    return outcome


def _final_report(config: TrainConfig, trainer, result, splits: dict[str, list], out: Path, console, run,
                  outcome, end_run: bool) -> None:
    """The best checkpoint on the validation split and on the test split if listed; results.json
    (the seed's "finished" mark for a multi-seed --resume) is written last, whole."""
    from raysemi.progress import ProgressBar

    best = checkpoint.load(out / "best.pt", trainer.device)
    net = trainer.eval_network()
    checkpoint.load_network(net, best["networks"][config.eval_model], out / "best.pt", config.eval_model)
    outcome.best_iteration, outcome.iterations = result.best_iteration, result.iterations
    for split, volumes in splits.items():
        with ProgressBar(len(volumes), f"{split} volumes", unit="vol", stream=console.stream) as bar:
            summary = trainer.evaluate(volumes, distances=True, bar=bar)
        outcome.summaries[split] = summary
        console.write(f"\n{split} split, best checkpoint (iteration {result.best_iteration}, {config.eval_model}):\n"
                      + summary.format())
        if run:
            run.log_metrics({f"{split}_best/{k}": v for k, v in summary.means().items()}, result.iterations)
    if run:
        for name in ("train.log", "best.pt"):
            run.log_artifact(out / name)
    write_text_atomic(out / "results.json", json.dumps(outcome.to_json(), indent=1))
    if run:
        run.log_artifact(out / "results.json")
        if end_run:
            run.end("FINISHED")


def budget_note(config: TrainConfig, methods: list[str] | None = None,
                spaces: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The notes on schedules for a run of `config`, or for a search of `methods` over `spaces`,
    or None: the short-budget note (`schedules.short_budget_note`), taking the values each space
    can draw that ramp up soonest, so it is said only when no trial escapes it; under `--schedules
    budget`, the note on values it would scale a second time (`schedules.scaled_again_note`),
    taking the longest ramp a space can draw and leaving out a warm-up it draws."""
    from raysemi.methods import get_method
    from raysemi.schedules import ramp_reached, scaled_again_note, schedule_lengths, short_budget_note

    reached, warmups, longest, fixed_warmup, drawn = {}, {}, [], False, False
    for name in methods or [config.method]:
        cls, space = get_method(name), (spaces or {}).get(name, {})
        if not cls.uses_unlabeled:
            continue

        def soonest(field: str) -> Any:
            return space[field].lowest() if field in space else getattr(config, field)

        interval, warmup = schedule_lengths(soonest("rampup_interval"), int(soonest("mt_warmup")),
                                            config.max_iterations, config.schedules)
        reached[cls.name] = ramp_reached(config.max_iterations, soonest("consistency_rampup"), interval)
        if "consistency_rampup" in space and reached[cls.name] < 0.5:  # a weak ramp no flag's units would set
            drawn = True
        if "rampup_interval" not in space:  # the longest ramp a trial can draw, in units x interval
            units = space["consistency_rampup"].highest() if "consistency_rampup" in space else config.consistency_rampup
            longest.append(units * config.rampup_interval)
        if "mt_warmup" in cls.hyperparameters:
            warmups[cls.name] = warmup
            fixed_warmup = fixed_warmup or "mt_warmup" not in space
    notes = [short_budget_note(config.max_iterations, reached, warmups, config.consistency_rampup, config.schedules,
                               drawn)]
    if config.schedules == "budget":
        notes.append(scaled_again_note(config.max_iterations, config.rampup_interval if longest else None,
                                       config.mt_warmup if fixed_warmup else None, max(longest, default=0.0)))
    return "\n".join(n for n in notes if n) or None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print(describe_methods())
        return 0
    config, seeds, resume_dir = resolve_config(args)
    from raysemi.tracking import check_tracking_uri, read_run_record, resolve_tracking_uri

    out = Path(config.output) if config.output else default_output(config)
    uri = resolve_tracking_uri(config.tracking_uri)
    if args.resume and getattr(args, "tracking_uri", None) is None:  # the store the run was logged to
        from raysemi.retrain import read_state, resumes_in_place

        if resume_dir is not None:
            uri = read_state(resume_dir).get("tracking_uri") or uri
        elif resumes_in_place(args.resume, out):
            uri = read_run_record(out).get("tracking_uri") or uri
    if not args.no_mlflow:
        check_tracking_uri(uri)
    # heavy imports after the cheap checks, so bad input answers at once
    from raysemi.data import load_dataset
    from raysemi.retrain import resumes_in_place, retrain

    check_output(out, args.overwrite, args.resume, resume_dir is not None or resumes_in_place(args.resume, out))
    data = load_dataset(config.data, config.labeled_patients, config.num_classes)
    note = budget_note(config)  # after the checks and the data: bad input is the only line
    if note:
        print(note, flush=True)
    splits = eval_splits(data, config.num_classes)
    return retrain(config, data, splits, out, seeds, train_one, uri=None if args.no_mlflow else uri,
                   resume=args.resume)


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())

"""Speed must not change what is learned: the validation Dice trajectory of our training path
(device sampler and augmentation, bf16 + channels_last and the CUDA-graph step on CUDA) against the same strategy fed the
reference's way (benchmarks/reference_pipeline.py: CPU per-sample augmentation, fp32), over
several seeds, all scored by the same evaluator. Prints a table and writes JSON.

Pipelines (--pipelines): 'ours'; 'reference', the reference's feed (bound by its CPU workers);
'fp32', our feed with bf16, channels_last, CUDA graphs and compile off (what the GPU's switches
change, alone, and as fast as the GPU allows). Our path is compared with each other one trained.

    python benchmarks/trajectory.py --device cuda --methods mt --iterations 400 --seeds 3
    python benchmarks/trajectory.py --device cuda --methods dv,dan --pipelines ours,fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cli as cli  # noqa: E402
from raysemi.config import TrainConfig  # noqa: E402
from raysemi.data import load_dataset  # noqa: E402
from raysemi.loop import Trainer, resolve_device  # noqa: E402
from raysemi.errors import UserError  # noqa: E402
from raysemi.methods import get_method  # noqa: E402
from reference_pipeline import ReferenceFeed  # noqa: E402
from throughput import parse_sets  # noqa: E402


#: the pipelines a run can train, our path first: the others are what it is compared with
PIPELINES = ("ours", "reference", "fp32")
#: the switches that make our path fast on a GPU, all off: the reference feed and the fp32 pipeline
PLAIN = {"amp": "off", "channels_last": "off", "cuda_graphs": "off", "compile": "off"}


def run(method: str, data, args, seed: int, pipeline: str) -> tuple[list[float], dict]:
    """One seed's validation Dice at each evaluation, and the config values that `--set` names as
    this pipeline's trainer had them."""
    reference = pipeline == "reference"
    # the reference feed hands over ready batches: no device sampler to capture in a CUDA graph;
    # it keeps the reference's own values, the fp32 pipeline ours (`--set`) with the switches off
    over = (PLAIN if reference else {**args.overrides, **PLAIN} if pipeline == "fp32"
            else {"cuda_graphs": args.cuda_graphs, "compile": "on" if args.compile else "off", **args.overrides})
    cfg = run_config(method, args, seed, over)
    start = time.perf_counter()
    trainer = Trainer(cfg, data)
    if reference:
        uses = get_method(method).uses_unlabeled
        torch.manual_seed(seed)
        trainer.sampler = ReferenceFeed(data.root, data.train.names, data.train.labeled_idx,
                                        data.train.unlabeled_idx if uses else data.train.labeled_idx[:0],
                                        cfg.labeled_bs if uses else cfg.batch_size, cfg.unlabeled_bs if uses else 0,
                                        cfg.patch_size, trainer.device, args.reference_workers)
    result = trainer.fit()
    if trainer.graph_failure:
        print(f"trajectory: {method} {pipeline} seed {seed}: CUDA graph capture failed, trained eagerly: "
              f"{trainer.graph_failure}", file=sys.stderr, flush=True)
    curve = [h["val/dice"] for h in result.history]
    print(f"trajectory: {method} {pipeline} seed {seed}: {cfg.max_iterations} iterations in "
          f"{time.perf_counter() - start:.1f} s, Dice {curve[-1]:.3f}", file=sys.stderr, flush=True)
    # the trainer's CUDA graphs and tensors go now, before a reference feed forks its workers
    # (a graph freed in a forked worker warns "CUDA warning: initialization error")
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return curve, {k: getattr(cfg, k) for k in args.overrides}


#: config fields this script sets for both pipelines alike: `--set` may not change them
SET_HERE = {"method", "data", "labeled_patients", "patch_size", "batch_size", "labeled_bs", "max_iterations",
            "eval_interval", "log_interval", "device", "seed", "rampup_interval", "mt_warmup", "eval_hd95",
            "cuda_graphs", "compile"}


def run_config(method: str, args, seed: int, over: dict) -> TrainConfig:
    values = dict(method=method, data=args.data, labeled_patients=args.labeled_patients,
                  patch_size=(args.size, args.size), batch_size=args.batch_size, labeled_bs=args.batch_size // 2,
                  max_iterations=args.iterations, eval_interval=args.iterations // args.points,
                  log_interval=10 ** 9, device=args.device, mt_warmup=0, seed=seed,
                  rampup_interval=max(1, args.iterations // 200), eval_hd95=False)
    return TrainConfig(**{**values, **over}).validate(cli.CONFIG_FLAGS)


def compare(ours: list[list[float]], reference: list[list[float]]) -> list[dict]:
    """At each validation point, our pipeline's mean Dice minus the reference feed's, and the seed
    noise it is judged against: twice the standard error of that difference. Both pipelines train
    seeds 1337, 1338, ... and a seed builds the same initial network in both, so with as many seeds
    on each side the runs are paired: the noise is that of the per-seed differences (`test`:
    'paired'); otherwise each side's sample variance (Welch's form, 'welch'). `within` says whether
    the difference lies inside it; None with fewer than 2 seeds, where there is no spread to judge
    by. A rough test: with 3 seeds an 82% two-sided one (t with 2 degrees of freedom; Welch's 82-88%)."""
    points = []
    for i in range(len(ours[0])):
        a, b = [c[i] for c in ours], [c[i] for c in reference]
        delta = statistics.mean(a) - statistics.mean(b)
        if len(a) < 2 or len(b) < 2:
            points.append({"delta": delta, "noise": None, "within": None, "test": None})
            continue
        if len(a) == len(b):
            noise, test = 2 * statistics.stdev(x - y for x, y in zip(a, b)) / len(a) ** 0.5, "paired"
        else:
            noise, test = 2 * (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5, "welch"
        points.append({"delta": delta, "noise": noise, "within": abs(delta) <= noise, "test": test})
    return points


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--methods", default="mean_teacher", help="comma-separated strategies (aliases ok), or 'all'")
    p.add_argument("--data", default="phantom", help="dataset root in the SSL4MIS layout, or 'phantom'")
    p.add_argument("--labeled-patients", type=int, default=7, help="patients whose labels are used")
    p.add_argument("--size", type=int, default=256, help="patch size (square, a multiple of 16)")
    p.add_argument("--batch-size", type=int, default=24, help="slices per batch (half labeled)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if there is one), 'cuda', 'cuda:N' or 'cpu'")
    p.add_argument("--iterations", type=int, default=400, help="iterations each run trains")
    p.add_argument("--points", type=int, default=4, help="validations along the way, evenly spaced")
    p.add_argument("--seeds", type=int, default=3, help="runs per strategy and pipeline (seeds 1337, 1338, ...)")
    p.add_argument("--reference-workers", type=int, default=4, help="DataLoader workers of the reference feed")
    p.add_argument("--pipelines", default="ours,reference",
                   help="which to train, comma-separated: 'ours', 'reference' (the reference's CPU feed, fp32), "
                        "'fp32' (our feed, bf16/channels_last/graphs/compile off); ours is compared with each other. "
                        "fp32 as PyTorch runs it by default, as the reference did: cuDNN convolutions in TF32 on "
                        "GPUs that have it")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"), help="our path's cuda_graphs")
    p.add_argument("--compile", action="store_true", help="our path with compile: on")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config value for our path (repeatable), e.g. --set uncertainty_copies=8; the fp32 "
                        "pipeline takes it too (with its switches off), the reference feed keeps the reference's own")
    p.add_argument("--out", help="the JSON written (default benchmarks/results/trajectory.json; with --from-json, "
                                 "none unless given)")
    p.add_argument("--from-json", metavar="FILE", help="print a saved run's table and comparison again, training "
                                                       "nothing")
    p.add_argument("--reference-from", metavar="FILE",
                   help="with --from-json: compare with the reference rows of this saved run (same settings)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.out:
        cli.check_out(args.out)
    if args.from_json:
        # it trains nothing: a training flag beside it would be silently ignored
        given = [k for k, v in vars(args).items()
                 if k not in ("debug", "out", "from_json", "reference_from") and v != p.get_default(k)]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')}: given with --from-json {args.from_json}, which trains "
                            "nothing; expected only --out and --reference-from with it")
        return reprint(Path(args.from_json), args.out, args.reference_from)
    if args.reference_from:
        raise UserError(f"--reference-from {args.reference_from}: given without --from-json; expected it with "
                        "--from-json FILE (a run training both pipelines compares them itself)")
    cli.at_least(args, labeled_patients=1, batch_size=2, iterations=1, points=1, seeds=1, reference_workers=0)
    cli.patch_size(args.size)
    if args.iterations % args.points:
        raise UserError(f"--points: {args.points} is invalid; expected a divisor of --iterations ({args.iterations}): "
                        "one validation every --iterations/--points iterations, the last at the end")
    pipelines = list(dict.fromkeys(x.strip() for x in args.pipelines.split(",") if x.strip()))
    if not pipelines or not set(pipelines) <= set(PIPELINES):
        raise UserError(f"--pipelines: {args.pipelines!r} is invalid; expected some of 'ours', 'reference' and "
                        "'fp32', comma-separated")
    pipelines = [x for x in PIPELINES if x in pipelines]  # ours first, as the table compares
    methods = cli.methods(args.methods)
    args.overrides = parse_sets(args.set, p)
    fixed = sorted(set(args.overrides) & SET_HERE)
    if fixed:
        raise UserError(f"--set: {fixed[0]}: set by this script from its own flags or for the comparison; expected "
                        f"another config field (not {', '.join(sorted(SET_HERE))})")
    for m in methods:  # a bad --device before the data is read, with our path's own values
        run_config(m, args, 0, {"cuda_graphs": args.cuda_graphs, "compile": "on" if args.compile else "off",
                                **args.overrides})
    args.out = args.out or "benchmarks/results/trajectory.json"
    cli.check_out(args.out)
    data = load_dataset(args.data, args.labeled_patients, 4)
    rows, comparisons = [], []
    width = max([24, *(len(m) + 2 for m in methods)])  # uncertainty_aware_mean_teacher is 30 long
    its = [args.iterations // args.points * (i + 1) for i in range(args.points)]
    print(header(its, width), flush=True)
    for m in methods:
        for pipeline in pipelines:
            runs = [run(m, data, args, 1337 + s, pipeline) for s in range(args.seeds)]
            curves = [curve for curve, _ in runs]
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
            std = [statistics.pstdev(c[i] for c in curves) for i in range(len(curves[0]))]
            rows.append({"method": m, "pipeline": pipeline, "curves": curves, "mean": mean, "std": std,
                         "set": runs[0][1]})
            print(row_line(rows[-1], width), flush=True)
            # written after every row: a run stopped part way (a device call's time limit) keeps its rows
            write_run(args, its, rows, comparisons)
        comparisons += compare_rows(rows, m, width)
    out = write_run(args, its, rows, comparisons)
    print(summary(its, args.seeds, comparisons) + f"; written: {out}")
    return 0


def write_run(args, its: list[int], rows: list[dict], comparisons: list[dict]) -> Path:
    device = resolve_device(args.device)
    return cli.write_json(args.out, {
        "command": " ".join(["python"] + sys.argv), "args": vars(args), "iterations": its, "rows": rows,
        "comparisons": comparisons, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})


def header(its: list[int], width: int) -> str:
    return f"{'strategy':<{width}}{'pipeline':<11}" + "  ".join(f"{'it ' + str(i):>12}" for i in its)


def row_line(row: dict, width: int) -> str:
    return f"{row['method']:<{width}}{row['pipeline']:<11}" + "  ".join(
        f"{a:.3f}+-{b:.3f}" for a, b in zip(row["mean"], row["std"]))


#: the comparison's row label for each pipeline our path is compared with
LABELS = {"reference": "ours-ref", "fp32": "ours-fp32"}


def compare_rows(rows: list[dict], method: str, width: int) -> list[dict]:
    """Print and return the comparisons of `method`'s path with each other pipeline trained (none
    if ours was not): under each point, the difference of the means and its seed noise, '!' where
    outside it."""
    trained = {row["pipeline"]: row["curves"] for row in rows if row["method"] == method}
    found = []
    for against in [x for x in PIPELINES[1:] if x in trained and "ours" in trained]:
        points = compare(trained["ours"], trained[against])
        cells = [(f"{q['delta']:+.3f}" + (f"/{q['noise']:.3f}" if q["noise"] is not None else ""),
                  "!" if q["within"] is False else "") for q in points]
        print(f"{'':<{width}}{LABELS[against]:<11}" + "".join(f"{text:>12}{mark:<2}" for text, mark in cells).rstrip(),
              flush=True)
        found.append({"method": method, "against": against, "points": points})
    return found


def summary(its: list[int], seeds: int, comparisons: list[dict]) -> str:
    line = f"validation Dice at iterations {its}, mean+-std (population std) over {seeds} seed(s)"
    judged = [(c["against"], q) for c in comparisons for q in c["points"] if q["within"] is not None]
    if judged:
        tests = " and ".join(sorted({q["test"] for _, q in judged}))
        counts = ", ".join(f"{LABELS[a]} {sum(q['within'] for b, q in judged if b == a)} of "
                           f"{sum(b == a for b, _ in judged)}" for a in PIPELINES[1:] if any(b == a for b, _ in judged))
        line += (f"; ours-X: the difference of the means/its seed noise (twice its standard error, {tests} "
                 f"seeds), '!' outside: {counts} points within")
    return line


#: the settings two saved runs must share for one's reference rows to be compared with the other's
#: (not the data's path: a device session writes the phantom to a temporary folder)
SAME_RUN = ("labeled_patients", "size", "batch_size", "iterations", "points", "seeds")


def load_saved(path: Path, flag: str) -> dict:
    """A JSON written by this script, its rows checked against its iterations; UserError with one
    line naming the file and what is wrong if it is not one."""
    def bad(what: str) -> UserError:
        return UserError(f"{flag} {path}: {what}; expected a JSON written by benchmarks/trajectory.py")

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise bad(f"cannot be read as JSON ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise bad("args: missing")
    its = saved.get("iterations")
    if not isinstance(its, list) or not its or not all(isinstance(i, int) for i in its):
        raise bad(f"iterations: {its!r} is not a list of iteration numbers")
    rows = saved.get("rows")
    if not isinstance(rows, list) or not rows:
        raise bad(f"rows: {rows!r} holds no trained pipeline")
    for i, row in enumerate(rows):
        keys = ("method", "pipeline", "curves", "mean", "std")
        fields = {k: row.get(k) for k in keys} if isinstance(row, dict) else {}
        if not fields or not isinstance(fields["method"], str) or fields["pipeline"] not in PIPELINES:
            raise bad(f"rows[{i}]: not a row (method, pipeline {', '.join(map(repr, PIPELINES))}, curves, mean, std)")
        curves = fields["curves"]
        if (not isinstance(curves, list) or not curves or not all(
                isinstance(c, list) and len(c) == len(its) and all(isinstance(d, (int, float)) for d in c)
                for c in curves)
                or not all(isinstance(v, list) and len(v) == len(its) and all(isinstance(d, (int, float)) for d in v)
                           for v in (fields["mean"], fields["std"]))):
            raise bad(f"rows[{i}]: its curves, mean and std are not one Dice per iteration of {its}")
    return saved


def reprint(path: Path, out: str | None, reference_from: str | None = None) -> int:
    """--from-json: a saved run's table and comparison again (written to --out, if given, with the
    comparison added: runs saved before it was computed have none). `reference_from`: the
    reference feed's rows come from that saved run instead (one that trained only our path, e.g.
    compiled, is compared with the reference trained in another run with the same settings)."""
    saved = load_saved(path, "--from-json")
    rows, its = saved["rows"], saved["iterations"]
    if reference_from:
        for source in (path, Path(reference_from)):
            if out and Path(out).resolve() == source.resolve():
                raise UserError(f"--out {out}: the file given to {'--from-json' if source == path else '--reference-from'}"
                                "; expected another file (it would lose rows of its own)")
        other = load_saved(Path(reference_from), "--reference-from")
        differ = [f"{k} {saved['args'].get(k)!r} against {other['args'].get(k)!r}" for k in SAME_RUN
                  if saved["args"].get(k) != other["args"].get(k)]
        if other["iterations"] != its:
            differ.append(f"iterations {its} against {other['iterations']}")
        if differ:
            raise UserError(f"--reference-from {reference_from}: {', '.join(differ)}; expected a run with the "
                            f"same settings as {path}")
        theirs = {r["method"]: r for r in other["rows"] if r["pipeline"] == "reference"}
        methods = list(dict.fromkeys(r["method"] for r in rows))
        lacking = [m for m in methods if m not in theirs]
        if lacking:
            raise UserError(f"--reference-from {reference_from}: no reference rows for {', '.join(lacking)}; "
                            f"expected a run that trained the reference feed of each strategy in {path}")
        rows = [r for r in rows if r["pipeline"] != "reference"] + [
            {**theirs[m], "from": reference_from} for m in methods]
        rows.sort(key=lambda r: (methods.index(r["method"]), PIPELINES.index(r["pipeline"])))  # as a run prints them
    methods = list(dict.fromkeys(row["method"] for row in rows))
    width = max([24, *(len(m) + 2 for m in methods)])
    print(header(its, width))
    comparisons = []
    for m in methods:
        for row in rows:
            if row["method"] == m:
                print(row_line(row, width))
        comparisons += compare_rows(rows, m, width)
    if out:
        cli.write_json(out, {**saved, "rows": rows, "comparisons": comparisons})
    print(summary(its, len(rows[0]["curves"]), comparisons) + (f"; written: {out}" if out else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)

"""Training throughput per strategy on one device: steady-state it/s after warm-up, ms/step, peak
device memory and one validation pass's time, over several repeats; prints a table, writes JSON.

    python benchmarks/throughput.py --device cpu --size 64 --batch-size 8 --iterations 20      # CPU smoke
    python benchmarks/throughput.py --device cuda --compare-reference-pipeline                  # reference size
    python benchmarks/throughput.py --device cuda --methods mt --packed 4                      # 4 trials, one GPU
    python benchmarks/throughput.py --device cuda --methods supervised,mt --profile 20          # where time goes
    python benchmarks/throughput.py --device cuda --compare-eager                               # CUDA graphs' gain
    python benchmarks/throughput.py --device cuda --methods mt --compile                       # with torch.compile
    python benchmarks/throughput.py --device cuda --compare-compile                             # compile's gain
    python benchmarks/throughput.py --device cuda --methods uamt --compare-set uncertainty_copies=8  # one value's A/B

The reference size is batch 24 (12 labeled), 256x256, 7 labeled patients. Timing is of the real
training path (`Trainer.train_until`: device-resident slices, device augmentation, bf16 and
channels_last and the CUDA-graph step on CUDA by default), with the device synchronised at both
ends of each measured run.

`--compare-reference-pipeline` runs the same strategy step fed the reference's way (h5 read and
CPU augmentation per sample through a DataLoader whose workers restart every epoch, synchronous
copies, fp32 NCHW, losses read back every iteration; validation one slice at a time), so each
ratio comes from one run on one machine. See benchmarks/reference_pipeline.py.

`--compare-set FIELD=VALUE` (repeatable) times each strategy a second time, in the same process,
with those config values on top of the row's own (`--set`, `--compile`): an A/B of one setting.

`--packed N` runs N concurrent trials of the first strategy through the real search path
(`python -m raysemi.search`, fractional GPUs, data through Ray's object store, ASHA not stopping
anyone) and sums the trials' steady-state rates (each from its reports after the first, so start-up
and CUDA initialisation are left out); it also gives the whole search's iterations / wall time.

`--profile K` records K training steps of each strategy with torch.profiler and writes the
operator summary (by self device time on CUDA, CPU time on CPU) next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cli as cli  # noqa: E402
from raysemi.config import ALIASES, FIELDS, TrainConfig, add_config_arguments, save_yaml  # noqa: E402
from raysemi.data import load_dataset  # noqa: E402
from raysemi.errors import UserError  # noqa: E402
from raysemi.inference import evaluate_volumes  # noqa: E402
from raysemi.loop import Trainer  # noqa: E402
from raysemi.methods import get_method  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: config fields this script sets from its own flags (or times by --warmup/--iterations): `--set`
#: may not change them, or the JSON's flags would say one thing and the rows be timed with another
SET_HERE = {"method": "--methods", "data": "--data", "labeled_patients": "--labeled-patients", "patch_size": "--size",
            "batch_size": "--batch-size", "labeled_bs": "--batch-size (half of it)", "device": "--device", "amp": "--amp",
            "cuda_graphs": "--cuda-graphs", "compile": "--compile", "max_iterations": "--warmup/--iterations",
            "eval_interval": "--warmup/--iterations", "log_interval": "--warmup/--iterations"}


#: config fields `--compare-set` may not change: other data, another device, or no part of the timed step
NOT_COMPARED = {"method", "data", "labeled_patients", "device", "max_iterations", "eval_interval", "log_interval"}


def bench_config(method: str, args, **over) -> TrainConfig:
    values = dict(method=method, data=args.data, labeled_patients=args.labeled_patients,
                  patch_size=(args.size, args.size), batch_size=args.batch_size, labeled_bs=args.batch_size // 2,
                  max_iterations=10 ** 9, eval_interval=10 ** 9, log_interval=10 ** 9, device=args.device,
                  amp=args.amp, mt_warmup=0, cuda_graphs=args.cuda_graphs, compile="off")
    return TrainConfig(**{**values, **getattr(args, "overrides", {}), **over}).validate(cli.CONFIG_FLAGS)


def parse_sets(items: list[str], p: argparse.ArgumentParser, option: str = "--set") -> dict:
    """`--set FIELD=VALUE` items (or another `option`'s), read as the training CLI reads its flags
    (types, aliases) and checked as a config; a bad one is a usage error naming `option`."""
    flags = argparse.ArgumentParser(prog=option, add_help=False)
    flags.error = lambda message: p.error(f"{option}: {message}")  # one line, under this script's usage
    add_config_arguments(flags)
    argv: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        name = ALIASES.get(key, key)
        if not sep or name not in FIELDS:
            p.error(f"{option}: {item!r} is invalid; expected FIELD=VALUE with FIELD a config field")
        flag = "--" + name.replace("_", "-")
        if FIELDS[name].type in ("bool", bool):  # --eval-hd95 / --no-eval-hd95
            if value.lower() not in ("true", "on", "yes", "1", "false", "off", "no", "0"):
                p.error(f"{option}: {name}: {value!r} is invalid; expected true or false")
            argv.append(flag if value.lower() in ("true", "on", "yes", "1") else "--no-" + flag[2:])
        else:
            argv += [flag, *value.split()]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(flags.parse_args(argv)).items()}
    try:
        TrainConfig(**values).validate(option)
    except UserError as err:
        p.error(str(err))
    return values


def timed_runs(trainer: Trainer, iterations: int, repeats: int) -> list[float]:
    """it/s of `repeats` runs of `iterations` steps each, the device synchronised around each."""
    rates = []
    for _ in range(repeats):
        sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_until(trainer.iteration + iterations)
        sync(trainer.device)
        rates.append(iterations / (time.perf_counter() - t0))
    return rates


def measure(method: str, data, args, **over) -> dict:
    main_row = not over  # the row the reference pipeline is compared with (not a --compare-* variant)
    if args.compile:
        over.setdefault("compile", "on")
    trainer = Trainer(bench_config(method, args, **over), data)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_s = None
    trainer.start()
    sync(device)
    t0 = time.perf_counter()
    trainer.train_until(args.warmup)
    sync(device)
    if trainer.compiled:
        compile_s = time.perf_counter() - t0
    window = [time.time()]
    rates = timed_runs(trainer, args.iterations, args.repeats)
    window.append(time.time())
    val_s = []
    for _ in range(2):  # the first pass also pays for cuDNN's choices at the eval batch shapes
        sync(device)
        t0 = time.perf_counter()
        summary = trainer.evaluate(distances=True)
        sync(device)
        val_s.append(time.perf_counter() - t0)
    # the same pass with the metrics computed serially after each volume (before they moved to threads)
    cfg = trainer.config
    sync(device)
    t0 = time.perf_counter()
    evaluate_volumes(trainer.eval_network(), data.val, cfg.num_classes, cfg.patch_size, device, cfg.eval_batch_size,
                     True, trainer.amp, trainer.channels_last, workers=1)
    sync(device)
    val_serial_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    row = {"method": method, "it_per_s_mean": statistics.mean(rates), "it_per_s_median": statistics.median(rates),
           "it_per_s_runs": rates, "ms_per_step": 1000 / statistics.median(rates), "peak_mem_mib": peak,
           "peak_mem_kind": "device" if device.type == "cuda" else "process RSS", "val_pass_s": min(val_s),
           "val_pass_first_s": val_s[0], "val_pass_serial_metrics_s": val_serial_s,
           "val_metric_threads": torch.get_num_threads(), "val_dice": summary.means()["dice"], "val_volumes": len(data.val),
           "device": str(device), "amp": trainer.amp, "channels_last": trainer.channels_last,
           "compiled": trainer.compiled, "compile_warmup_s": compile_s,
           "cuda_graphs": trainer.cuda_graphs and trainer.graph_failure is None, "graph_failure": trainer.graph_failure,
           "timed_window_unix": window,
           "overrides": {k: getattr(trainer.config, k) for k in {**getattr(args, "overrides", {}), **over}}}
    if args.profile:
        row["profile"] = profile(trainer, args.profile)
    if args.compare_reference_pipeline and main_row:  # once per strategy, beside the main row
        row.update(measure_reference(method, data, args, trainer))
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


#: what a second timing of the same strategy (--compare-compile, --compare-set) adds to its row
COLUMN_KEYS = ("it_per_s_mean", "it_per_s_median", "it_per_s_runs", "ms_per_step", "peak_mem_mib", "val_pass_s",
               "val_dice", "compile_warmup_s", "cuda_graphs", "graph_failure")


def add_column(row: dict, prefix: str, other: dict, keys: tuple[str, ...]) -> None:
    """Copy `keys` of another timing of the row's strategy into the row, as `<prefix>_<key>`."""
    row.update({f"{prefix}_{k}": other[k] for k in keys})


def measure_reference(method: str, data, args, ours: Trainer) -> dict:
    """The same step fed and validated the reference's way (fp32, NCHW, per-iteration host reads)."""
    from reference_pipeline import ReferenceFeed, reference_validation

    # the reference's own settings: --set values (e.g. uncertainty_copies) are ours, not the reference's
    ref_args = argparse.Namespace(**{**vars(args), "overrides": {}})
    cfg = bench_config(method, ref_args, amp="off", channels_last="off", cuda_graphs="off", log_interval=1)
    trainer = Trainer(cfg, data)
    uses_unlabeled = get_method(method).uses_unlabeled
    lb = cfg.labeled_bs if uses_unlabeled else cfg.batch_size
    trainer.sampler = ReferenceFeed(data.root, data.train.names, data.train.labeled_idx,
                                    data.train.unlabeled_idx if uses_unlabeled else data.train.labeled_idx[:0],
                                    lb, cfg.unlabeled_bs if uses_unlabeled else 0, cfg.patch_size,
                                    trainer.device, args.reference_workers)
    trainer.start()
    trainer.train_until(args.warmup)
    window = [time.time()]
    rates = timed_runs(trainer, args.reference_iterations, 1)
    window.append(time.time())
    sync(trainer.device)
    t0 = time.perf_counter()
    dice = reference_validation(trainer.eval_network(), data.val, cfg.num_classes, cfg.patch_size, trainer.device)
    val_s = time.perf_counter() - t0
    epochs = trainer.sampler.epochs
    del trainer
    return {"ref_it_per_s": rates[0], "ref_val_pass_s": val_s, "ref_val_dice": dice, "ref_epochs": epochs,
            "ref_workers": args.reference_workers, "ref_timed_window_unix": window}


def profile(trainer: Trainer, steps: int) -> str:
    """torch.profiler's operator table over `steps` training steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        trainer.train_until(trainer.iteration + steps)
        sync(trainer.device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)


def measure_packed(method: str, args) -> dict:
    """N concurrent trials through `python -m raysemi.search`; their summed steady-state it/s."""
    n = args.packed
    gpus = 1 if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) else 0
    cli.check_data(args.data)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device: {args.device}, but torch {torch.__version__} here sees no CUDA device; expected "
                        "--device cpu or auto")
    with tempfile.TemporaryDirectory() as tmp:
        base = bench_config(method, args, eval_interval=args.packed_eval_interval, log_interval=20,
                            max_iterations=args.packed_iterations, compile="on" if args.compile else "off")
        base.device = "auto"
        save_yaml(base, Path(tmp) / "base.yaml")
        cmd = [sys.executable, "-m", "raysemi.search", "--method", method, "--config", str(Path(tmp) / "base.yaml"),
               "--num-samples", str(n), "--max-iterations", str(args.packed_iterations),
               "--eval-interval", str(args.packed_eval_interval), "--grace-period", str(args.packed_iterations),
               "--gpus", str(gpus), "--cpus-per-trial", str(args.packed_cpus_per_trial),
               "--storage", str(Path(tmp) / "runs"), "--name", "packed", "--experiment", "throughput-packed",
               "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
        if gpus:
            cmd += ["--gpus-per-trial", f"{1 / n:.6f}"]
        else:
            cmd += ["--num-cpus", str(n * args.packed_cpus_per_trial)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        refused = cli.search_refusal(proc.returncode, proc.stderr + proc.stdout)
        if refused:
            raise refused
        if proc.returncode != 0:
            raise SystemExit(f"packed search failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        trials = []
        for result in sorted((Path(tmp) / "runs" / "packed").glob("*/result.json")):
            reports = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            first, last = reports[0], reports[-1]
            span = last["time_total_s"] - first["time_total_s"]
            rate = (last["iteration"] - first["iteration"]) / span if span > 0 else float("nan")
            trials.append({"trial": result.parent.name, "reports": len(reports), "iterations": last["iteration"],
                           "steady_it_per_s": rate, "trial_seconds": last["time_total_s"],
                           "compiled": last.get("compiled")})
    done = [t for t in trials if t["reports"] >= 2]
    # what the trials themselves report (on, off, failed: why), not what was asked for
    compiled = sorted({str(t["compiled"]) for t in trials})
    return {"method": method, "packed": n, "gpus_per_trial": 1 / n if gpus else 0,
            "compile_asked": args.compile, "compiled": compiled[0] if len(compiled) == 1 else compiled,
            "trials": trials,
            "total_steady_it_per_s": sum(t["steady_it_per_s"] for t in done),
            "search_wall_s": wall, "search_it_per_s": sum(t["iterations"] for t in trials) / wall,
            "command": " ".join(cmd[1:])}


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--methods", default="all", help="comma-separated strategies (aliases ok), or 'all'")
    p.add_argument("--data", default="phantom", help="dataset root in the SSL4MIS layout, or 'phantom'")
    p.add_argument("--labeled-patients", type=int, default=7, help="patients whose labels are used")
    p.add_argument("--size", type=int, default=256, help="patch size (square, a multiple of 16)")
    p.add_argument("--batch-size", type=int, default=24, help="slices per batch (half labeled)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if there is one), 'cuda', 'cuda:N' or 'cpu'")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="bf16 autocast ('auto': on for CUDA, off for CPU)")
    p.add_argument("--warmup", type=int, default=20, help="steps before timing")
    p.add_argument("--iterations", type=int, default=100, help="iterations per measured run")
    p.add_argument("--repeats", type=int, default=3, help="measured runs (mean and median reported)")
    p.add_argument("--compile", action="store_true", help="compile: on (torch.compile the networks; warm-up time reported)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                   help="capture each iteration as a CUDA graph ('auto': on for CUDA)")
    p.add_argument("--compare-eager", action="store_true",
                   help="also time each strategy with cuda_graphs off, in the same run (the graphs' gain)")
    p.add_argument("--compare-compile", action="store_true",
                   help="also time each strategy with compile: on (beside the same CUDA-graph setting), same run")
    p.add_argument("--compare-reference-pipeline", action="store_true",
                   help="also time the same step fed and validated the reference's way")
    p.add_argument("--reference-iterations", type=int, default=66,
                   help="timed iterations of the reference feed (several of its short epochs)")
    p.add_argument("--reference-workers", type=int, default=4, help="DataLoader workers of the reference feed")
    p.add_argument("--profile", type=int, default=0, metavar="K", help="profile K steps per strategy")
    p.add_argument("--packed", type=int, default=0, metavar="N",
                   help="run N concurrent trials of the first strategy through the search (instead of the table)")
    p.add_argument("--packed-iterations", type=int, default=600, help="iterations per packed trial")
    p.add_argument("--packed-eval-interval", type=int, default=100, help="report interval of packed trials")
    p.add_argument("--packed-cpus-per-trial", type=int, default=2, help="CPUs each packed trial reserves")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config value for every row (repeatable), e.g. --set uncertainty_copies=8")
    p.add_argument("--compare-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="time each strategy again with these config values (repeatable), e.g. "
                        "--compare-set uncertainty_copies=8: an A/B of one setting in the same process")
    p.add_argument("--out", default="benchmarks/results/throughput.json", help="the JSON written")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cli.at_least(args, labeled_patients=1, batch_size=2, warmup=0, iterations=1, repeats=1, reference_iterations=1,
                 reference_workers=0, profile=0, packed=0, packed_iterations=1, packed_eval_interval=1,
                 packed_cpus_per_trial=1)
    cli.patch_size(args.size)
    methods = cli.methods(args.methods)
    args.overrides = parse_sets(args.set, p)
    fixed = [k for k in args.overrides if k in SET_HERE]
    if fixed:
        raise UserError(f"--set: {fixed[0]}: set by this script from {SET_HERE[fixed[0]]}; expected that flag, or "
                        "another config field")
    args.compare_overrides = parse_sets(args.compare_set, p, "--compare-set")
    # an A/B of how a setting changes the step's speed (amp, batch_size, cuda_graphs, ...) is what
    # --compare-set is for; these would time other data or nothing that a step does
    fixed = [k for k in args.compare_overrides if k in NOT_COMPARED]
    if fixed:
        raise UserError(f"--compare-set: {fixed[0]}: not timed by an A/B of the step; expected a field that "
                        f"changes the step (not {', '.join(sorted(NOT_COMPARED))})")
    if args.compile and args.compare_compile:
        p.error("--compile and --compare-compile: choose one (--compare-compile times both)")
    for m in methods:  # a bad --device or --amp before any data is read
        bench_config(m, args)
    cli.check_out(args.out)
    out = Path(args.out)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"}
    report = {"command": " ".join([Path(sys.executable).name] + sys.argv), "args": vars(args),
              "machine": machine, "date": time.strftime("%Y-%m-%d")}
    if args.packed:
        r = measure_packed(methods[0], args)
        report["packed"] = r
        per_trial = ", ".join(f"{t['steady_it_per_s']:.1f}" for t in r["trials"])
        print(f"{r['packed']} packed {r['method']} trials: {r['total_steady_it_per_s']:.1f} it/s in total at steady "
              f"state ({per_trial} per trial); whole search "
              f"{r['search_it_per_s']:.1f} it/s over {r['search_wall_s']:.0f} s including start-up; "
              f"compiled: {r['compiled']}")
    else:
        data = load_dataset(args.data, args.labeled_patients, 4)
        rows = []
        ref = args.compare_reference_pipeline
        head = f"{'strategy':<32}{'it/s':>9}{'ms/step':>9}{'peak MiB':>10}{'val s':>8}"
        head += f"{'eager it/s':>11}{'gain':>6}" if args.compare_eager else ""
        head += f"{'compiled it/s':>14}{'gain':>6}{'compile s':>10}" if args.compare_compile else ""
        head += f"{'B it/s':>9}{'B/A':>6}" if args.compare_overrides else ""
        head += f"{'ref it/s':>10}{'ratio':>7}{'ref val s':>10}{'ratio':>7}" if ref else ""
        if args.overrides:
            print("every row with " + ", ".join(f"{k}={v}" for k, v in args.overrides.items()))
        if args.compare_overrides:
            print("A: it/s; B: the same with " + ", ".join(f"{k}={v}" for k, v in args.compare_overrides.items()))
        print(head)
        for m in methods:
            r = measure(m, data, args)
            if r["graph_failure"]:
                print(f"  {m}: CUDA graph capture failed, timed eagerly: {r['graph_failure']}")
            rows.append(r)
            line = (f"{m:<32}{r['it_per_s_median']:>9.2f}{r['ms_per_step']:>9.1f}{r['peak_mem_mib']:>10.0f}"
                    f"{r['val_pass_s']:>8.2f}")
            if args.compare_eager:
                e = measure(m, data, args, cuda_graphs="off")
                add_column(r, "eager", e, ("it_per_s_mean", "it_per_s_median", "it_per_s_runs", "ms_per_step",
                                           "peak_mem_mib", "val_dice"))
                r["graph_gain"] = r["it_per_s_median"] / e["it_per_s_median"]
                line += f"{e['it_per_s_median']:>11.2f}{r['graph_gain']:>5.2f}x"
            if args.compare_compile:
                c = measure(m, data, args, compile="on")
                add_column(r, "compiled", c, COLUMN_KEYS)
                r["compile_gain"] = c["it_per_s_median"] / r["it_per_s_median"]
                line += f"{c['it_per_s_median']:>14.2f}{r['compile_gain']:>5.2f}x{c['compile_warmup_s']:>10.1f}"
            if args.compare_overrides:
                b = measure(m, data, args, **args.compare_overrides)
                add_column(r, "compared", b, (*COLUMN_KEYS, "overrides"))
                r["compared_gain"] = b["it_per_s_median"] / r["it_per_s_median"]
                line += f"{b['it_per_s_median']:>9.2f}{r['compared_gain']:>5.2f}x"
            if ref:
                if args.compare_compile:
                    r["compiled_speedup"] = r["compiled_it_per_s_median"] / r["ref_it_per_s"]
                r["speedup"] = r["it_per_s_median"] / r["ref_it_per_s"]
                r["val_speedup"] = r["ref_val_pass_s"] / r["val_pass_s"]
                line += (f"{r['ref_it_per_s']:>10.2f}{r['speedup']:>6.1f}x{r['ref_val_pass_s']:>10.2f}"
                         f"{r['val_speedup']:>6.1f}x")
            print(line, flush=True)
            # written after every row, so a run cut short still leaves what it measured
            report["rows"] = [{k: v for k, v in r.items() if k != "profile"} for r in rows]
            cli.write_json(out, report)
        if args.profile:
            prof = out.with_suffix(".profile.txt")
            prof.write_text("".join(f"## {r['method']} ({args.profile} steps, {r['device']}, amp={r['amp']}, "
                                    f"channels_last={r['channels_last']})\n{r['profile']}\n\n" for r in rows))
            print(f"profile written: {prof}")
    cli.write_json(out, report)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)

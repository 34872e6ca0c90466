"""Wall time of a whole search on one device: N mean-teacher trials through `python -m raysemi.search`
(Optuna's TPE, ASHA, MLflow on SQLite, trials packed on the GPU), as issue 7's goal states it:
"a 32-trial mean-teacher search of 10,000-iteration trials with ASHA finishes on one H100 in under
an hour". Prints a table, writes JSON.

    python benchmarks/search_wall.py --device cuda --data DATA                   # the goal, full scale
    python benchmarks/search_wall.py --device cuda --data DATA --scale 0.1       # 1,000-iteration trials
    python benchmarks/search_wall.py --device cpu --trials 2 --iterations 40 --size 32 --batch-size 4   # smoke

`--scale S` shortens every trial, ASHA's grace period and the evaluation interval by S, so ASHA
keeps the same shape (same rungs, as many validations per trial) and projects the full-scale wall
time from the trials' own accounts: each trial reports its seconds of training steps and of
validations; at full scale only the steps grow, by 1/S. Two projections:
- from the trials' own rates: the driver's start plus the rest of the wall time times the trials'
  projected seconds over their measured seconds. On a GPU at a small S this errs short: a packed
  trial trains faster while its neighbours validate, which they do far more often, relative to
  training, than at full scale (on the CPU check below it erred long, by the iteration count);
- with `--packed-rate R` (the summed it/s of the packed trials with the GPU full, from
  `throughput.py --packed N`): the driver's start, plus each trial's time outside its steady steps
  (start, CUDA graph capture, compile, validations, checkpoints) divided by the trials per device,
  plus the full-scale iterations at R. This is the GPU-bound projection; it errs long, since a
  trial's start and validations mostly overlap its neighbours' training.
The GPU-bound projection is also given with the iterations ASHA runs when it stops trials as
designed (all reach the first rung, 1/factor of them the next, ...): a floor. A scaled search runs
more (early trials pass rungs against few rivals; on the CPU a 1/50-scale search ran a fifth more
iterations than a 1/10-scale one, README "Checking the search's projection"), and the floor takes
the device as full to the end, where fewer trials are left than fit on it.
`--from-json FILE` recomputes the projections of a saved result (e.g. with another --packed-rate).
`--to-scale T` projects to scale T (from the run's own scale up to 1) instead of the full scale: a
small-scale run projected to the scale of a larger one that was measured checks the projections.

The search's own output goes to `--log` (default: the JSON's name with `.log`), with a progress line
here every `--progress` seconds. `--time-limit S` stops the search (as Ctrl-C would) S seconds after
this script started, gives its trials `--stop-grace` seconds to end, then kills what is left of it,
and still writes what the trials reported by then, marked `"finished": false`, without projections,
and exits 1: a device call that runs out of time keeps how far the search got. Ctrl-C or SIGTERM
(`timeout`) here do the same, exiting 130.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cli as cli  # noqa: E402
from throughput import bench_config  # noqa: E402

from raysemi.config import save_yaml  # noqa: E402
from raysemi.errors import UserError  # noqa: E402
from raysemi.search_budget import rungs, wall_iterations  # noqa: E402

STARTED = time.time()  # --time-limit counts from here, the imports included


def check_search(args) -> None:
    """What the search would refuse, said before its output folder and log are made: the data, and
    the settings whose limits do not depend on the cluster (the search checks the rest: its refusal
    comes back as this script's one error line)."""
    cli.check_data(args.data)
    if args.grace_period > args.iterations:
        raise UserError(f"--grace-period: {args.grace_period} is invalid; expected at most --iterations "
                        f"({args.iterations}): ASHA may stop a trial only before it ends")
    if args.device == "cuda" and args.gpus_per_trial > 1:
        raise UserError(f"--gpus-per-trial: {args.gpus_per_trial:g} is invalid; expected at most 1 (the search "
                        "runs on one GPU)")
    if args.device == "cpu" and args.cuda_graphs == "on":
        raise UserError("--cuda-graphs: on with --device cpu; expected auto or off (CUDA graphs need CUDA)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: cuda, but torch {torch.__version__} here sees no CUDA device; expected "
                        "--device cpu")


def run_search(args, tmp: Path, log: Path) -> dict:
    iterations = max(1, round(args.iterations * args.scale))
    grace = max(1, round(args.grace_period * args.scale))
    interval = max(1, round(args.eval_interval * args.scale))
    gpus = 1 if args.device.startswith("cuda") else 0
    base = bench_config("mean_teacher", args, eval_interval=interval, log_interval=min(100, interval),
                        max_iterations=iterations, compile="on" if args.compile else "off")
    base.device = "auto"
    save_yaml(base, tmp / "base.yaml")
    cmd = [sys.executable, "-m", "raysemi.search", "--method", "mean_teacher", "--config", str(tmp / "base.yaml"),
           "--num-samples", str(args.trials), "--max-iterations", str(iterations), "--eval-interval", str(interval),
           "--grace-period", str(grace), "--reduction-factor", str(args.reduction_factor), "--seed", str(args.seed),
           "--gpus", str(gpus), "--cpus-per-trial", str(args.cpus_per_trial), "--storage", str(tmp / "runs"),
           "--name", "wall", "--experiment", "search-wall", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
    cmd += ["--gpus-per-trial", str(args.gpus_per_trial)] if gpus else ["--num-cpus", str(args.num_cpus)]
    cmd += ["--no-reuse-actors"] if args.no_reuse_actors else []
    runs = tmp / "runs" / "wall"
    t0 = time.time()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = STARTED + args.time_limit if args.time_limit is not None else None
        stopped = watch(proc, runs, t0, deadline, args.stop_grace, args.progress)
    wall = time.time() - t0
    finished = stopped is None
    refused = cli.search_refusal(proc.returncode, log.read_text(errors="replace")) if finished else None
    if refused:
        raise refused
    if finished and proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"search failed (exit {proc.returncode}); its output is in {log}; its end:\n{tail}")
    trials = account(reported(runs), args.scale, args.to_scale)
    if finished and not trials:
        raise SystemExit(f"the search ended without a trial report; its output is in {log}")
    # the driver's own start (Ray, MLflow, data into the object store), until the first trial starts
    # (Ray's report timestamps are whole seconds: up to 1 s short)
    startup = min(t["start_unix"] for t in trials) - t0 if trials else None
    done = sum(t["iterations"] for t in trials)
    return {"command": " ".join(cmd[1:]), "finished": finished, "stopped_by": stopped, "wall_s": wall,
            "startup_s": startup, "trials": trials, "iterations_total": done,
            "reuse_actors": not args.no_reuse_actors, **workers(trials),
            "completed": sum(t["iterations"] == iterations for t in trials),
            # unfinished, a trial short of the iterations may still have been running
            "stopped_early": sum(t["iterations"] < iterations for t in trials) if finished else None,
            "trial_iterations": iterations,
            "grace_period": grace, "eval_interval": interval, "search_it_per_s": done / wall,
            "trial_seconds_measured": sum(t["seconds"] for t in trials),
            "trial_seconds_projected": sum(t["projected_seconds"] for t in trials),
            "eval_seconds": sum(t["eval_s"] for t in trials)}


class Terminated(Exception):
    """SIGTERM reached this script (`timeout`, a job scheduler)."""


def _terminated(signum, frame):
    raise Terminated


def watch(proc: subprocess.Popen, runs: Path, t0: float, deadline: float | None, grace: float,
          every: float) -> str | None:
    """Wait for the search (in its own process session), printing how far its trials got every
    `every` seconds. Past `deadline`, or on Ctrl-C or SIGTERM here, stop it (`stop`). None if the
    search ended by itself, else what stopped it."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    shown = t0
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.time()
            if deadline is not None and now > deadline and proc.poll() is None:
                print(f"[search_wall] {now - t0:.0f} s: past --time-limit; stopping the search", flush=True)
                stop(proc, grace)
                return "time limit"
            if now - shown >= every:
                shown = now
                trials = reported(runs)
                print(f"[search_wall] {now - t0:.0f} s: {len(trials)} trials reported, "
                      f"{sum(t['iterations'] for t in trials):,} iterations", flush=True)
    except (KeyboardInterrupt, Terminated) as err:
        why = "Ctrl-C" if isinstance(err, KeyboardInterrupt) else "SIGTERM"
        print(f"[search_wall] {why}: stopping the search", flush=True)
        stop(proc, grace)
        return why
    finally:
        signal.signal(signal.SIGTERM, previous)
    stop(proc, 0)  # it ended: what it left running (Ray's processes in its group) goes too
    return None


def stop(proc: subprocess.Popen, grace: float) -> None:
    """Stop the search as Ctrl-C does (its trials end, MLflow marks them KILLED), wait up to `grace`
    seconds for it, then kill whatever is left of its process group (the driver, Ray's workers)."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def reported(runs: Path) -> list[dict]:
    """The accounts of the trials that have reported so far."""
    trials = [trial_times(result) for result in sorted(runs.glob("*/result.json"))]
    return [t for t in trials if t is not None]


def trial_times(result: Path) -> dict | None:
    """One trial's seconds from its reports: in all, in training steps (capture and compile
    included), in validations, and the steady rate of its steps after the first report. A line
    still being written (the search running) is left out."""
    reports = []
    for line in result.read_text().splitlines():
        try:
            reports.append(json.loads(line))
        except ValueError:
            continue
    if not reports:
        return None
    first, last = reports[0], reports[-1]
    d_it = last["iteration"] - first["iteration"]
    d_train = last.get("time_train_s", 0.0) - first.get("time_train_s", 0.0)
    seconds = last["time_total_s"]
    return {"trial": result.parent.name, "iterations": last["iteration"], "reports": len(reports),
            "pid": first.get("pid"), "worker": f"{first.get('hostname')}:{first.get('pid')}",
            "start_unix": last["timestamp"] - seconds, "end_unix": last["timestamp"],
            "seconds": seconds, "train_s": last.get("time_train_s", 0.0),
            "eval_s": last.get("time_eval_s", 0.0),
            "steady_it_per_s": d_it / d_train if d_it > 0 and d_train > 0 else None}


def slot_gaps(trials: list[dict]) -> list[float]:
    """For each trial that started after another had ended: the seconds from the last end before
    its start to its start, i.e. how long a freed slot took to start its next trial (Tune's
    scheduling plus, without actor reuse, a new worker's process start, imports and data fetch;
    outside every trial's own seconds). Report times are whole seconds (an end is up to 1 s
    early, a start up to 1 s early too): an end up to 1 s after a start counts as before it, and
    the gap is at least 0, so each gap is +-1 s."""
    gaps = []
    for t in trials:
        before = [o["end_unix"] for o in trials if o is not t and o["end_unix"] <= t["start_unix"] + 1]
        if before:
            gaps.append(max(0.0, t["start_unix"] - max(before)))
    return gaps


def workers(trials: list[dict]) -> dict:
    """What the trials' worker processes cost: how many there were, how long a freed slot took to
    start its next trial (`slot_gaps`), and the seconds outside the steady steps (start, capture,
    compile, validations) of a worker's first trial against those of its later ones (with actor
    reuse: no process start, compiled code already in memory). Needs the trials' accounts."""
    seen: set = set()
    first, later = [], []
    for t in sorted(trials, key=lambda t: t["start_unix"]):
        worker = t.get("worker", t["pid"])  # host:pid (pids repeat across nodes); a pid in older results
        (later if worker in seen else first).append(t["seconds"] - t["steps_s"])
        seen.add(worker)
    gaps = slot_gaps(trials)
    return {"workers": len(seen), "slot_gaps_s": gaps, "slot_gap_median_s": statistics.median(gaps) if gaps else None,
            "outside_steps_first_in_worker_s": statistics.mean(first) if first else None,
            "outside_steps_later_in_worker_s": statistics.mean(later) if later else None}


def account(trials: list[dict], scale: float, to_scale: float = 1.0) -> list[dict]:
    """Each trial's steps alone (`steps_s`: its iterations at its steady rate; the rest of its
    training seconds is capture and compile) and its projected seconds at scale `to_scale` (the
    full scale: 1), where only the steps take to_scale/scale as long. A trial with one report has
    no steady rate of its own: it takes the median of the others'."""
    rates = sorted(t["steady_it_per_s"] for t in trials if t["steady_it_per_s"])
    median = rates[len(rates) // 2] if rates else None
    for t in trials:
        rate = t["steady_it_per_s"] or median
        t["steps_s"] = min(t["iterations"] / rate, t["train_s"]) if rate else t["train_s"]
        t["projected_seconds"] = t["seconds"] - t["steps_s"] + t["steps_s"] * to_scale / scale
    return trials


def designed_iterations(trials: int, iterations: int, grace: int, factor: float, eval_interval: int) -> float:
    """The iterations of a search whose ASHA stops trials as designed: every trial reaches the
    first rung, 1/factor of them the next, and so on to the end (at least one trial at each);
    the CPU budget warning's count with one slot, which runs every trial's iterations in a row."""
    return wall_iterations(trials, 1, rungs(iterations, grace, factor, eval_interval), factor)


def projections(r: dict, settings: dict, per_device: float, packed_rate: float | None, to_scale: float) -> dict:
    """The wall-time projections of a scaled search run with `settings` (this script's arguments)
    to scale `to_scale` (see the module's docstring); the keys say "full" for that scale, which is
    1 unless --to-scale says otherwise."""
    steps = sum(t["steps_s"] for t in r["trials"])
    at = to_scale / settings["scale"]  # the target scale's iterations per iteration run here
    # the designed stops at the target scale, its trials and rungs rounded as run_search rounds them
    iterations, grace, interval = (max(1, round(settings[k] * to_scale))
                                   for k in ("iterations", "grace_period", "eval_interval"))
    designed = designed_iterations(settings["trials"], iterations, grace, settings["reduction_factor"], interval)
    out = {"to_scale": to_scale, "full_scale_iterations": r["iterations_total"] * at,
           "designed_iterations": designed, "projected_full_wall_packed_designed_s": None,
           "outside_steps_s": r["trial_seconds_measured"] - steps, "trials_per_device": per_device,
           "projected_full_wall_s": r["startup_s"] + (r["wall_s"] - r["startup_s"]) * r["trial_seconds_projected"]
           / r["trial_seconds_measured"], "packed_rate": packed_rate, "projected_full_wall_packed_s": None}
    if packed_rate:
        out["projected_full_wall_packed_s"] = (r["startup_s"] + out["outside_steps_s"] / per_device
                                               + out["full_scale_iterations"] / packed_rate)
        out["projected_full_wall_packed_designed_s"] = (r["startup_s"] + out["outside_steps_s"] / per_device
                                                        + designed / packed_rate)
    return out


def read_result(path: str, p: argparse.ArgumentParser, to_scale: float = 1.0) -> dict:
    """A result this script wrote; a missing file or one without the trials' accounts is a usage error."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        p.error(f"--from-json: {path}: cannot be read as JSON ({err})")
    need = ("args", "trials", "startup_s", "wall_s", "iterations_total", "trial_seconds_measured")
    missing = [k for k in need if k not in report] + [
        f"trials[].{k}" for k in ("iterations", "seconds", "train_s", "steady_it_per_s")
        if any(k not in t for t in report.get("trials", []))]
    if report.get("finished") is False:
        p.error(f"--from-json: {path}: finished: false; expected a search that finished (this one was stopped "
                f"by {report.get('stopped_by') or 'its --time-limit'}, so its trials' accounts are partial)")
    if missing:
        p.error(f"--from-json: {path}: {missing[0]}: missing; expected a result of this script "
                "(one written before the trials reported their seconds cannot be projected)")
    report["trials"] = account(report["trials"], report["args"]["scale"], to_scale)
    report["trial_seconds_projected"] = sum(t["projected_seconds"] for t in report["trials"])
    return report


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--data", default="phantom", help="dataset root in the SSL4MIS layout, or 'phantom'")
    p.add_argument("--labeled-patients", type=int, default=7, help="patients whose labels are used")
    p.add_argument("--size", type=int, default=256, help="patch size (square, a multiple of 16)")
    p.add_argument("--batch-size", type=int, default=24, help="slices per batch (half labeled)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the trials train")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="bf16 autocast ('auto': on for CUDA, off for CPU)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                   help="capture each iteration as a CUDA graph ('auto': on for CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="compile: on in every trial (without it: off, at every scale; a plain raysemi.search "
                        "compiles CUDA trials of 10,000 iterations or more, compile: auto)")
    p.add_argument("--trials", type=int, default=32, help="trials of the search (its --num-samples)")
    p.add_argument("--iterations", type=int, default=10000, help="iterations per trial at full scale")
    p.add_argument("--grace-period", type=int, default=2500, help="ASHA's grace period at full scale")
    p.add_argument("--eval-interval", type=int, default=500, help="evaluation (and report) interval at full scale")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA's reduction factor")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full-scale iterations to run")
    p.add_argument("--gpus-per-trial", type=float, default=0.25, help="GPU share of a CUDA trial (0.25: 4 per GPU)")
    p.add_argument("--cpus-per-trial", type=int, default=2, help="CPUs each trial reserves")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray for CPU trials")
    p.add_argument("--seed", type=int, default=1, help="the search's seed (TPE's and the trials')")
    p.add_argument("--no-reuse-actors", action="store_true",
                   help="start every trial in a new worker process (the search's own flag), to measure what "
                   "reuse saves")
    p.add_argument("--packed-rate", type=float, default=None, metavar="R",
                   help="summed it/s of packed trials with the device full (throughput.py --packed N), "
                        "for the GPU-bound projection")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="recompute the projections of a saved result instead of running a search")
    p.add_argument("--to-scale", type=float, default=1.0, metavar="T",
                   help="project to this scale instead of the full one (1), e.g. the scale of a larger run to "
                        "check the projections against")
    p.add_argument("--out", default="benchmarks/results/search_wall.json", help="the JSON written")
    p.add_argument("--log", default=None, metavar="FILE",
                   help="where the search's own output goes (default: --out with the suffix .log)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop the search S seconds after this script started and write what its trials "
                        "reported (exit 1)")
    p.add_argument("--stop-grace", type=float, default=30, metavar="S",
                   help="seconds a stopped search has to end its trials before it is killed")
    p.add_argument("--progress", type=float, default=30, metavar="S", help="seconds between progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cli.at_least(args, labeled_patients=1, batch_size=2, trials=1, iterations=1, grace_period=1, eval_interval=1,
                 cpus_per_trial=1, num_cpus=1)
    cli.above(args, reduction_factor=1, gpus_per_trial=0, packed_rate=0, progress=0)
    cli.patch_size(args.size)
    if not 0 < args.scale <= 1:
        p.error(f"--scale: {args.scale} is invalid; expected a fraction in (0, 1]")
    if not 0 < args.to_scale <= 1:
        p.error(f"--to-scale: {args.to_scale} is invalid; expected a fraction in (0, 1]")
    if not args.from_json and args.to_scale < args.scale:
        p.error(f"--to-scale: {args.to_scale:g} is invalid; expected a fraction from --scale ({args.scale:g}) up to 1")
    if args.time_limit is not None and args.time_limit <= 0:
        p.error(f"--time-limit: {args.time_limit:g} is invalid; expected seconds > 0")
    if args.stop_grace < 0:
        p.error(f"--stop-grace: {args.stop_grace:g} is invalid; expected seconds >= 0")
    cli.check_out(args.out)
    if args.from_json:
        report = read_result(args.from_json, p, args.to_scale)
        saved = report["args"]
        per_device = 1 / saved["gpus_per_trial"] if saved["device"] == "cuda" else saved["num_cpus"] / saved["cpus_per_trial"]
        if args.to_scale < saved["scale"]:
            p.error(f"--to-scale: {args.to_scale:g} is invalid; expected the scale of {args.from_json} "
                    f"({saved['scale']:g}) up to 1")
        report.update(projections(report, saved, per_device, args.packed_rate, args.to_scale))
        if report["trials"] and all("pid" in t for t in report["trials"]):  # results before the pids have none
            report.update(workers(report["trials"]))
        report["projection_command"] = " ".join([Path(sys.executable).name] + sys.argv)
        saved_trials, device = saved["trials"], report["machine"]["device"]
        share = (f"{saved['gpus_per_trial']:g} GPU per trial" if saved["device"] == "cuda"
                 else f"{saved['cpus_per_trial']} CPU per trial")
        factor = saved["reduction_factor"]
    else:
        check_search(args)
        log = Path(args.log or Path(args.out).with_suffix(".log"))
        cli.check_out(log, "--log")
        made = [d for d in (log.parent, *log.parent.parents) if not d.exists()]
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"the search's output: {log}", flush=True)
        try:
            # a stopped search's killed workers may still be going away while the folder is removed
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
                r = run_search(args, Path(tmp), log)
        except UserError:  # the search refused its settings: nothing ran, nothing is kept
            log.unlink(missing_ok=True)
            for folder in made:
                folder.rmdir()
            raise
        device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
        per_device = 1 / args.gpus_per_trial if args.device == "cuda" else args.num_cpus / args.cpus_per_trial
        report = {"date": time.strftime("%Y-%m-%d"), "machine": {"platform": platform.platform(), "device": device},
                  "args": vars(args), "benchmark_command": " ".join([Path(sys.executable).name] + sys.argv), **r}
        if not r["finished"]:
            return write_unfinished(report, args, device)
        report.update(projections(r, vars(args), per_device, args.packed_rate, args.to_scale))
        saved_trials, factor = args.trials, args.reduction_factor
        share = f"{args.gpus_per_trial:g} GPU per trial" if args.device == "cuda" else f"{args.cpus_per_trial} CPU per trial"
    r = report
    print(f"{saved_trials} mean-teacher trials of {r['trial_iterations']} iterations (ASHA grace {r['grace_period']}, "
          f"factor {factor:g}, {share}) on {device}:")
    packed = r["projected_full_wall_packed_s"]
    print(f"{'wall s':>9}{'start-up s':>12}{'iterations':>12}{'completed':>11}{'stopped':>9}{'it/s':>9}"
          f"{'projected full-scale wall' if args.to_scale == 1 else f'projected wall, scale {args.to_scale:g}':>27}"
          f"{'at the packed rate':>20}")
    print(f"{r['wall_s']:>9.0f}{r['startup_s']:>12.0f}{r['iterations_total']:>12}{r['completed']:>11}"
          f"{r['stopped_early']:>9}{r['search_it_per_s']:>9.1f}{r['projected_full_wall_s'] / 60:>23.1f} min"
          + (f"{packed / 60:>16.1f} min" if packed else f"{'(no --packed-rate)':>20}"))
    if packed:
        print(f"at the packed rate with ASHA stopping trials as designed, a floor: "
              f"{r['projected_full_wall_packed_designed_s'] / 60:.1f} min ({r['designed_iterations']:,.0f} "
              f"iterations against the {r['full_scale_iterations']:,.0f} this search's count projects)")
    if "workers" in r:
        reuse = {True: "on", False: "off"}.get(r.get("reuse_actors"), "not recorded")
        later = r["outside_steps_later_in_worker_s"]
        print(f"{r['workers']} worker processes for {len(r['trials'])} trials (actor reuse {reuse}); outside its "
              f"steady steps a worker's first trial spent {r['outside_steps_first_in_worker_s']:.1f} s"
              + (f", a later one {later:.1f} s" if later is not None else "") + " (means)"
              + (f"; a freed slot started its next trial after {statistics.mean(r['slot_gaps_s']):.1f} s (mean of "
                 f"{len(r['slot_gaps_s'])}; whole-second report times)" if r["slot_gaps_s"] else ""))
    write(report, args.out)
    return 0


def write_unfinished(r: dict, args: argparse.Namespace, device: str) -> int:
    """A search stopped (--time-limit, Ctrl-C, SIGTERM): what its trials reported by then, no
    projection (the trials still running would count as stopped early)."""
    start = f"its first trial started after {r['startup_s']:.0f} s" if r["startup_s"] is not None else "no trial reported"
    why = (f"did not finish within --time-limit {args.time_limit:g} s" if r["stopped_by"] == "time limit"
           else f"was stopped by {r['stopped_by']}")
    print(f"the search of {args.trials} trials on {device} {why}; it ran {r['wall_s']:.0f} s with its stop; {start}; "
          f"{len(r['trials'])} trials reported, {r['completed']} of them completed, "
          f"{r['iterations_total']:,} iterations; no projection")
    write(r, args.out)
    return 1 if r["stopped_by"] == "time limit" else 130


def write(report: dict, path: str) -> None:
    print(f"written: {cli.write_json(path, report)}")


if __name__ == "__main__":
    cli.run(main)

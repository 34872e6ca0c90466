"""`python -m raysemi.search`: Ray Tune + Optuna (TPE) + ASHA over one strategy or several,
every trial logged to MLflow as a nested run of the search.

    python -m raysemi.search --method mean_teacher --gpus 4
    python -m raysemi.search --method all --num-samples 64 --seeds 2 --data data/ACDC
    python -m raysemi.search --method mt,ict,dan --gpus 1 --gpus-per-trial 0.25
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from raysemi.config import TrainConfig, add_config_arguments, load_yaml, resolve_with_sources, save_yaml
from raysemi.errors import ArgumentParser, UserError, run_cli

#: config fields the search sets through its own options
OWN = ("method", "data", "labeled_patients", "max_iterations", "eval_interval", "seed", "tracking_uri",
       "experiment", "device", "output", "run_name")
STATE_FILE = "raysemi_search.json"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.search", description=(
        "Search the hyperparameters of one strategy (or several, and the strategy itself) with Ray Tune: "
        "Optuna's TPE proposes configs, ASHA stops weak trials early on validation Dice. Without --data it "
        "runs on the built-in phantom. Ends with a leaderboard, best_config.yaml (accepted by "
        "python -m raysemi.train --config), the best checkpoint and plots, in the search folder and in MLflow. "
        "A new search on CPUs that may be long first times a training step and says how long it takes."))
    s = p.add_argument_group("search")
    s.add_argument("--method", default="mean_teacher",
                   help="a strategy, a comma-separated list (mt,ict,dan) or 'all' (then the strategy is searched too)")
    s.add_argument("--data", default=None, help="dataset root in the SSL4MIS ACDC layout, or 'phantom'; "
                   "on a cluster, read by the driver only (trials get it through Ray's object store); default: --config's, "
                   "else the phantom")
    s.add_argument("--labeled-patients", type=int, default=None, help="labeled training patients (default: config's 7)")
    s.add_argument("--num-samples", type=int, default=16, help="configs to try")
    s.add_argument("--max-iterations", type=int, default=None, help="iterations per trial (default: config's)")
    s.add_argument("--eval-interval", type=int, default=None, help="validate (and report to ASHA) every N iterations")
    s.add_argument("--seeds", type=int, default=1, help="train each sampled config with K seeds; score the mean")
    s.add_argument("--search-space", default=None, help="YAML of field -> distribution for one strategy, or a "
                   "folder of <strategy>.yaml (its name or alias: mean_teacher.yaml or mt.yaml; a strategy without "
                   "its file there keeps the shipped space; default: the shipped search_spaces/)")
    s.add_argument("--grace-period", type=int, default=None, help="ASHA: iterations before a trial can be stopped "
                   "(default: a quarter of --max-iterations, at least one evaluation)")
    s.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep the top 1/factor at each rung")
    s.add_argument("--start-at-defaults", action="store_true",
                   help="run each strategy's base config first: its searched fields at the values of --config "
                        "and the field flags (the reference defaults where neither is given), so the leaderboard "
                        "shows what the search gained over them and TPE starts from a known-good point; a base "
                        "value outside its space is sampled instead, and said; counts within --num-samples")
    s.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial (from its checkpoint)")
    s.add_argument("--seed", type=int, default=None, help="seed of the sampler and of the trials' training "
                   "(default: --config's seed, else 1337)")
    r = p.add_argument_group("resources")
    r.add_argument("--gpus", type=float, default=None, help="GPUs to use in total (default: all visible; 0: CPU trials)")
    r.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial; fractions share a GPU (default: 1)")
    r.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs per trial")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    r.add_argument("--no-reuse-actors", action="store_true", help="start every trial in a new Ray worker process "
                   "(default: a worker whose trial ended takes the next trial, which skips the process start, the "
                   "imports, the CUDA context and, under compile, the compiling; results are the same)")
    r.add_argument("--address", default=None, help="join a running Ray cluster ('auto' or HOST:PORT; default: "
                   "$RAY_ADDRESS, else a local Ray)")
    t = p.add_argument_group("tracking and storage")
    t.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--experiment", default="raysemi-search", help="MLflow experiment")
    t.add_argument("--name", default=None, help="search name (default: search-<methods>-<time>); rerunning with the "
                   "same name continues it")
    t.add_argument("--storage", default="runs", help="Tune's storage path; the search folder is STORAGE/NAME")
    t.add_argument("--resume", action="store_true", help="continue an interrupted search (needs --name); the "
                   "search's own saved settings are used, not the other flags")
    p.add_argument("--config", metavar="BASE.yaml", help="fixed values for everything not searched")
    add_config_arguments(p, skip=OWN)
    return p


def resolve_methods(spec: str, option: str = "--method") -> list[str]:
    """`--method`'s strategies as canonical names; UserError naming `option` for an unknown or no name."""
    from raysemi.methods import resolve_method_list

    try:
        return resolve_method_list(spec)
    except KeyError as err:
        raise UserError(f"{option}: {err.args[0]}") from None
    except ValueError as err:
        raise UserError(f"{option}: {err}") from None


def base_config(args, methods: list[str]) -> TrainConfig:
    """--config < config flags < the search's own options; validated for every searched strategy,
    so that a setting no trial could run with is refused before Ray starts."""
    from raysemi.loop import build_strategy

    own = {k: getattr(args, k) for k in ("data", "seed", "labeled_patients", "max_iterations", "eval_interval")
           if getattr(args, k) is not None}
    cfg, sources = resolve_with_sources(args, args.config, exclude=OWN, extra=own)
    for m in methods:
        checked = cfg.replace(method=m).validate(source=sources)
        build_strategy(checked, source=f"{m}")
    return cfg.validate(source=sources)


def check_resources(args, cluster: dict[str, float], nodes: list[dict] | None = None) -> tuple[float, float, int]:
    """(gpus, gpus_per_trial, max concurrent trials); clear errors instead of a search that waits.
    With `nodes` (ray.nodes()), a trial must also fit on one node, and concurrency counts per node."""
    available = float(cluster.get("GPU", 0))
    gpus = available if args.gpus is None else float(args.gpus)
    if gpus < 0:
        raise UserError(f"--gpus: {args.gpus} is invalid; expected 0 or more")
    if gpus > available:
        raise UserError(f"--gpus: {args.gpus:g} asked, but the Ray cluster has {available:g} GPUs; "
                        "expected at most that many (use --gpus 0 for CPU trials)")
    per = (1.0 if gpus >= 1 else gpus) if args.gpus_per_trial is None else float(args.gpus_per_trial)
    if gpus == 0:
        per = 0.0
    if per < 0 or (gpus > 0 and per == 0):
        raise UserError(f"--gpus-per-trial: {per:g} is invalid; expected a number > 0 when --gpus is {gpus:g}")
    if per > gpus:
        raise UserError(f"--gpus-per-trial: {per:g} is more than --gpus {gpus:g}; no trial could ever start")
    if per > 1 and per != int(per):
        raise UserError(f"--gpus-per-trial: {per:g}; expected a fraction of one GPU or a whole number")
    cpus = float(cluster.get("CPU", 1))
    if args.cpus_per_trial < 1 or args.cpus_per_trial > cpus:
        raise UserError(f"--cpus-per-trial: {args.cpus_per_trial} is invalid; expected 1 to {cpus:g} (the cluster's CPUs)")
    from raysemi.cluster import largest_node, trial_slots, trials_on_gpus

    by_cpu = int(cpus // args.cpus_per_trial)
    concurrency = min(by_cpu, trials_on_gpus(gpus, per)) if per > 0 else by_cpu
    if nodes:
        slots = trial_slots(nodes, args.cpus_per_trial, per)
        if slots == 0:
            raise UserError(f"--cpus-per-trial {args.cpus_per_trial} --gpus-per-trial {per:g}: a trial runs on one "
                            f"node, but no node has that many (the largest has {largest_node(nodes)}); expected "
                            "at most what one node has")
        concurrency = min(concurrency, slots)
    return gpus, per, max(1, concurrency)


def asha_grace(args, base: TrainConfig) -> int:
    """ASHA's grace period: --grace-period, else a quarter of the trial, at least one evaluation."""
    return min(args.grace_period or max(base.eval_interval, base.max_iterations // 4), base.max_iterations)


def print_cpu_estimate(args, base: TrainConfig, methods: list[str], dataset, concurrency: int) -> None:
    """How long a CPU search that may be long takes: its strategies' steps timed where trials run,
    then one line (a warning over an hour). Ctrl-C here leaves nothing behind; a step that cannot
    be timed costs the estimate only."""
    from raysemi.search_budget import ENOUGH_S, enough_timed, estimate_line, looks_long, time_steps

    sizes = dict(num_samples=args.num_samples, seeds=args.seeds, concurrency=concurrency, threads=args.cpus_per_trial)
    if not looks_long(base, methods, **sizes):
        return
    import ray

    asha = dict(grace=asha_grace(args, base), reduction_factor=args.reduction_factor)
    what = "one training step" if len(methods) == 1 else (
        f"one training step of each of the {len(methods)} strategies (fewer once those timed put the search over "
        f"{ENOUGH_S / 3600:g} hours)")
    print(f"timing {what} on a CPU where trials run, to estimate the search's time ...", flush=True)
    enough = enough_timed(base, methods, num_samples=args.num_samples, seeds=args.seeds, concurrency=concurrency,
                          **asha)
    try:
        steps, node = time_steps(base, methods, dataset, args.cpus_per_trial, enough)
    except Exception as err:  # noqa: BLE001 - the search itself may still work; say why, go on
        cause = getattr(err, "cause", None) or err  # a Ray task's error: the error raised in it
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"warning: no time estimate: a training step could not be timed ({type(cause).__name__}: {first})",
              flush=True)
        return
    where = "this machine" if node == ray.util.get_node_ip_address() else f"node {node}"
    print(estimate_line(base, steps, where=where, methods=methods, **asha, **sizes), flush=True)


def sortable_by_best(trials) -> bool:
    """Whether Tune can sort the ended trials by BEST: it cannot compare a missing value, which a
    trial of a search started by an older version and continued lacks (then Tune's order stays)."""
    from raysemi.trainable import BEST

    return all(BEST in t.last_result for t in trials if t.status == "TERMINATED" and t.last_result)


def with_best_params(text: str, trials) -> str:
    """Tune's "Current best trial" line lists the parameter columns only (the strategy: sampled
    values cannot be columns, see `params`): give it the trial's own sampled values instead."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("Current best trial: ") and " and parameters=" in line:
            trial_id = line[len("Current best trial: "):].split(" ", 1)[0]
            trial = next((t for t in trials if t.trial_id == trial_id), None)
            result = (trial.last_result or {}) if trial is not None else {}
            if result.get("params"):
                values = f"method={result['method']}, {result['params']}" if result.get("method") else result["params"]
                lines[i] = f"{line.split(' and parameters=', 1)[0]} and parameters: {values}"
    return "\n".join(lines)


def progress_reporter(**kwargs):
    """Tune's progress table, with its "Current best trial" and row order by each trial's best Dice
    so far (BEST), as the leaderboard ranks; Tune's default would read the last value, and the
    search's own metric (the last Dice, which ASHA compares) would replace the reporter's."""
    from ray import tune

    from raysemi.trainable import BEST

    class BestSoFarReporter(tune.CLIReporter):
        def set_search_properties(self, metric, mode) -> bool:
            return True  # keep BEST

        def _progress_str(self, trials, *args, **kwargs):
            self._sort_by_metric = sortable_by_best(trials)
            return with_best_params(super()._progress_str(trials, *args, **kwargs), trials)

    return BestSoFarReporter(metric=BEST, mode="max", **kwargs)


#: what a search saves at its start and keeps when continued, whatever the flags then say
SAVED = ("method", "data", "labeled_patients", "num_samples", "max_iterations", "eval_interval", "seeds",
         "search_space", "seed", "config", "experiment", "start_at_defaults")
#: kept too when Tune restores its own state (its scheduler, failure and actor-reuse settings are part of it)
RESTORED = ("grace_period", "reduction_factor", "max_failures", "no_reuse_actors")


def given_flags(parser: ArgumentParser, argv: list[str]) -> list[str]:
    """The destinations of the flags typed on the command line, in order (a flag given with its
    default value counts too)."""
    dests: list[str] = []
    for token in argv:
        action = parser._option_string_actions.get(str(token).split("=", 1)[0])
        if action is not None and action.dest not in dests:
            dests.append(action.dest)
    return dests


def ignored_on_resume(given: list[str], restored: bool) -> list[str]:
    """The typed flags a continued search ignores: its saved settings, any config field, and
    (when Tune restores its state) ASHA's and the retries' settings."""
    from raysemi.config import FIELDS

    kept = SAVED + (RESTORED if restored else ())
    return ["--" + d.replace("_", "-") for d in given if d in kept or (d in FIELDS and d not in OWN)]


def check_local_resources(args) -> None:
    """On this machine's own Ray (no --address), --gpus and --cpus-per-trial are checked against
    what it has before the data is loaded; on a cluster, `check_resources` does it once joined."""
    if args.address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    here = torch.cuda.device_count()
    if args.gpus is not None and args.gpus > here:
        raise UserError(f"--gpus: {args.gpus:g} asked, but this machine has {here} GPU{'' if here == 1 else 's'}; "
                        "expected at most that many (use --gpus 0 for CPU trials)")
    cpus = args.num_cpus or os.cpu_count() or 1
    if args.cpus_per_trial > cpus:
        raise UserError(f"--cpus-per-trial: {args.cpus_per_trial} is invalid; expected 1 to {cpus} (the CPUs "
                        f"{'given to --num-cpus' if args.num_cpus else 'of this machine'})")


def start_ray(args) -> dict[str, float]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic table, with our columns
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        from raysemi.cluster import join

        join(address)
    else:
        import torch

        ray.init(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, logging_level="ERROR")
    return ray.cluster_resources()


def load_saved_search(exp_dir: Path) -> dict | None:
    """The settings a search saved at its start, when `exp_dir` holds one that can continue."""
    state = exp_dir / STATE_FILE
    if not state.is_file() or not (exp_dir / "base_config.yaml").is_file():
        return None
    try:
        return json.loads(state.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{state}: not valid JSON; the search folder is damaged") from None


def finished_trials(exp_dir: Path) -> int:
    """Trials that ended (completed, stopped or failed), as Tune saved its state at the end of fit().
    Not `ResultGrid.num_terminated`: on Ctrl-C Tune saves the running trials as running (so that
    --resume continues them), then marks them terminated in memory as it stops them."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(exp_dir)).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def resume_command(args, name: str, storage: Path) -> str:
    """What continues this search; on a cluster joined with --address, that address too."""
    return (f"python -m raysemi.search --name {name} --storage {storage} --resume"
            + (f" --address {args.address}" if args.address else ""))


def store_failure(err: BaseException) -> BaseException | None:
    """The MLflow or connection error (OSError: refused, reset, a full disk) behind a failure of
    the search's driver, following the chain as Python prints it (Tune wraps a callback's error in
    TuneError; Ray re-raises some unwrapped), or None: then it is a bug, to be shown whole."""
    from mlflow.exceptions import MlflowException

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (MlflowException, OSError)):
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def stopped_by_error(err: BaseException, args, uri: str, parent, exp_dir: Path, name: str, storage: Path) -> int:
    """The search stopped because its driver could not write to MLflow (Tune's callbacks log every
    trial there) or to disk: one line with the cause and the command that continues it (Tune
    saved its state; finished trials are kept), exit 1, then a best-effort record of it in the
    parent run, which may fail (or retry for minutes) the same way. Any other error is a bug:
    raised as it is, traceback and all."""
    import traceback

    from raysemi.tracking import end_interrupted_search, write_trial_run_map

    cause = store_failure(err)
    if cause is None:
        raise err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    why = f"{type(cause).__name__}: {lines[0] if lines else ''}"[:500]
    if args.debug:
        traceback.print_exception(err)
    print(f"error: the search stopped: {why}; its finished trials and Tune's state are kept in {exp_dir}; "
          f"once the cause is mended, continue with: {resume_command(args, name, storage)}", file=sys.stderr,
          flush=True)
    for record in (lambda: end_interrupted_search(uri, parent.run_id, {"stopped_by": why}),
                   lambda: write_trial_run_map(uri, parent.run_id, exp_dir / "mlflow_trial_runs.json")):
        try:  # each on its own: one failing must not skip the other
            record()
        except Exception:  # noqa: BLE001 - the store is what failed, most likely
            pass
    return 1


#: Optuna TPE's random trials before it proposes from results (TPESampler's n_startup_trials)
TPE_STARTUP = 10


def say_starting_points(spaces: dict, points: list[dict], left_out: list[str]) -> None:
    """--start-at-defaults' points (`base_points`), as the lines a user reads before the trials."""
    def said(point: dict) -> str:
        fields = [(k.split("/", 1)[1], v) for k, v in point.items() if k != "method"]
        return ", ".join(f"{name} {v:g}" if isinstance(v, float) else f"{name} {v}"
                         for name, v in fields) or "all sampled"

    print(f"first trial{'s' if len(points) > 1 else ''} at the base config: "
          + "; ".join(f"{m} ({said(p)})" for m, p in zip(spaces, points)), flush=True)
    for line in left_out:
        print(f"note: --start-at-defaults: {line}", flush=True)


def tpe_note(num_samples: int, concurrency: int, at_base: int = 0) -> str:
    """Said when TPE can propose few or none of the trials from finished ones: its first
    TPE_STARTUP trials are random, and the trials that start together see no result of each
    other. Such a search is (mostly) a random one, which is fine, but should be said. `at_base`:
    the first trials that --start-at-defaults fixes (they count among TPE's first ones)."""
    unguided = min(num_samples, max(TPE_STARTUP, concurrency))
    if num_samples - unguided >= num_samples // 2:
        return ""
    why = (f"the first {concurrency} start together, before any result" if concurrency > TPE_STARTUP else
           f"TPE's first {TPE_STARTUP} are")
    drawn = (f"{unguided - at_base} of the {num_samples} trials are drawn at random ({why}, the first {at_base} at "
             "the base config)" if at_base else f"{unguided} of the {num_samples} trials are drawn at random ({why})")
    return (f"{drawn}, {num_samples - unguided} proposed from finished ones; --num-samples "
            f"{2 * max(TPE_STARTUP, concurrency)} or more lets TPE guide most of them")


def trial_dirname(trial) -> str:
    """Short trial folder names: <strategy>_<trial id>."""
    return f"{trial.config.get('method', 'trial')}_{trial.trial_id}"


def check_parent_run(uri: str, run_id: str, saved_uri: str) -> None:
    """A continued search logs into its parent run and its trials' runs: refuse, before Ray starts,
    a tracking store that does not hold the parent (another --tracking-uri, or the run deleted)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        why = "was deleted" if run.info.lifecycle_stage == "deleted" else ""
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        why = "is not there"
    if why:
        raise UserError(f"--resume: the search's MLflow parent run {run_id} {why} in {uri}; expected the store it "
                        f"was started with ({saved_uri}): leave out --tracking-uri, or restore the run")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)
    for flag, value, ok in (("--num-samples", args.num_samples, args.num_samples >= 1),
                            ("--seeds", args.seeds, args.seeds >= 1),
                            ("--reduction-factor", args.reduction_factor, args.reduction_factor > 1),
                            ("--grace-period", args.grace_period, args.grace_period is None or args.grace_period >= 1),
                            ("--max-failures", args.max_failures, args.max_failures >= 0),
                            ("--cpus-per-trial", args.cpus_per_trial, args.cpus_per_trial >= 1),
                            ("--num-cpus", args.num_cpus, args.num_cpus is None or args.num_cpus >= 1),
                            ("--gpus", args.gpus, args.gpus is None or args.gpus >= 0),
                            ("--gpus-per-trial", args.gpus_per_trial, args.gpus_per_trial is None
                             or args.gpus_per_trial >= 0)):
        if not ok:  # the checks that need no cluster and no data, before either is touched
            raise UserError(f"{flag}: {value if isinstance(value, int) else f'{value:g}'} is invalid; expected "
                            + {"--reduction-factor": "a number > 1", "--max-failures": "an integer >= 0",
                               "--gpus": "0 or more", "--gpus-per-trial": "0 or more"}.get(flag, "an integer >= 1"))
    check_local_resources(args)
    if "://" in args.storage:
        raise UserError(f"--storage: {args.storage!r}: URIs are not supported; expected a folder, on a multi-node "
                        "cluster one that every node mounts at the same path (NFS, or a bucket mounted with a FUSE "
                        "driver such as s3fs or gcsfuse)")
    storage = Path(args.storage).expanduser().resolve()
    if args.resume and not args.name:
        raise UserError("--resume: expected --name of the search to continue")
    saved = load_saved_search(storage / args.name) if args.name else None
    if saved is not None:  # continuing: the search's own settings, whatever the other flags say
        if saved.get("finished"):
            raise UserError(f"--name: search {args.name!r} in {storage} is finished; choose another --name "
                            "(its results are in that folder)")
        methods, args.num_samples, args.seeds = saved["methods"], saved["num_samples"], saved["seeds"]
        args.start_at_defaults = saved.get("start_at_defaults", False)
        args.search_space, args.experiment = saved.get("search_space"), saved.get("experiment", args.experiment)
        base = load_yaml(storage / args.name / "base_config.yaml")
        print(f"continuing search {args.name!r} with its saved settings ({', '.join(methods)}, "
              f"{args.num_samples} samples, {base.max_iterations} iterations)", flush=True)

    elif args.resume:
        raise UserError(f"--resume: {storage / args.name} holds no search to continue; expected --name and "
                        f"--storage as the search was started with (--storage is {args.storage!r})")
    else:
        methods = resolve_methods(args.method)
        if args.start_at_defaults and len(methods) > args.num_samples:
            raise UserError(f"--start-at-defaults: one first trial per strategy needs --num-samples {len(methods)} or "
                            f"more; --num-samples is {args.num_samples}")
        base = base_config(args, methods)
        if args.grace_period is not None and args.grace_period > base.max_iterations:
            raise UserError(f"--grace-period: {args.grace_period} is invalid; expected at most max_iterations "
                            f"({base.max_iterations}): ASHA may stop a trial only before it ends")
    from raysemi.search_space import continued_spaces, describe_sources, load_spaces
    from raysemi.tracking import check_tracking_uri, resolve_tracking_uri

    if saved is not None:  # the spaces it searched, whatever its files say now
        spaces = continued_spaces(saved, methods)
    else:
        spaces = load_spaces(methods, args.search_space)
        if args.search_space:
            print(describe_sources(methods, args.search_space), flush=True)
    uri = resolve_tracking_uri(args.tracking_uri if saved is None or args.tracking_uri else saved["tracking_uri"])
    check_tracking_uri(uri)
    if saved is not None and saved.get("parent_run_id"):  # its runs must be where the search logs
        check_parent_run(uri, saved["parent_run_id"], saved["tracking_uri"])
    name = args.name or f"search-{'-'.join(methods) if len(methods) <= 2 else 'all'}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir = storage / name
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--storage: {storage} is not writable ({err.strerror})") from None

    from raysemi.data import load_dataset, resolve_data_root
    from raysemi.data.layout import read_list

    read_list(resolve_data_root(base.data), "train_slices")  # a wrong --data in one line, before any output
    cluster = start_ray(args)  # before the data: a cluster that cannot be joined is one line, too
    try:
        from raysemi.train import budget_note

        note = budget_note(base, methods, spaces)  # after the checks: bad input is the only line
        if note:
            print(note, flush=True)
        print(f"loading data: {base.data}", flush=True)
        dataset = load_dataset(base.data, base.labeled_patients, base.num_classes)
        return _search(args, methods, spaces, base, dataset, uri, storage, name, exp_dir, cluster)
    finally:
        import ray

        ray.shutdown()


def _search(args, methods, spaces, base: TrainConfig, dataset, uri: str, storage: Path, name: str, exp_dir: Path,
            cluster: dict) -> int:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raysemi.cluster import alive_nodes, check_nodes, describe, node_of_this_driver
    from raysemi.search_report import summarize
    from raysemi.searcher import AshaAwareOptunaSearch
    from raysemi.search_space import base_points, define_by_run, spaces_to_json
    from raysemi.trainable import BEST, METRIC, TIME_ATTR, train_trial
    from raysemi.tracking import (MLflowRun, end_interrupted_search, flat_params, make_tune_callback,
                                  write_trial_run_map)

    nodes = alive_nodes()
    gpus, per_trial, concurrency = check_resources(args, cluster, nodes)
    if per_trial == 0 and base.cuda_graphs == "on":  # else every trial would be refused, one by one
        raise UserError("cuda_graphs: 'on' needs GPU trials, but this search runs its trials on CPUs (--gpus 0, "
                        "or no GPU in the cluster); expected 'auto' (graphs on CUDA trials only) or 'off'")
    joined = args.address or os.environ.get("RAY_ADDRESS")
    cluster_line = describe(nodes, ray.get_runtime_context().gcs_address if joined else "")
    print(cluster_line, flush=True)
    print(f"using {gpus:g} GPUs, {per_trial:g} GPU and {args.cpus_per_trial} CPU per trial, "
          f"up to {concurrency} trials at once", flush=True)
    points, left_out = base_points(spaces, base.to_dict()) if args.start_at_defaults else ([], [])
    fixed = sum(any(k != "method" for k in point) for point in points)  # points with a base value to start at
    note = tpe_note(args.num_samples, concurrency, fixed)
    if note:
        print(f"note: {note}", flush=True)
    if joined:  # trials may run, and resume, on any node: each must see --storage and import raysemi
        for line in check_nodes(storage, nodes):
            print(f"warning: {line}", flush=True)
    state_path = exp_dir / STATE_FILE
    if per_trial == 0 and not state_path.is_file():  # a new CPU search: before anything is created
        print_cpu_estimate(args, base, methods, dataset, concurrency)
    resuming = tune.Tuner.can_restore(str(exp_dir))
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if args.resume and not resuming and not state.get("parent_run_id"):
        raise UserError(f"--resume: {exp_dir} holds no search to continue")
    if state.get("parent_run_id"):  # continued: with Tune's saved trials, or stopped before it saved any
        from mlflow.tracking import MlflowClient

        parent = MLflowRun.existing(MlflowClient(tracking_uri=uri), uri, state["parent_run_id"])
        parent.client.update_run(parent.run_id, status="RUNNING")
        print(f"resuming search {name} (MLflow parent run {parent.run_id})" if resuming else
              f"search {name} stopped before Tune saved any trial: starting its trials with its saved settings "
              f"(MLflow parent run {parent.run_id})", flush=True)
        ignored = ignored_on_resume(getattr(args, "given", []), restored=resuming)
        if ignored:
            print(f"warning: {', '.join(ignored)}: ignored; a continued search keeps the settings it started "
                  "with (start a new search, with another --name, to change them)", flush=True)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        parent = MLflowRun(uri, args.experiment, name, tags={"search": name, "methods": ",".join(methods),
                                                           "search_dir": str(exp_dir)})
        parent.log_params({"search/methods": ",".join(methods), "search/num_samples": args.num_samples,
                           "search/seeds": args.seeds, "search/gpus": gpus, "search/gpus_per_trial": per_trial,
                           "search/reduction_factor": args.reduction_factor, **{f"base/{k}": v for k, v in
                                                                               flat_params(base.saved_dict()).items()}})
        state = {"parent_run_id": parent.run_id, "methods": methods, "tracking_uri": uri,
                 "num_samples": args.num_samples, "seeds": args.seeds, "experiment": args.experiment,
                 "search_space": str(Path(args.search_space).resolve()) if args.search_space else None,
                 "spaces": spaces_to_json(spaces), "start_at_defaults": args.start_at_defaults, "finished": False}
        state_path.write_text(json.dumps(state, indent=1))
        save_yaml(base, exp_dir / "base_config.yaml")
    parent.set_tags({"cluster": cluster_line, "driver_node_id": node_of_this_driver()})  # this (re)start's
    print(f"search folder: {exp_dir}\nMLflow: {uri} (experiment {args.experiment!r}, parent run {parent.run_id})",
          flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base.to_dict(), dataset=dataset, seeds=args.seeds,
                             cpus_per_trial=args.cpus_per_trial),
        {"cpu": args.cpus_per_trial, "gpu": per_trial})
    callback = make_tune_callback(uri, args.experiment, parent.run_id, exp_dir / "mlflow_trial_runs.json",
                                  base.saved_dict(), base.max_iterations)
    try:
        if resuming:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            if points:
                say_starting_points(spaces, points, left_out)
            # `multivariate`, `group` and `constant_liar` are marked experimental (stable for years): no warning each run
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
            sampler = optuna.samplers.TPESampler(seed=base.seed, n_startup_trials=TPE_STARTUP, multivariate=True,
                                                 group=True, constant_liar=True)
            searcher = AshaAwareOptunaSearch(space=define_by_run(spaces), sampler=sampler, metric=METRIC, mode="max",
                                             max_iterations=base.max_iterations, time_attr=TIME_ATTR,
                                             points_to_evaluate=points or None)
            grace = asha_grace(args, base)
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=base.max_iterations, grace_period=grace,
                                      reduction_factor=args.reduction_factor)
            reporter = progress_reporter(
                metric_columns={TIME_ATTR: "iter", METRIC: "val dice", BEST: "best dice", "val/hd95": "hd95",
                                "params": "params"},
                # conditional parameters cannot be parameter columns (the reporter looks each up in
                # every trial): the trial reports its own values as the `params` text column instead
                parameter_columns={"method": "strategy"},
                max_report_frequency=15, sort_by_metric=True, max_column_length=200)  # UA-MT's params whole
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                            num_samples=args.num_samples, max_concurrent_trials=concurrency,
                                            reuse_actors=not args.no_reuse_actors,
                                            trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(storage), callbacks=[callback], progress_reporter=reporter,
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1))
        results = tuner.fit()
    except KeyboardInterrupt:
        try:
            write_trial_run_map(uri, parent.run_id, exp_dir / "mlflow_trial_runs.json")
            end_interrupted_search(uri, parent.run_id, {})
        except Exception as err:  # noqa: BLE001 - the store may be down; the resume hint matters more
            print(f"warning: the search's MLflow runs could not be marked interrupted ({type(err).__name__}); "
                  "--resume sets them right", file=sys.stderr, flush=True)
        print(f"\ninterrupted; continue with: {resume_command(args, name, storage)}")
        return 130
    except Exception as err:  # noqa: BLE001 - the driver's own failure, e.g. the MLflow store stopped answering
        return stopped_by_error(err, args, uri, parent, exp_dir, name, storage)
    write_trial_run_map(uri, parent.run_id, exp_dir / "mlflow_trial_runs.json")
    done = finished_trials(exp_dir)
    if done < args.num_samples:  # Ctrl-C: Tune stopped gracefully
        end_interrupted_search(uri, parent.run_id, {})
        print(f"\ninterrupted after {done} of {args.num_samples} trials; "
              f"continue with: {resume_command(args, name, storage)}")
        return 130
    summary = summarize(results, base, methods, spaces, exp_dir)
    state["finished"] = True
    state_path.write_text(json.dumps(state, indent=1))
    best_ckpt = exp_dir / "best_checkpoint.pt"
    if best_ckpt.is_file():  # the winner's per-class table, as a user would check it
        from raysemi.evaluate import load_network
        from raysemi.inference import evaluate_volumes
        from raysemi.loop import resolve_device

        device = resolve_device("auto")
        net, cfg = load_network(best_ckpt, None, device)
        table = evaluate_volumes(net, dataset.val, cfg.num_classes, cfg.patch_size, device, cfg.eval_batch_size,
                                 True, device.type == "cuda" and cfg.amp != "off")
        print(f"\nbest trial's checkpoint ({summary['best_method']}) on the validation split:\n{table.format()}")
        parent.log_metrics({f"best_checkpoint/val_{k}": v for k, v in table.means().items()}, 0)
    for path in summary["artifacts"]:
        parent.log_artifact(path, "plots" if Path(path).suffix == ".png" else None)
    parent.log_metrics({"best/val_dice": summary["best_dice"], "trials/completed": summary["counts"]["completed"],
                        "trials/stopped_early": summary["counts"]["stopped_early"],
                        "trials/failed": summary["counts"]["failed"]}, 0)
    parent.set_tags({"status": "finished", "best_strategy": summary["best_method"]})
    if not best_ckpt.is_file() and summary["counts"]["completed"] + summary["counts"]["stopped_early"] == 0:
        parent.end("FAILED")
        print(f"\nerror: no trial finished: all {summary['counts']['failed']} failed (see failure_reason in "
              f"leaderboard.csv)", flush=True)
        return 1
    parent.end("FINISHED")
    browse = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
    print(f"\nresults: {exp_dir} (leaderboard.csv, best_config.yaml, best_checkpoint.pt, plots); MLflow: {uri}, "
          f"experiment {args.experiment!r}, parent run {parent.run_id} (browse: {browse})")
    print(f"best: {summary['best_method']} val dice {summary['best_dice']:.4f}; "
          f"retrain it at full budget on several seeds, scored on the test split: python -m raysemi.train "
          f"--config {exp_dir / 'best_config.yaml'} --max-iterations 30000 --seeds 3 "
          + ("(its --schedules budget scales the ramp and warm-up to that budget)" if base.schedules == "budget" else
             "(reset --rampup-interval 150 --mt-warmup 1000 if the search scaled them down; a search with "
             "--schedules budget and those values scales them itself)"))
    return 0


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())

"""Retrain the best config of a finished search at full budget with several seeds and report its test
metrics: per class, mean and std over volumes and over seeds, and the difference to a supervised
baseline run with the same data and labels when the MLflow experiment holds one.

    python examples/retrain_best.py runs/<search>           # runs/<search>/best_config.yaml, 3 seeds
    python examples/retrain_best.py runs/<search> --seeds 5 --max-iterations 30000
    python examples/retrain_best.py --smoke-test            # runs a 2-trial search first, then retrains briefly
"""

import sys
from pathlib import Path

from raysemi.errors import ArgumentParser, ScriptHelpFormatter, run_cli
from raysemi.search import main as search
from raysemi.train import main as train

sys.path.insert(0, str(Path(__file__).parent))
from _smoke import SMOKE_TRAIN, smoke_data  # noqa: E402

# one-line errors and --debug, like the CLIs it calls (which get --debug passed on)
p = ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
p.add_argument("search_dir", nargs="?", help="a search folder holding best_config.yaml")
p.add_argument("--max-iterations", type=int, default=30000, help="iterations of each retraining (the full budget)")
p.add_argument("--seeds", type=int, default=3, help="seeds to train the best config with (seed, seed+1, ...)")
p.add_argument("--smoke-test", action="store_true", help="a tiny search first, then its best config retrained")
p.add_argument("--name", default="retrain-smoke", help="with --smoke-test: the tiny search's folder under runs/ "
               "(a finished search is not run again, so give another name to run it twice)")
args = p.parse_args()
debug = ["--debug"] if args.debug else []

if args.smoke_test:
    code = run_cli(search, ["--method", "supervised", "--data", smoke_data(Path.cwd()), *SMOKE_TRAIN,
                            "--num-samples", "2", "--gpus", "0", "--name", args.name, "--storage", "runs", *debug])
    if code:
        sys.exit(code)
    search_dir, budget, seeds = Path("runs") / args.name, 6, 2
else:
    if not args.search_dir:
        p.error("search_dir: missing; expected a search folder holding best_config.yaml (runs/<search>), "
                "or --smoke-test")
    search_dir, budget, seeds = Path(args.search_dir), args.max_iterations, args.seeds
best = search_dir / "best_config.yaml"
# one folder per seed under retrained/, results.json and results_per_volume.csv beside them
sys.exit(run_cli(train, ["--config", str(best), "--max-iterations", str(budget), "--seeds", str(seeds),
                         "--output", str(search_dir / "retrained"), "--overwrite", *debug]))

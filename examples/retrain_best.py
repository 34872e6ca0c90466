"""Retrain the best config of a finished search at full budget and report its test metrics.

    python examples/retrain_best.py runs/<search>           # uses runs/<search>/best_config.yaml
    python examples/retrain_best.py --smoke-test            # runs a 2-trial search first, then retrains briefly
"""

import argparse
import sys
from pathlib import Path

from raysemi.errors import run_cli
from raysemi.search import main as search
from raysemi.train import main as train

sys.path.insert(0, str(Path(__file__).parent))
from _smoke import SMOKE_TRAIN, smoke_data  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("search_dir", nargs="?", help="a search folder holding best_config.yaml")
p.add_argument("--max-iterations", type=int, default=30000)
p.add_argument("--smoke-test", action="store_true")
args = p.parse_args()

if args.smoke_test:
    code = run_cli(search, ["--method", "supervised", "--data", smoke_data(Path.cwd()), *SMOKE_TRAIN,
                            "--num-samples", "2", "--gpus", "0", "--name", "retrain-smoke", "--storage", "runs"])
    if code:
        sys.exit(code)
    search_dir, budget = Path("runs/retrain-smoke"), 6
else:
    if not args.search_dir:
        p.error("give the search folder (runs/<search>)")
    search_dir, budget = Path(args.search_dir), args.max_iterations
best = search_dir / "best_config.yaml"
sys.exit(run_cli(train, ["--config", str(best), "--max-iterations", str(budget),
                         "--output", str(search_dir / "retrained"), "--overwrite"]))

"""Search mean teacher's hyperparameters on the built-in phantom, on the CPUs of this machine.

    python examples/quick_search.py                 # about 5 minutes on 2 cores
    python examples/quick_search.py --smoke-test    # seconds: what CI runs

Then: `mlflow ui --backend-store-uri sqlite:///mlflow.db` and open the `raysemi-search` experiment.
"""

import sys
from pathlib import Path

from raysemi.errors import ArgumentParser, ScriptHelpFormatter, run_cli
from raysemi.search import main as search

sys.path.insert(0, str(Path(__file__).parent))
from _smoke import SMOKE_TRAIN, smoke_data  # noqa: E402

# one-line errors and --debug, like the CLIs it calls (which get --debug passed on)
p = ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
p.add_argument("--smoke-test", action="store_true", help="tiny data and budget, 2 trials")
p.add_argument("--name", help="the search's folder under runs/ (default: quick, or quick-smoke); a finished "
                              "search is not run again, so give another name to run it twice")
args = p.parse_args()
debug = ["--debug"] if args.debug else []

if args.smoke_test:
    argv = ["--data", smoke_data(Path.cwd()), *SMOKE_TRAIN, "--num-samples", "2", "--name", args.name or "quick-smoke"]
else:
    # consistency ramp in units of 2 iterations (the reference's 150 suits 30,000): at 400 iterations
    # a ramp of 20-400 units (the searched range) has switched the unsupervised term on
    argv = ["--labeled-patients", "3", "--patch-size", "64", "64", "--batch-size", "8", "--labeled-bs", "4",
            "--max-iterations", "400", "--eval-interval", "100", "--rampup-interval", "2", "--num-samples", "8",
            "--name", args.name or "quick"]
sys.exit(run_cli(search, ["--method", "mean_teacher", "--gpus", "0", "--mt-warmup", "0", *argv, *debug]))

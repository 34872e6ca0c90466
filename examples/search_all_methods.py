"""Search over the strategies themselves and their hyperparameters (each strategy's parameters
conditional on it), using every GPU of this machine (or the CPUs when there is none).

    python examples/search_all_methods.py --data data/ACDC --num-samples 64
    python examples/search_all_methods.py --smoke-test
"""

import sys
from pathlib import Path

import torch

from raysemi.errors import ArgumentParser, ScriptHelpFormatter, run_cli
from raysemi.search import main as search

sys.path.insert(0, str(Path(__file__).parent))
from _smoke import SMOKE_TRAIN, smoke_data  # noqa: E402

# one-line errors and --debug, like the CLIs it calls (which get --debug passed on)
p = ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
p.add_argument("--data", default="phantom", help="dataset root in the SSL4MIS layout, or 'phantom'")
p.add_argument("--num-samples", type=int, default=32, help="trials of the search")
p.add_argument("--smoke-test", action="store_true", help="tiny data and budget, 3 strategies, 3 trials")
p.add_argument("--name", help="the search's folder under runs/ (default: all-smoke for --smoke-test, else the "
                              "search's own default); a finished search is not run again")
args = p.parse_args()
debug = ["--debug"] if args.debug else []

gpus = torch.cuda.device_count()
if args.smoke_test:
    argv = ["--method", "supervised,em,ict", "--data", smoke_data(Path.cwd()), *SMOKE_TRAIN, "--num-samples", "3",
            "--gpus", "0", "--name", args.name or "all-smoke"]
else:
    if not gpus:
        print("note: no GPU here: the search first times a training step on the CPUs and says how long it takes "
              "(days at 256x256); Ctrl-C stops it (resumable). For a look on a CPU: examples/quick_search.py",
              flush=True)
    argv = ["--method", "all", "--data", args.data, "--num-samples", str(args.num_samples), "--max-iterations",
            "10000", "--gpus", str(gpus), *(["--gpus-per-trial", "0.5"] if gpus else []), "--seeds", "2",
            *(["--name", args.name] if args.name else [])]
sys.exit(run_cli(search, [*argv, *debug]))

"""Every example runs with its smoke flag, as CI runs it (rule: examples must not rot)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.py") if not p.name.startswith("_"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"quick_search.py", "search_all_methods.py", "retrain_best.py"}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_smoke_flag(example, tmp_path):
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"ex-{example.stem}"  # --name: a user can run an example again under another name
    proc = subprocess.run([sys.executable, str(example), "--smoke-test", "--name", name], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": env_uri})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "runs" / name).is_dir()
    if "search" in example.name:
        assert "leaderboard" in proc.stdout and list(tmp_path.glob("runs/*/best_config.yaml"))
        # Tune's progress table with our columns: strategy, iteration, Dice and the searched values
        assert "val dice" in proc.stdout and "params" in proc.stdout and "strategy" in proc.stdout
        # its "Current best trial" reads each trial's best Dice so far, as the leaderboard ranks
        assert "best dice" in proc.stdout and "Current best trial" in proc.stdout
        output = proc.stdout + proc.stderr  # no set-up chatter of MLflow's store or Optuna's study
        assert "Creating initial MLflow database tables" not in output and "A new study created" not in output
        best = [line for line in proc.stdout.splitlines() if line.startswith("Current best trial")]
        assert best and all("with best_val_dice=" in line for line in best)
        assert all(" and parameters: method=" in line for line in best)  # the sampled values, not just the strategy
    else:  # retrain_best: two seeds, each in its own folder, aggregated
        assert len(list(tmp_path.glob("runs/*/retrained/seed*/best.pt"))) == 2
        assert list(tmp_path.glob("runs/*/retrained/results_per_volume.csv"))
        assert "std of the 2 per-seed means" in proc.stdout


def run_example(example: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(example), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_bad_flag_is_one_error_line(example, tmp_path):
    # a typo is refused before anything runs, in one line as the CLIs it calls do (not argparse's usage block)
    proc = run_example(example, "--smoke-tst", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unrecognized arguments: --smoke-tst") and f"{example.name} --help" in lines[0]
    assert not list(tmp_path.iterdir())
    help_ = run_example(example, "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "--debug" in help_.stdout and "(default:" in help_.stdout


def test_retrain_example_without_a_search_folder_says_what_it_needs(tmp_path):
    proc = run_example(EXAMPLES[[p.name for p in EXAMPLES].index("retrain_best.py")], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "search_dir: missing" in lines[0] and "--smoke-test" in lines[0]
    missing = run_example(EXAMPLES[[p.name for p in EXAMPLES].index("retrain_best.py")], str(tmp_path / "nosuch"),
                          cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nosuch' / 'best_config.yaml'}: config file not found"]
    # --debug reaches the CLI it calls, which then shows where the error came from
    debug = run_example(EXAMPLES[[p.name for p in EXAMPLES].index("retrain_best.py")], str(tmp_path / "nosuch"),
                        "--debug", cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].endswith("best_config.yaml: config file not found")

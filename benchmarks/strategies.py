"""Train all seven strategies on the phantom at one budget, several seeds each; print a table and
write JSON. A finding, not a test: whether semi-supervised beats the baseline here is reported as is.

    python benchmarks/strategies.py --iterations 400 --seeds 3 --out benchmarks/results/strategies_cpu.json

The reference's schedules are defined for 30,000 iterations (ramp: 200 units of 150 iterations;
mean-teacher warm-up: 1,000); at a smaller budget they are scaled by budget / 30,000 so that every
strategy's unsupervised term actually ramps up within the run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cli, when imported from elsewhere

import bench_cli as cli  # noqa: E402
from raysemi.config import TrainConfig  # noqa: E402
from raysemi.data import load_dataset  # noqa: E402
from raysemi.loop import Trainer  # noqa: E402


def run_config(method: str, seed: int, args) -> TrainConfig:
    """The reference's schedules scaled to the budget (its 30,000 iterations)."""
    scale = args.iterations / 30000
    return TrainConfig(method=method, data=args.data, labeled_patients=args.labeled_patients,
                       patch_size=tuple(args.patch_size), batch_size=args.batch_size, labeled_bs=args.batch_size // 2,
                       max_iterations=args.iterations, eval_interval=args.eval_interval, seed=seed,
                       rampup_interval=max(1, round(150 * scale)), mt_warmup=round(1000 * scale),
                       device=args.device, log_interval=50).validate({**cli.CONFIG_FLAGS, "patch_size": "--patch-size",
                                                                      "eval_interval": "--eval-interval"})


def run(method: str, seed: int, args) -> dict:
    cfg = run_config(method, seed, args)
    data = load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes)
    t0 = time.perf_counter()
    result = Trainer(cfg, data).fit()
    best = result.best_metrics
    return {"method": method, "seed": seed, "best_dice": result.best_dice, "best_hd95": best.get("val/hd95"),
            "best_iteration": result.best_iteration, "seconds": time.perf_counter() - t0}


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--methods", default="all", help="comma-separated strategies (aliases ok), or 'all'")
    p.add_argument("--data", default="phantom", help="dataset root in the SSL4MIS layout, or 'phantom'")
    p.add_argument("--labeled-patients", type=int, default=3, help="patients whose labels are used")
    p.add_argument("--iterations", type=int, default=400, help="iterations each run trains")
    p.add_argument("--eval-interval", type=int, default=100, help="iterations between validations")
    p.add_argument("--batch-size", type=int, default=8, help="slices per batch (half labeled)")
    p.add_argument("--patch-size", type=int, nargs=2, default=(64, 64), help="patch height and width (multiples of 16)")
    p.add_argument("--seeds", type=int, default=3, help="runs per strategy (seeds 0, 1, ...)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if there is one), 'cuda', 'cuda:N' or 'cpu'")
    p.add_argument("--out", default="benchmarks/results/strategies.json", help="the JSON written")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cli.at_least(args, labeled_patients=1, iterations=1, eval_interval=1, batch_size=2, seeds=1)
    for side in args.patch_size:
        cli.patch_size(side, "--patch-size")
    methods = cli.methods(args.methods)
    for method in methods:  # a bad --device before any training
        run_config(method, 0, args)
    cli.check_out(args.out)
    rows = []
    for method in methods:
        for seed in range(args.seeds):
            r = run(method, seed, args)
            rows.append(r)
            print(f"  {method:<32} seed {seed}: dice {r['best_dice']:.4f} hd95 {r['best_hd95']:.2f} "
                  f"({r['seconds']:.0f}s)", flush=True)
    table = []
    print(f"\n{'strategy':<32}{'val Dice':>18}{'val HD95':>18}{'seconds/run':>14}")
    for method in methods:
        rs = [r for r in rows if r["method"] == method]
        d, h, s = ([r[k] for r in rs] for k in ("best_dice", "best_hd95", "seconds"))
        sd = statistics.pstdev
        entry = {"method": method, "dice_mean": statistics.mean(d), "dice_std": sd(d), "hd95_mean": statistics.mean(h),
                 "hd95_std": sd(h), "seconds_mean": statistics.mean(s)}
        table.append(entry)
        print(f"{method:<32}{entry['dice_mean']:>10.4f} +-{entry['dice_std']:.4f}"
              f"{entry['hd95_mean']:>10.2f} +-{entry['hd95_std']:>5.2f}{entry['seconds_mean']:>14.1f}")
    out = cli.write_json(args.out, {
        "command": " ".join([Path(sys.executable).name] + sys.argv), "args": vars(args), "table": table, "runs": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"},
        "date": time.strftime("%Y-%m-%d"),
    })
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)

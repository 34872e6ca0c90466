"""Which training configurations capture as a CUDA graph: each strategy x precision x memory
format, a few iterations at a small size; prints `ok` or why capture failed (training then went
on eagerly). A diagnostic for the GPU machine:

    python benchmarks/graph_capture_matrix.py --data DATA --methods supervised,mt
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cli, when imported from elsewhere

import bench_cli as cli  # noqa: E402
from raysemi.config import TrainConfig  # noqa: E402
from raysemi.data import load_dataset  # noqa: E402
from raysemi.loop import Trainer  # noqa: E402
from raysemi.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--data", default="phantom", help="dataset root in the SSL4MIS layout, or 'phantom'")
    p.add_argument("--methods", default="all", help="comma-separated strategies (aliases ok), or 'all'")
    p.add_argument("--size", type=int, default=64, help="patch size (square, a multiple of 16)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per batch (half labeled)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cli.at_least(args, batch_size=2)
    cli.patch_size(args.size)
    methods = cli.methods(args.methods)
    if not torch.cuda.is_available():
        raise UserError(f"this machine: no CUDA device (torch {torch.__version__}); expected one: the matrix is of "
                        "CUDA-graph captures")
    data = load_dataset(args.data, 7, 4)
    for method in methods:
        for amp, cl in (("bf16", "on"), ("bf16", "off"), ("off", "off"), ("off", "on")):
            cfg = TrainConfig(method=method, data=args.data, patch_size=(args.size, args.size),
                              batch_size=args.batch_size, labeled_bs=args.batch_size // 2, max_iterations=100,
                              eval_interval=1000, log_interval=1000, device="cuda", amp=amp, channels_last=cl,
                              cuda_graphs="on", mt_warmup=0).validate()
            trainer = Trainer(cfg, data)
            trainer.start()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    trainer.train_until(6)
                    outcome = f"failed: {trainer.graph_failure}" if trainer.graph_failure else "ok"
                except Exception as err:  # noqa: BLE001 - a diagnostic: report and go on
                    outcome = f"error: {type(err).__name__}: {str(err).splitlines()[0]}"
            try:
                torch.rand(4, device="cuda").sum().item()
                rng = "random ops ok"
            except RuntimeError as err:
                rng = f"random ops broken: {str(err).splitlines()[0]}"
            print(f"{method:<32} amp={amp:<5} channels_last={cl:<4} {outcome}; {rng}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)

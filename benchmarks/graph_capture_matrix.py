"""Which training configurations capture as a CUDA graph: each strategy x precision x memory
format, a few iterations at a small size; prints `ok` or why capture failed (training then went
on eagerly). A diagnostic for the GPU machine:

    python benchmarks/graph_capture_matrix.py --data DATA --methods supervised,mt
"""

from __future__ import annotations

import argparse
import warnings

import torch

from raysemi.config import TrainConfig
from raysemi.data import load_dataset
from raysemi.loop import Trainer
from raysemi.methods import list_methods, resolve_method_name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="phantom")
    p.add_argument("--methods", default="all")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    methods = list_methods() if args.methods == "all" else [resolve_method_name(m) for m in args.methods.split(",")]
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
    raise SystemExit(main())

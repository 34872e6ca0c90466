"""Speed must not change what is learned: the validation Dice trajectory of our training path
(device sampler and augmentation, bf16 + channels_last and the CUDA-graph step on CUDA) against the same strategy fed the
reference's way (benchmarks/reference_pipeline.py: CPU per-sample augmentation, fp32), over
several seeds, both scored by the same evaluator. Prints a table and writes JSON.

    python benchmarks/trajectory.py --device cuda --methods mt --iterations 400 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from raysemi.config import TrainConfig  # noqa: E402
from raysemi.data import load_dataset  # noqa: E402
from raysemi.loop import Trainer  # noqa: E402
from raysemi.methods import get_method, resolve_method_name  # noqa: E402
from reference_pipeline import ReferenceFeed  # noqa: E402
from throughput import parse_sets  # noqa: E402


def run(method: str, data, args, seed: int, reference: bool) -> tuple[list[float], dict]:
    """One seed's validation Dice at each evaluation, and the config values that `--set` names as
    this pipeline's trainer had them."""
    # the reference feed hands over ready batches: no device sampler to capture in a CUDA graph
    over = ({"amp": "off", "channels_last": "off", "cuda_graphs": "off", "compile": "off"} if reference
            else {"cuda_graphs": args.cuda_graphs, "compile": "on" if args.compile else "off", **args.overrides})
    values = dict(method=method, data=args.data, labeled_patients=args.labeled_patients,
                  patch_size=(args.size, args.size), batch_size=args.batch_size, labeled_bs=args.batch_size // 2,
                  max_iterations=args.iterations, eval_interval=args.iterations // args.points,
                  log_interval=10 ** 9, device=args.device, mt_warmup=0, seed=seed,
                  rampup_interval=max(1, args.iterations // 200), eval_hd95=False)
    cfg = TrainConfig(**{**values, **over}).validate()
    trainer = Trainer(cfg, data)
    if reference:
        uses = get_method(method).uses_unlabeled
        torch.manual_seed(seed)
        trainer.sampler = ReferenceFeed(data.root, data.train.names, data.train.labeled_idx,
                                        data.train.unlabeled_idx if uses else data.train.labeled_idx[:0],
                                        cfg.labeled_bs if uses else cfg.batch_size, cfg.unlabeled_bs if uses else 0,
                                        cfg.patch_size, trainer.device, args.reference_workers)
    result = trainer.fit()
    if trainer.graph_failure:
        print(f"  seed {seed}: CUDA graph capture failed, trained eagerly: {trainer.graph_failure}")
    return [h["val/dice"] for h in result.history], {k: getattr(cfg, k) for k in args.overrides}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="mean_teacher")
    p.add_argument("--data", default="phantom")
    p.add_argument("--labeled-patients", type=int, default=7)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--device", default="auto")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--points", type=int, default=4, help="validations along the way")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reference-workers", type=int, default=4)
    p.add_argument("--pipelines", default="ours,reference",
                   help="which to train: 'ours', 'reference' or both (comma-separated)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"), help="our path's cuda_graphs")
    p.add_argument("--compile", action="store_true", help="our path with compile: on")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config value for our path (repeatable), e.g. --set uncertainty_copies=8; the reference "
                        "feed keeps the reference's own")
    p.add_argument("--out", default="benchmarks/results/trajectory.json")
    args = p.parse_args()
    args.overrides = parse_sets(args.set, p)
    data = load_dataset(args.data, args.labeled_patients, 4)
    rows = []
    methods = [resolve_method_name(x) for x in args.methods.split(",")]
    width = max(24, *(len(m) + 2 for m in methods))  # uncertainty_aware_mean_teacher is 30 long
    its = [args.iterations // args.points * (i + 1) for i in range(args.points)]
    print(f"{'strategy':<{width}}{'pipeline':<11}" + "  ".join(f"{'it ' + str(i):>12}" for i in its), flush=True)
    for m in methods:
        for pipeline in args.pipelines.split(","):
            runs = [run(m, data, args, 1337 + s, pipeline == "reference") for s in range(args.seeds)]
            curves = [curve for curve, _ in runs]
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
            std = [statistics.pstdev(c[i] for c in curves) for i in range(len(curves[0]))]
            rows.append({"method": m, "pipeline": pipeline, "curves": curves, "mean": mean, "std": std,
                         "set": runs[0][1]})
            print(f"{m:<{width}}{pipeline:<11}" + "  ".join(f"{a:.3f}+-{b:.3f}" for a, b in zip(mean, std)), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "args": vars(args), "iterations": its,
                               "rows": rows, "cuda_graphs": args.cuda_graphs, "compile": args.compile, "date": time.strftime("%Y-%m-%d"),
                               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
                              indent=1))
    print(f"validation Dice at iterations {its}; written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

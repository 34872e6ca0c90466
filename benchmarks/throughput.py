"""Training throughput per strategy on one device: steady-state it/s after warm-up, ms/step, peak
device memory and one validation pass's time, over several repeats; prints a table, writes JSON.

    python benchmarks/throughput.py --device cpu --size 64 --batch-size 8 --iterations 20   # CPU smoke
    python benchmarks/throughput.py --device cuda --data data/ACDC                            # reference size

The reference size is batch 24 (12 labeled), 256x256, 7 labeled patients. Timing is of the real
training path (`Trainer.train_until`: device-resident slices, device augmentation, bf16 and
channels_last on CUDA by default), with the device synchronised at both ends of each measured run.
Not built yet (issue 7): `--packed N` and `--compare-reference-pipeline`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from raysemi.config import TrainConfig
from raysemi.data import load_dataset
from raysemi.loop import Trainer
from raysemi.methods import list_methods, resolve_method_name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, data, args) -> dict:
    cfg = TrainConfig(method=method, data=args.data, labeled_patients=args.labeled_patients,
                      patch_size=(args.size, args.size), batch_size=args.batch_size, labeled_bs=args.batch_size // 2,
                      max_iterations=10 ** 9, eval_interval=10 ** 9, log_interval=10 ** 9, device=args.device,
                      amp=args.amp, mt_warmup=0).validate()
    trainer = Trainer(cfg, data)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.start()
    trainer.train_until(args.warmup)
    rates = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        trainer.train_until(trainer.iteration + args.iterations)
        sync(device)
        rates.append(args.iterations / (time.perf_counter() - t0))
    sync(device)
    t0 = time.perf_counter()
    trainer.evaluate(distances=True)
    sync(device)
    val_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"method": method, "it_per_s_mean": statistics.mean(rates), "it_per_s_median": statistics.median(rates),
            "ms_per_step": 1000 / statistics.median(rates), "peak_mem_mib": peak,
            "peak_mem_kind": "device" if device.type == "cuda" else "process RSS", "val_pass_s": val_s,
            "val_volumes": len(data.val), "device": str(device), "amp": trainer.amp, "channels_last": trainer.channels_last}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all")
    p.add_argument("--data", default="phantom")
    p.add_argument("--labeled-patients", type=int, default=7)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iterations", type=int, default=100, help="iterations per measured run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    args = p.parse_args()
    methods = list_methods() if args.methods == "all" else [resolve_method_name(m) for m in args.methods.split(",")]
    data = load_dataset(args.data, args.labeled_patients, 4)
    rows = []
    print(f"{'strategy':<32}{'it/s':>9}{'ms/step':>10}{'peak MiB':>10}{'val pass s':>12}")
    for m in methods:
        r = measure(m, data, args)
        rows.append(r)
        print(f"{m:<32}{r['it_per_s_median']:>9.2f}{r['ms_per_step']:>10.1f}{r['peak_mem_mib']:>10.0f}"
              f"{r['val_pass_s']:>12.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name] + sys.argv), "args": vars(args), "rows": rows,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if rows and rows[0]["device"].startswith("cuda") else "cpu"},
        "date": time.strftime("%Y-%m-%d")}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

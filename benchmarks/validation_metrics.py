"""Host time of the validation metrics (Dice, HD95, ASD, Jaccard per class) over the validation
volumes, for predictions of three qualities; prints a table, writes JSON.

    python benchmarks/validation_metrics.py --data DATA          # DATA: e.g. the phantom at ACDC size
    python benchmarks/validation_metrics.py --data DATA --threads 1,2,16

On a GPU the validation pass is bound by these host computations, not by the network (the
network's forward over 20 ACDC-size volumes takes a few ms per volume). The predictions are the
ground truth shifted by 2 voxels along x, with speckles (random labels) on a fraction of voxels:
0 (a clean, trained-looking prediction), 0.05% and 1% (early, noisy ones: their bounding box is
the whole volume). Variants, each over every (volume, class) pair:
- `medpy`: medpy's hd95 and asd on the whole volume (what the reference computes, plus ASD);
- `medpy-box`: medpy's surface distances on the bounding box of both masks (raysemi before the
  k-d tree);
- `raysemi`: `raysemi.metrics.case_metrics`, serially;
- `raysemi xN`: the same on N threads (what `evaluate_volumes` does beside the device's work).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cli, when imported from elsewhere

import bench_cli as cli  # noqa: E402
from raysemi.data import load_volumes, resolve_data_root  # noqa: E402
from raysemi.metrics import _union_box, case_metrics  # noqa: E402


def predictions(volumes, speckle: float, num_classes: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for v in volumes:
        p = np.roll(v.label, 2, axis=2).copy()
        hit = rng.random(p.shape) < speckle
        p[hit] = rng.integers(0, num_classes, int(hit.sum()))
        out.append(p)
    return out


def medpy_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing, box: bool) -> None:
    from medpy.metric import binary

    surface_distances = getattr(binary, "__surface_distances")
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        if not p.any() or not g.any():
            continue
        binary.dc(p, g)
        if box:
            b = _union_box(p, g)
            d = surface_distances(p[b], g[b], spacing, 1)
            np.percentile(np.hstack((d, surface_distances(g[b], p[b], spacing, 1))), 95)
        else:
            binary.hd95(p, g, spacing)
            binary.asd(p, g, spacing)


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, help="dataset root in the SSL4MIS layout (its val split is used)")
    p.add_argument("--split", default="val", help="the split whose volumes are scored (its <split>.list)")
    p.add_argument("--num-classes", type=int, default=4, help="classes, background included")
    p.add_argument("--speckles", default="0,0.0005,0.01", help="fractions of voxels given a random label")
    p.add_argument("--threads", default="2", help="comma-separated thread counts for the threaded variant")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported)")
    p.add_argument("--skip-medpy", action="store_true", help="leave out whole-volume medpy (the slowest)")
    p.add_argument("--out", default="benchmarks/results/validation_metrics.json", help="the JSON written")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cli.at_least(args, num_classes=2, repeats=1)
    threads = cli.numbers(args.threads, "--threads", int, "integers >= 1", lambda n: n >= 1)
    speckles = cli.numbers(args.speckles, "--speckles", float, "fractions in [0, 1)", lambda f: 0 <= f < 1)
    cli.check_out(args.out)
    volumes = load_volumes(resolve_data_root(args.data), args.split, args.num_classes)
    nc = args.num_classes
    report = {"command": " ".join([Path(sys.executable).name] + sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "volumes": len(volumes), "shape_first": list(volumes[0].label.shape), "rows": []}
    head = f"{'speckle':>8}" + ("" if args.skip_medpy else f"{'medpy s':>10}") + f"{'medpy-box s':>13}{'raysemi s':>11}"
    head += "".join(f"{f'x{n} s':>9}" for n in threads) + (f"{'vs medpy':>10}" if not args.skip_medpy else "")
    print(f"{len(volumes)} {args.split} volumes of {args.data}, {nc - 1} classes; median of {args.repeats} runs")
    print(head)
    for speckle in speckles:
        preds = predictions(volumes, speckle, nc)
        pairs = list(zip(preds, volumes))
        row = {"speckle": speckle}
        if not args.skip_medpy:
            row["medpy_s"] = timed(lambda: [medpy_metrics(q, v.label, nc, v.spacing, False) for q, v in pairs], 1)
        row["medpy_box_s"] = timed(lambda: [medpy_metrics(q, v.label, nc, v.spacing, True) for q, v in pairs],
                                   args.repeats)
        row["raysemi_s"] = timed(lambda: [case_metrics(q, v.label, nc, v.spacing) for q, v in pairs], args.repeats)
        for n in threads:
            with ThreadPoolExecutor(n) as pool:
                row[f"raysemi_x{n}_s"] = timed(lambda: list(pool.map(
                    lambda qv: case_metrics(qv[0], qv[1].label, nc, qv[1].spacing), pairs)), args.repeats)
        report["rows"].append(row)
        line = f"{speckle:>8.2%}" + ("" if args.skip_medpy else f"{row['medpy_s']:>10.3f}")
        line += f"{row['medpy_box_s']:>13.3f}{row['raysemi_s']:>11.3f}"
        line += "".join(f"{row[f'raysemi_x{n}_s']:>9.3f}" for n in threads)
        if not args.skip_medpy:
            row["speedup_vs_medpy"] = row["medpy_s"] / row[f"raysemi_x{threads[-1]}_s"]
            line += f"{row['speedup_vs_medpy']:>9.1f}x"
        print(line, flush=True)
    out = cli.write_json(args.out, report)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)

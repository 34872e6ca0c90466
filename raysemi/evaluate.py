"""`python -m raysemi.evaluate`: per-class Dice / HD95 / ASD / Jaccard of a checkpoint on a split.

    python -m raysemi.evaluate --checkpoint runs/x/best.pt --data data/ACDC --split test --out results.csv
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from raysemi.errors import ArgumentParser, UserError, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.evaluate", description=(
        "Evaluate a raysemi checkpoint on the volumes of one split: prints the per-class table (mean +- std "
        "over volumes) and optionally writes a per-volume CSV. Inference is batched per volume on the device."))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by raysemi.train (best.pt or last.pt) or a "
                   "search's best_checkpoint.pt")
    p.add_argument("--data", default=None, help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", help="list to evaluate: val, test or train")
    p.add_argument("--eval-model", "--model", dest="model", choices=("student", "teacher"), default=None,
                   help="network to evaluate (default: the checkpoint's eval_model)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")

    p.add_argument("--out", default=None, help="per-volume CSV to write")
    return p


def load_network(path: str | Path, which: str | None, device):
    """(network on `device`, config) from a checkpoint; clear errors when it does not fit."""
    from raysemi import checkpoint
    from raysemi.config import from_dict
    from raysemi.models import create_model, list_models

    ckpt = checkpoint.load(path, device)
    config = from_dict(ckpt["config"], source=f"{path}: config").validate(source=f"{path}: config")
    which = which or config.eval_model
    if which not in ckpt["networks"]:
        raise UserError(f"{path}: networks.{which}: not in the checkpoint (has {', '.join(ckpt['networks'])})")
    model = ckpt.get("model", "unet")
    if model not in list_models():
        raise UserError(f"{path}: model: {model!r} is unknown; expected one of {', '.join(list_models())}")
    net = create_model(model, in_channels=config.in_channels, num_classes=config.num_classes)
    checkpoint.load_network(net, ckpt["networks"][which], path, which,
                            f"{model} with num_classes={config.num_classes}, in_channels={config.in_channels} "
                            "from the checkpoint's config")
    return net.to(device).eval(), config


def write_csv(path: Path, summary) -> None:
    from raysemi.files import write_text_atomic
    from raysemi.metrics import METRICS

    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(["case", "class"] + list(METRICS) + ["empty_pred"])
    for case, rows in summary.per_case:
        for name, m in zip(summary.class_names, rows):
            w.writerow([case, name] + [f"{m[k]:.6g}" for k in METRICS] + [int(m["empty_pred"])])
    write_text_atomic(path, f.getvalue())


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size: {args.batch_size} is invalid; expected an integer >= 1")
    if args.out:  # before the evaluation, not after it
        from raysemi.files import check_out_file

        check_out_file(args.out, "--out")
    from raysemi.data import load_volumes, resolve_data_root
    from raysemi.data.layout import check_split
    from raysemi.inference import evaluate_volumes
    from raysemi.loop import resolve_device
    from raysemi.progress import ProgressBar

    device = resolve_device(args.device)
    net, config = load_network(args.checkpoint, args.model, device)
    root = resolve_data_root(args.data or config.data)
    check_split(Path(root), args.split)
    volumes = load_volumes(root, args.split, config.num_classes)
    amp = device.type == "cuda" and config.amp != "off"
    with ProgressBar(len(volumes), args.split, unit="vol") as bar:
        summary = evaluate_volumes(net, volumes, config.num_classes, config.patch_size, device, args.batch_size,
                                   True, amp, bar=bar)
    print(f"{args.checkpoint} on {root} ({args.split}):")
    print(summary.format())
    if args.out:
        write_csv(Path(args.out), summary)
        print(f"per-volume results: {args.out}")
    return 0


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())

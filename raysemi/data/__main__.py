"""`python -m raysemi.data`: write the synthetic phantom set (more commands come with issue 5).

    python -m raysemi.data phantom --out data/phantom --patients 40 --seed 0 --size 128 128
"""

from __future__ import annotations

from raysemi.errors import ArgumentParser, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.data", description="Dataset tools.")
    sub = p.add_subparsers(dest="command", required=True)
    ph = sub.add_parser("phantom", help="write the synthetic cardiac short-axis set in the SSL4MIS ACDC layout",
                        description="Write the synthetic cardiac phantom (lists + data/slices/*.h5 + data/*.h5), "
                                    "deterministic for a seed; patients are split 70/10/20 into train/val/test.")
    ph.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    ph.add_argument("--patients", type=int, default=40, help="number of patients (2 volumes each: ED and ES)")
    ph.add_argument("--seed", type=int, default=0, help="random seed")
    ph.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="slice size")
    ph.add_argument("--workers", type=int, default=1, help="processes writing patients in parallel (same files)")
    ph.add_argument("--overwrite", action="store_true", help="replace an existing phantom folder")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "phantom":
        from raysemi.data.phantom import write_phantom
        from raysemi.data.layout import read_list

        out = write_phantom(args.out, args.patients, args.seed, tuple(args.size), overwrite=args.overwrite,
                            workers=args.workers)
        counts = {s: len(read_list(out, s)) for s in ("train_slices", "train", "val", "test")}
        print(f"phantom written to {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())

"""What the benchmark scripts share as command lines: raysemi's parser (a bad flag or value is one
`error:` line and exit 2, `--debug` shows the traceback), checks of their numbers and strategy
lists that name the flag and the value, and `run` around each script's `main`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from raysemi.errors import ArgumentParser, ScriptHelpFormatter, UserError, run_cli


def parser(description: str | None) -> ArgumentParser:
    return ArgumentParser(description=description, formatter_class=ScriptHelpFormatter)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def at_least(args: argparse.Namespace, **minimums: float) -> None:
    """UserError naming the first flag whose value is below its minimum (None: not given, allowed)."""
    for dest, low in minimums.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            what = f"an integer >= {low}" if isinstance(low, int) else f"a number >= {low:g}"
            raise UserError(f"{flag(dest)}: {value} is invalid; expected {what}")


def above(args: argparse.Namespace, **bounds: float) -> None:
    """UserError naming the first flag whose value is not above its bound (None: not given, allowed)."""
    for dest, low in bounds.items():
        value = getattr(args, dest)
        if value is not None and not value > low:
            raise UserError(f"{flag(dest)}: {value:g} is invalid; expected a number > {low:g}")


def patch_size(size: int, option: str = "--size") -> None:
    """A patch side the UNet can halve four times (`raysemi.config.patch_side_ok`)."""
    from raysemi.config import patch_side_ok

    if not patch_side_ok(size):
        raise UserError(f"{option}: {size} is invalid; expected a multiple of 16 (the UNet halves the size four "
                        "times), e.g. 256")


def methods(spec: str, option: str = "--methods") -> list[str]:
    """'all' or a comma-separated list of strategies (aliases ok) as canonical names, in order."""
    from raysemi.search import resolve_methods

    return resolve_methods(spec, option)


def numbers(text: str, option: str, kind: Callable[[str], float], expected: str,
            ok: Callable[[float], bool]) -> list:
    """A comma-separated list of numbers, each passing `ok`; UserError naming the first that does not."""
    out = []
    for item in text.split(","):
        try:
            value = kind(item)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise UserError(f"{option}: {item!r} is invalid; expected a comma-separated list of {expected}")
        out.append(value)
    return out


#: the config fields the benchmarks set from their own flags: a bad value is reported under the flag
CONFIG_FLAGS = {"data": "--data", "labeled_patients": "--labeled-patients", "patch_size": "--size",
                "batch_size": "--batch-size", "device": "--device", "amp": "--amp", "cuda_graphs": "--cuda-graphs"}


def check_data(data: str) -> None:
    """A wrong --data in one line before anything runs or is written (the phantom is made if needed)."""
    from raysemi.data import resolve_data_root
    from raysemi.data.layout import read_list

    read_list(resolve_data_root(data), "train_slices")


def search_refusal(returncode: int, output: str) -> UserError | None:
    """The one-line error of a `python -m raysemi.search` child that refused its settings (exit 2),
    as this script's UserError; None for any other outcome (a failure, shown whole by the caller)."""
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    if returncode != 2 or not lines:
        return None
    return UserError(f"the search refused its settings: {lines[-1][len('error: '):]}")


def check_out(path: str | Path, option: str = "--out") -> None:
    """Refuse an --out that could not be written, before the work that would fill it."""
    from raysemi.files import check_out_file

    check_out_file(path, option)


def write_json(path: str | Path, report: dict) -> Path:
    """Write the result whole (temp file, then rename: a run killed mid-write leaves the last
    complete one), its folder made now, not before the work: bad input leaves nothing behind."""
    from raysemi.files import write_text_atomic

    try:
        return write_text_atomic(path, json.dumps(report, indent=1))
    except OSError as err:
        raise UserError(f"--out: {path}: cannot be written ({err.strerror or err}); expected a file path in a "
                        "writable folder") from None


def run(main: Callable[[list[str]], int | None]) -> None:
    """The script's entry point: `main(argv)` through `raysemi.errors.run_cli`, exit with its code."""
    raise SystemExit(run_cli(main))

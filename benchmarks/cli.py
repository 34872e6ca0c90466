"""What the benchmark scripts share as command lines: raysemi's parser (a bad flag or value is one
`error:` line and exit 2, `--debug` shows the traceback), checks of their numbers and strategy
lists that name the flag and the value, and `run` around each script's `main`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

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
    """The UNet halves a patch four times: a side must be a positive multiple of 16."""
    if size < 16 or size % 16:
        raise UserError(f"{option}: {size} is invalid; expected a multiple of 16 (the UNet halves the size four "
                        "times), e.g. 256")


def methods(spec: str, option: str = "--methods") -> list[str]:
    """'all' or a comma-separated list of strategies (aliases ok) as canonical names, in order."""
    from raysemi.methods import list_methods, resolve_method_name

    if spec.strip().lower() == "all":
        return list_methods()
    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            canonical = resolve_method_name(name)
        except KeyError as err:
            raise UserError(f"{option}: {err.args[0]}") from None
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise UserError(f"{option}: {spec!r} is empty; expected a strategy, a comma-separated list or 'all'")
    return out


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


def run(main: Callable[[list[str]], int | None]) -> None:
    """The script's entry point: `main(argv)` through `raysemi.errors.run_cli`, exit with its code."""
    raise SystemExit(run_cli(main))

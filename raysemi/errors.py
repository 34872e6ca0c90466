"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence


class UserError(ValueError):
    """Bad input from the user: printed as one line, never as a traceback (unless --debug)."""


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point: a UserError (or ValueError from a constructor) becomes one line.

    Exit code 2 for bad input; `--debug` anywhere on the command line, or RAYSEMI_DEBUG=1, shows
    the traceback above that line (the exit code stays 2, so scripts see the same outcome).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RAYSEMI_DEBUG") == "1"
    try:
        return main(args) or 0
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help, unless the help already says its default or there is
    none to show (a `None` default means "not given": the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


class ScriptHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """For a script whose docstring is its help (benchmarks, examples): the docstring's example
    commands as written, each flag's default after its help."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a `--debug` flag on every CLI; usage errors exit 2 with one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        # `--max-iteration 100` must be an error, not a search at the default 30,000 iterations
        # that a prefix of another flag happened to start
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show full tracebacks instead of one-line errors")

    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, like every other error of the CLIs (train's usage block alone is ~30 lines)
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def not_a_command(module: str, instead: str) -> int:
    """For `python -m <module>` on a library module whose name sounds like a command: one line on
    stderr saying which command to use `instead`, and exit code 2 (not silence and 0)."""
    print(f"{module} is a library module, not a command: {instead}", file=sys.stderr)
    return 2

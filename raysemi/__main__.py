"""`raysemi <command> ...`: the console script; each command is also `python -m raysemi.<command>`."""

from __future__ import annotations

import sys

COMMANDS = {
    "search": "raysemi.search",
    "train": "raysemi.train",
    "evaluate": "raysemi.evaluate",
    "predict": "raysemi.predict",
    "data": "raysemi.data.__main__",
}


def main() -> int:
    import importlib

    usage = "usage: raysemi {" + ",".join(COMMANDS) + "} [options]  (each command has --help)"
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(usage)
        return 0
    if len(sys.argv) < 2:
        print(usage, file=sys.stderr)
        return 2
    if sys.argv[1] not in COMMANDS:
        print(f"error: {sys.argv[1]!r} is not a raysemi command; expected one of {', '.join(COMMANDS)} "
              "(each command has --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[sys.argv[1]])
    sys.argv = [f"raysemi {sys.argv[1]}"] + sys.argv[2:]
    return module.cli()


if __name__ == "__main__":
    raise SystemExit(main())

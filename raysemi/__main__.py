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

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in COMMANDS:
        print("usage: raysemi {" + ",".join(COMMANDS) + "} [options]  (each command has --help)",
              file=sys.stderr if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help") else sys.stdout)
        return 0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[sys.argv[1]])
    sys.argv = [f"raysemi {sys.argv[1]}"] + sys.argv[2:]
    return module.cli()


if __name__ == "__main__":
    raise SystemExit(main())

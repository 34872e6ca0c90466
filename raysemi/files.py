"""Writing files so that a reader never sees half of one: write a temp file beside it, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder and `os.replace` (atomic on
    one file system); the file gets the usual permissions, and a failed write leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:  # a leftover of a crashed process with this pid: replaced
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_out_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, or one
    under a path that is a file."""
    from raysemi.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder; expected a file path (e.g. {path / 'results.csv'})")
    check_out_parents(path, flag)


def out_folder(out: str | Path, flag: str = "--out") -> Path:
    """A dataset writer's --out folder: a link followed (the temp folder it writes first must lie
    beside the real folder, on its file system, and the link is not the folder to replace), and
    the folders above it checked (`check_out_parents`)."""
    out = Path(os.path.realpath(out)) if Path(out).is_symlink() else Path(out)
    check_out_parents(out, flag)
    return out


def check_out_parents(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output path (file or folder) whose nearest existing parent is a
    file or cannot be written to: the folders above it are made when it is written."""
    from raysemi.errors import UserError

    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag}: {path}: {parent} is a file; expected a folder there")
            why = cannot_write_in(parent)
            if why:
                raise UserError(f"{flag}: {path}: {parent} {why}; expected a folder you can write to")
            break


def cannot_write_in(folder: str | Path) -> str | None:
    """Why no file can be made in the existing `folder` ("is not writable", "cannot be written to
    (reason)"), or None. Root passes `os.access` almost everywhere (a read-only mount, /proc), so a
    file is made and removed there: found now rather than after the work."""
    if not os.access(folder, os.W_OK):
        return "is not writable"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".raysemi-probe-"):
            pass
    except OSError as err:
        return f"cannot be written to ({err.strerror or err})"
    return None

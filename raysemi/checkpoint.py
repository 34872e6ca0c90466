"""The raysemi checkpoint format: networks, config and (for resuming) the whole training state.

Files are plain `torch.save` dicts of tensors and primitives, loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysemi.errors import UserError

FORMAT = "raysemi-checkpoint"
VERSION = 1


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file, then rename) so a crash never leaves half a checkpoint; the
    file gets the usual permissions (mkstemp's 0600 would hide it from the team's other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a raysemi checkpoint; anything else is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals, empty files
        raise UserError(f"{path}: not a raysemi checkpoint (not a torch file that loads safely: "
                        f"{type(err).__name__}); expected a file written by raysemi.train") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: format: not a raysemi checkpoint; expected a file written by raysemi.train")
    for key in ("config", "networks"):
        if key not in ckpt:
            raise UserError(f"{path}: {key}: missing from the checkpoint")
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"{path}: config: a {type(ckpt['config']).__name__}; expected a mapping of config fields")
    nets = ckpt["networks"]
    if not isinstance(nets, dict) or not nets or not all(isinstance(v, dict) for v in nets.values()):
        raise UserError(f"{path}: networks: not a mapping of network name -> state dict; "
                        "expected a file written by raysemi.train")
    return ckpt


def load_network(module: nn.Module, state: dict[str, Any], path: str | Path, name: str, expected: str = "") -> None:
    """`load_state_dict` with a clear error when the checkpoint is for another architecture or
    class count (wrong keys or tensor shapes); `expected` describes the model built, e.g.
    "unet, num_classes=4, in_channels=1 (from the checkpoint's config)"."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[1:2] or lines[:1]
        raise UserError(f"{path}: networks.{name}: does not match the model{' ' + expected if expected else ''} "
                        f"({first[0][:200] if first else 'state dict mismatch'})") from None

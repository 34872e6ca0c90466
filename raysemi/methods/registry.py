"""Strategies by name: `create_method(name, student, **hyperparameters)`."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

_METHODS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type) -> type:
    """Class decorator: register a Strategy under its `name` and `aliases`."""
    for key in (cls.name, *cls.aliases):
        if key in _METHODS or key in _ALIASES:
            raise ValueError(f"strategy name {key!r} is already registered")
    _METHODS[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def list_methods() -> list[str]:
    """Registered strategy names in registration order (aliases not included)."""
    return list(_METHODS)


def resolve_method_name(name: str) -> str:
    """Canonical name for a name or alias; KeyError lists the known ones."""
    key = name.strip().lower()
    if key in _METHODS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"unknown method {name!r}; known: {describe_names()}")


def resolve_method_list(spec: str) -> list[str]:
    """'all', or a comma-separated list of names and aliases, as canonical names in order, each once.
    KeyError for an unknown name (listing the known ones), ValueError for an empty list."""
    if spec.strip().lower() == "all":
        return list_methods()
    out = []
    for name in (s for s in spec.split(",") if s.strip()):
        canonical = resolve_method_name(name)
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise ValueError(f"{spec!r} names no strategy; expected a strategy, a comma-separated list or 'all'")
    return out


def describe_names() -> str:
    """'supervised, mean_teacher (mt), ...': the registered names with their aliases."""
    return ", ".join(f"{n} ({', '.join(c.aliases)})" if c.aliases else n for n, c in _METHODS.items())


def get_method(name: str) -> type:
    return _METHODS[resolve_method_name(name)]


def method_kwargs(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The subset of `values` (e.g. a config dict) that the strategy's constructor takes."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in values.items() if k in params and k not in ("self", "student")}


def create_method(name: str, student: nn.Module, **kwargs: Any) -> nn.Module:
    """Build a registered strategy around `student`; extra keyword arguments it does not take
    are ignored, so a whole config dict can be passed."""
    cls = get_method(name)
    return cls(student, **method_kwargs(cls, kwargs))

"""Networks by name: `create_model("unet", in_channels=1, num_classes=4)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from raysemi.models.discriminator import Discriminator
from raysemi.models.unet import UNet, UNetDS, main_output

__all__ = ["UNet", "UNetDS", "Discriminator", "create_model", "list_models", "register_model", "main_output"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered segmentation network; unknown names list the known ones."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


register_model("unet")(UNet)
register_model("unet_ds")(UNetDS)

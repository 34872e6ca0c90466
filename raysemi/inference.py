"""Batched inference on whole volumes and their evaluation against labels."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from raysemi.data.layout import Volume
from raysemi.data.sampler import resize_nearest
from raysemi.metrics import Summary, case_metrics, class_names
from raysemi.models import main_output


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, patch_size: tuple[int, int], device: torch.device,
                   batch_size: int = 32, amp: bool = False, channels_last: bool = False) -> np.ndarray:
    """Labels (D, H, W) for a (D, H, W) image: slices resized to the patch size (nearest, as the
    reference), segmented `batch_size` at a time, mapped back to the volume's size (nearest)."""
    was_training = model.training
    model.eval()
    D, H, W = image.shape
    x = resize_nearest(image, patch_size).float().to(device)[:, None]  # copes with read-only arrays
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    preds = []
    for i in range(0, D, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = main_output(model(x[i:i + batch_size]))
        preds.append(logits.argmax(dim=1).to(torch.uint8))
    pred = resize_nearest(torch.cat(preds), (H, W))
    model.train(was_training)
    return pred.cpu().numpy()


def evaluate_volumes(model: nn.Module, volumes: Iterable[Volume], num_classes: int, patch_size: tuple[int, int],
                     device: torch.device, batch_size: int = 32, distances: bool = True, amp: bool = False,
                     channels_last: bool = False) -> Summary:
    """Per-volume, per-class metrics of `model` on `volumes`."""
    rows = []
    for vol in volumes:
        pred = predict_volume(model, vol.image, patch_size, device, batch_size, amp, channels_last)
        rows.append((vol.name, case_metrics(pred, vol.label, num_classes, vol.spacing, distances)))
    return Summary(class_names(num_classes), rows)

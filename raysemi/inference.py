"""Batched inference on whole volumes and their evaluation against labels."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from raysemi.data.layout import Volume
from raysemi.data.sampler import resize_nearest
from raysemi.metrics import Summary, case_metrics, class_names
from raysemi.models import main_output
from raysemi.progress import ProgressBar


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
                     channels_last: bool = False, workers: int | None = None,
                     bar: ProgressBar | None = None) -> Summary:
    """Per-volume metrics of `model` on `volumes`, in the volumes' order.

    The metrics (surface distances: distance transforms on the host) of each segmented volume are
    computed on `workers` threads (default: torch's intra-op thread count, i.e. the trial's CPUs)
    while the device segments the next volumes. On a GPU the pass is bound by those host
    transforms, not by the network. The result equals a serial pass (`workers=1`; tested).
    `bar` counts a volume when its metrics are done (not when it is segmented: the last metrics
    can take seconds), and says how many are segmented meanwhile.
    """
    n = torch.get_num_threads() if workers is None else workers
    if n <= 1:
        rows = []
        for vol in volumes:
            pred = predict_volume(model, vol.image, patch_size, device, batch_size, amp, channels_last)
            rows.append((vol.name, case_metrics(pred, vol.label, num_classes, vol.spacing, distances)))
            if bar is not None:
                bar.update(len(rows), f"{len(rows)} segmented")
        return Summary(class_names(num_classes), rows)
    pool = ThreadPoolExecutor(n, thread_name_prefix="raysemi-metrics")

    def show() -> None:
        if bar is not None:
            bar.update(sum(job.done() for _, job in pending), f"{len(pending)} segmented")

    try:
        pending = []
        for vol in volumes:
            pred = predict_volume(model, vol.image, patch_size, device, batch_size, amp, channels_last)
            pending.append((vol.name, pool.submit(case_metrics, pred, vol.label, num_classes, vol.spacing, distances)))
            failed = next((job for _, job in pending if job.done() and job.exception() is not None), None)
            if failed is not None:  # a failed metric stops the pass now, not after every volume is segmented
                failed.result()
            show()
        rows = []
        for name, job in pending:
            rows.append((name, job.result()))
            show()
    except BaseException:  # Ctrl-C or an error: drop the queued metrics instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return Summary(class_names(num_classes), rows)

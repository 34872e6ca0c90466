"""BatchNorm with its batch statistics taken per group of samples: several forwards in one.

Convolutions, activations and dropout act on each sample alone; only BatchNorm (in train mode)
mixes the samples of a batch. So a network whose BatchNorm layers normalise each group of samples
by that group's own statistics, and update their running statistics group after group, computes
on `cat(x_1, ..., x_G)` exactly what G separate forwards compute on `x_1, ..., x_G`, with fewer,
larger kernels (dropout draws the same kind of masks, in another order of the random generator).
UA-MT's teacher uses it to run the reference's five noisy forwards as one
(`uncertainty_grouped_forward`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupableBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters, buffers and state-dict keys) that, while `group_sizes`
    is set and it is training, normalises each consecutive group of samples on its own, as if the
    groups were separate forwards. Set the sizes with `batch_norm_groups`, not by hand."""

    group_sizes: tuple[int, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        sizes = self.group_sizes
        if sizes is None or not self.training:
            return super().forward(x)
        outs = []
        for chunk in x.split(sizes):
            # F.batch_norm updates the running statistics in place, one group after the other,
            # as len(sizes) separate forwards would
            outs.append(F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias,
                                     True, self.momentum, self.eps))
        self.num_batches_tracked.add_(len(sizes))
        return torch.cat(outs)


def uses_groupable_batch_norm(net: nn.Module) -> bool:
    """Whether every BatchNorm layer of `net` can take per-group statistics (a network without
    BatchNorm trivially can)."""
    return all(isinstance(m, GroupableBatchNorm2d) and m.momentum is not None and m.track_running_stats
               for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@contextmanager
def batch_norm_groups(net: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, `net`'s forwards in train mode treat their batch as consecutive groups of
    `sizes` samples with BatchNorm statistics of their own (their sum must be the batch size)."""
    if not uses_groupable_batch_norm(net):
        raise ValueError(f"{type(net).__name__}: per-group BatchNorm statistics need every BatchNorm layer to be a "
                         "GroupableBatchNorm2d with a momentum and running statistics")
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch_norm_groups: group sizes must be positive, got {sizes}")
    layers = [m for m in net.modules() if isinstance(m, GroupableBatchNorm2d)]
    for m in layers:
        m.group_sizes = sizes
    try:
        yield
    finally:
        for m in layers:
            m.group_sizes = None

"""The SSL4MIS 2D UNet and its deep-supervision variant (URPC), written from the paper's design.

Feature channels 16-32-64-128-256, encoder dropout 0.05/0.1/0.2/0.3/0.5, BatchNorm + LeakyReLU
conv blocks. Upsampling: the reference's decoder blocks default to a 1x1 conv then bilinear x2
(align_corners=True), which is what gives its 1,813,764 parameters for 1 channel and 4 classes;
METHODS.md's "transposed-conv" variant (`upsampling="transposed"`, 1,944,324 parameters) is kept
as an option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysemi.models.batch_norm_groups import GroupableBatchNorm2d

FEATURES = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU, dropout, conv3x3-BN-LeakyReLU (BN: `nn.BatchNorm2d` that can also
    take its statistics per group of samples, see `batch_norm_groups`)."""

    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), GroupableBatchNorm2d(cout), nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), GroupableBatchNorm2d(cout), nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    """x2 upsampling (1x1 conv + bilinear, or transposed conv), concatenation with the skip,
    then a conv block."""

    def __init__(self, cin: int, cskip: int, cout: int, upsampling: str = "bilinear") -> None:
        super().__init__()
        if upsampling == "bilinear":
            self.up = nn.Sequential(nn.Conv2d(cin, cskip, kernel_size=1),
                                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
        elif upsampling == "transposed":
            self.up = nn.ConvTranspose2d(cin, cskip, kernel_size=2, stride=2)
        else:
            raise ValueError(f"upsampling must be 'bilinear' or 'transposed', got {upsampling!r}")
        self.conv = ConvBlock(cskip * 2, cout, 0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Encoder(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        f, p = FEATURES, DROPOUT
        self.stages = nn.ModuleList([ConvBlock(in_channels, f[0], p[0])])
        for i in range(1, 5):
            self.stages.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(f[i - 1], f[i], p[i])))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UNet(nn.Module):
    """Reference 2D UNet: logits (B, num_classes, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, upsampling: str = "bilinear") -> None:
        super().__init__()
        f = FEATURES
        self.encoder = Encoder(in_channels)
        self.ups = nn.ModuleList([UpBlock(f[i + 1], f[i], f[i], upsampling) for i in (3, 2, 1, 0)])
        self.head = nn.Conv2d(f[0], num_classes, 3, padding=1)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encoder(x)
        y = feats[4]
        for up, skip in zip(self.ups, (feats[3], feats[2], feats[1], feats[0])):
            y = up(y, skip)
        return self.head(y)


def feature_dropout(x: Tensor) -> Tensor:
    """URPC feature dropout: zero the positions whose channel-mean activation is below a fraction
    of that sample's maximum, the fraction drawn from 0.7-0.9 once for the batch (as the
    reference's one NumPy draw per call)."""
    attention = x.mean(dim=1, keepdim=True)
    peak = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    threshold = peak * peak.new_empty(()).uniform_(0.7, 0.9)
    return x * (attention < threshold).to(x.dtype)


def feature_noise(x: Tensor, scale: float = 0.3) -> Tensor:
    """URPC feature noise: `x + x * n`, one uniform(-scale, scale) map shared over the batch."""
    noise = torch.empty(x.shape[1:], device=x.device, dtype=x.dtype).uniform_(-scale, scale)
    return x + x * noise.unsqueeze(0)


class UNetDS(UNet):
    """UNet with deep supervision (URPC): four outputs, finest first, each at the input size.

    While training, the three auxiliary heads see dropout (p 0.5), feature dropout and feature
    noise respectively, as in the reference. In eval mode `forward` returns all four too; use
    `main_output` (or index 0) for inference. The reference's unused fifth head is left out, so
    every parameter takes part in the loss.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, upsampling: str = "bilinear") -> None:
        super().__init__(in_channels, num_classes, upsampling)
        f = FEATURES
        self.aux_heads = nn.ModuleList([nn.Conv2d(f[i], num_classes, 3, padding=1) for i in (3, 2, 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        size = x.shape[2:]
        feats = self.encoder(x)
        y = feats[4]
        aux = []
        perturb = (lambda t: F.dropout(t, 0.5, True), feature_dropout, feature_noise)
        for level, (up, skip) in enumerate(zip(self.ups, (feats[3], feats[2], feats[1], feats[0]))):
            y = up(y, skip)
            if level < 3:
                z = perturb[level](y) if self.training else y
                aux.append(F.interpolate(self.aux_heads[level](z), size=size, mode="nearest"))
        main = self.head(y)
        return main, aux[2], aux[1], aux[0]


def main_output(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The segmentation logits of any registered model (the finest output of a multi-head one)."""
    return output[0] if isinstance(output, (tuple, list)) else output

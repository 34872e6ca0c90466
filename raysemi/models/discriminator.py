"""The DAN discriminator (Zhang et al., MICCAI 2017) in the SSL4MIS 2D form."""

from __future__ import annotations

from torch import Tensor, nn


class Discriminator(nn.Module):
    """Scores (softmax map, image) pairs: class 1 'labeled-like', class 0 'unlabeled-like'.

    A 4x4 stride-2 conv on the map and one on the image (ndf filters each), summed; then 4x4
    stride-2 convs to 2, 4 and 8 x ndf channels with LeakyReLU(0.2) and Dropout2d(0.5) (none
    after the last); global average pooling (the reference's fixed 7x7 pool assumes 256x256
    input); a 2-way linear classifier.
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 1, ndf: int = 64) -> None:
        super().__init__()
        self.map_conv = nn.Conv2d(num_classes, ndf, 4, stride=2, padding=1)
        self.image_conv = nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1)
        act = nn.LeakyReLU(0.2)
        self.body = nn.Sequential(
            nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1), act, nn.Dropout2d(0.5),
            nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1), act, nn.Dropout2d(0.5),
            nn.Conv2d(ndf * 4, ndf * 8, 4, stride=2, padding=1), act,
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(ndf * 8, 2)

    def forward(self, probs: Tensor, image: Tensor) -> Tensor:
        return self.classifier(self.body(self.map_conv(probs) + self.image_conv(image)))

"""A small CNN for small images (28-32 px, e.g. MNIST-like data): two stages of two 3x3
convolutions with BatchNorm and ReLU, each stage ending in a 2x2 max-pool, then global average
pooling, dropout and a linear head. Any image size of 8 px or more works (the pooling at the end
is global). The classification family supplies ``num_outputs`` and ``in_channels`` from the data.

At ``width=32`` on 28 px inputs: 66k parameters, about 18M multiply-adds per image.
"""
from __future__ import annotations

from torch import Tensor, nn

from runner.errors import UserError


def _block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_outputs: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if width < 1 or not 0 <= dropout < 1:
            raise UserError(f"model: need width >= 1 and dropout in [0, 1); got width={width}, dropout={dropout}")
        self.features = nn.Sequential(
            *_block(in_channels, width), *_block(width, width), nn.MaxPool2d(2),
            *_block(width, 2 * width), *_block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(2 * width, num_outputs))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

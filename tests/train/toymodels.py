"""A test image encoder without batch statistics, registered under ``test_flat_cnn``.

BatchNorm computes statistics per device (SyncBatchNorm has no CPU implementation), so with it a run on 2 ranks
x B is a slightly different function from 1 rank x 2B. Tests that compare across world sizes or micro-batch
splits use this encoder; ``python tests/train/toymodels.py ARGS`` runs ``soilnet ARGS`` with it registered.
"""

from __future__ import annotations

import sys

from torch import nn

from soilnet.cli import main
from soilnet.models import register
from soilnet.schema import SampleSchema


class FlatCNN(nn.Module):
    """image ``(B, C, H, W)`` -> ``(B, out)``: strided convolution, GELU, global average pooling, Linear."""

    def __init__(self, in_channels: int, out: int, width: int = 8):
        super().__init__()
        self.out_features = out
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=4),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, out),
        )

    def forward(self, image):
        return self.net(image)


@register("image_encoder", "test_flat_cnn")
def test_flat_cnn(schema: SampleSchema, out: int = 32, width: int = 8) -> FlatCNN:
    return FlatCNN(schema.n_channels, out, width)


FLAT = ["model.image_encoder.name=test_flat_cnn"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Tiny encoders for CPU tests and the demo: the same interfaces as the paper's models, a few thousand weights."""

from __future__ import annotations

import torch
from torch import nn

from soilnet.models.registry import register
from soilnet.schema import SampleSchema


class TinyCNN(nn.Module):
    """image ``(B, C, H, W)`` -> ``(B, out)``: two strided convolutions and global average pooling."""

    def __init__(self, in_channels: int, out: int = 64, width: int = 16):
        super().__init__()
        self.out_features = out
        self.features = nn.Sequential(
            # no bias before BatchNorm: it would cancel, and a parameter whose gradient is zero but for rounding
            # moves by Adam-normalised rounding noise (unlike the rest, it would differ between world sizes)
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, out)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first: each convolution with its batch norm, the head."""
        f = self.features
        return [
            ("conv1", [*f[0].parameters(), *f[1].parameters()]),
            ("conv2", [*f[3].parameters(), *f[4].parameters()]),
            ("out", list(self.head.parameters())),
        ]


class TinyGRU(nn.Module):
    """climate ``(B, T, F)`` -> ``(B, out)``: one GRU layer; the last step feeds a Linear."""

    def __init__(self, n_features: int, out: int = 64, hidden: int = 32):
        super().__init__()
        self.out_features = out
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, climate: torch.Tensor) -> torch.Tensor:
        steps, _ = self.gru(climate)
        return self.head(steps[:, -1])

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first: the GRU layer, the head."""
        return [("gru.l0", list(self.gru.parameters())), ("out", list(self.head.parameters()))]


@register("image_encoder", "tiny_cnn")
def tiny_cnn(schema: SampleSchema, out: int = 64, width: int = 16) -> TinyCNN:
    return TinyCNN(schema.n_channels, out, width)


@register("climate_encoder", "tiny_gru")
def tiny_gru(schema: SampleSchema, out: int = 64, hidden: int = 32) -> TinyGRU:
    return TinyGRU(schema.n_climate, out, hidden)

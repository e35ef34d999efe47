"""GLAM: global-local attention over channels and space (Song, Han & Avrithis, WACV 2022), as in SSL-SoilNet.

forward(x ``(B, C, H, W)``) -> ``(B, C, H, W)``: a learnable softmax-weighted sum of the local-attention map,
the input, and the global-attention map. The defaults are the seed's: ``reduced`` 32 channels in the spatial
attentions and a 1-D ``kernel_size`` of 5 in the channel attentions (110,454 weights on 512 channels).
Differences from the seed's code, on purpose: the global channel attention uses its own key convolution (the
seed created one but applied the query convolution twice; the weight count is the same), and pooling is
adaptive, so the block works for any feature-map size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_conv(kernel_size: int) -> nn.Conv1d:
    """A 1-D convolution across pooled channels, one in and one out, keeping their number (``kernel_size`` odd)."""
    if kernel_size % 2 != 1:
        raise ValueError("GLAM kernel_size must be odd")
    return nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2)


class LocalChannelAttention(nn.Module):
    """ECA-style: a 1-D convolution across the pooled channels gives per-channel weights; x * a + x."""

    def __init__(self, kernel_size: int = 5):
        super().__init__()
        self.conv = channel_conv(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        att = self.conv(F.adaptive_avg_pool2d(x, 1).reshape(b, 1, c)).sigmoid().reshape(b, c, 1, 1)
        return x * att + x


class LocalSpatialAttention(nn.Module):
    """1x1 reduction, dilated 3x3 convolutions (dilation 1, 2, 3), concatenation, 1x1 to one map."""

    def __init__(self, in_channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, reduced, 1)
        self.dilated = nn.ModuleList(nn.Conv2d(reduced, reduced, 3, padding=d, dilation=d) for d in (1, 2, 3))
        self.fuse = nn.Conv2d(4 * reduced, 1, 1)

    def forward(self, x: torch.Tensor, channel_attended: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        att = self.fuse(torch.cat([r, *(conv(r) for conv in self.dilated)], dim=1))
        return channel_attended * att + channel_attended


class GlobalChannelAttention(nn.Module):
    """Channel-to-channel attention from 1-D query and key convolutions over the pooled channels."""

    def __init__(self, kernel_size: int = 5):
        super().__init__()
        self.conv_q = channel_conv(kernel_size)
        self.conv_k = channel_conv(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pooled = F.adaptive_avg_pool2d(x, 1).reshape(b, 1, c)
        query = self.conv_q(pooled).sigmoid()
        key = self.conv_k(pooled).sigmoid().permute(0, 2, 1)
        attn = torch.bmm(key, query).reshape(b, -1).softmax(-1).reshape(b, c, c)
        value = x.permute(0, 2, 3, 1).reshape(b, -1, c)
        att = torch.bmm(value, attn).permute(0, 2, 1).reshape(b, c, h, w)
        return x * att


class GlobalSpatialAttention(nn.Module):
    """Position-to-position attention with 1x1 query/key/value reductions, projected back to C channels."""

    def __init__(self, in_channels: int, reduced: int):
        super().__init__()
        self.q = nn.Conv2d(in_channels, reduced, 1)
        self.k = nn.Conv2d(in_channels, reduced, 1)
        self.v = nn.Conv2d(in_channels, reduced, 1)
        self.out = nn.Conv2d(reduced, in_channels, 1)

    def forward(self, x: torch.Tensor, channel_attended: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (conv(x).flatten(2) for conv in (self.q, self.k, self.v))  # (B, r, HW)
        attn = torch.bmm(k.transpose(1, 2), q).reshape(b, -1).softmax(-1).reshape(b, h * w, h * w)
        att = self.out(torch.bmm(v, attn).reshape(b, -1, h, w))
        return channel_attended * att + channel_attended


class GLAM(nn.Module):
    """x ``(B, C, H, W)`` -> ``(B, C, H, W)``."""

    def __init__(self, in_channels: int, reduced: int = 32, kernel_size: int = 5):
        super().__init__()
        self.local_channel = LocalChannelAttention(kernel_size)
        self.local_spatial = LocalSpatialAttention(in_channels, reduced)
        self.global_channel = GlobalChannelAttention(kernel_size)
        self.global_spatial = GlobalSpatialAttention(in_channels, reduced)
        self.fusion_weights = nn.Parameter(torch.full((3,), 1 / 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local_spatial(x, self.local_channel(x))
        global_ = self.global_spatial(x, self.global_channel(x))
        w = self.fusion_weights.softmax(-1)
        return w[0] * local + w[1] * x + w[2] * global_

"""Heads: the SoilNet fusion regressors and the contrastive projection head."""

from __future__ import annotations

import torch
from torch import nn

from soilnet.models.registry import register
from soilnet.schema import SampleSchema


class FusionRegressor(nn.Module):
    """The seed's regressor: per-branch Linear->128 + sigmoid, concatenate, Linear->128 + sigmoid, Linear->1.

    ``inputs``: the feature sizes of the branches in use, e.g. ``(1024, 128)`` for image and climate.
    ``dropout`` 0 is v1; v2 intends 0.25 (the seed's ``0.5//2`` made it 0, a bug fixed here).
    forward(*features ``(B, d_i)``) -> ``(B, 1)``.
    """

    def __init__(self, inputs: tuple[int, ...], hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid()) for d in inputs)
        self.fuse = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden * len(inputs), hidden), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.out = nn.Linear(hidden, 1)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) != len(self.branches):
            raise ValueError(f"regressor expects {len(self.branches)} feature tensors, got {len(features)}")
        fused = torch.cat([branch(f) for branch, f in zip(self.branches, features, strict=True)], dim=1)
        return self.out(self.fuse(fused))


@register("regressor", "regressor_v1")
def regressor_v1(schema: SampleSchema, inputs: tuple[int, ...] = (128, 128), hidden: int = 128) -> FusionRegressor:
    return FusionRegressor(tuple(inputs), hidden, dropout=0.0)


@register("regressor", "regressor_v2")
def regressor_v2(
    schema: SampleSchema, inputs: tuple[int, ...] = (128, 128), hidden: int = 128, dropout: float = 0.25
) -> FusionRegressor:
    return FusionRegressor(tuple(inputs), hidden, dropout=dropout)


class ProjectionHead(nn.Module):
    """SimCLR-style projection ``(B, d_in)`` -> ``(B, d_out)``: Linear, ReLU, Linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(inplace=True), nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

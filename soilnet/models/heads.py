"""Heads: the SoilNet fusion regressors and the contrastive projection head."""

from __future__ import annotations

import torch
from torch import nn

from soilnet.models.registry import register
from soilnet.schema import SampleSchema


class FusionRegressor(nn.Module):
    """The seed's regressor v1: per-branch Linear->128 + sigmoid, concatenate, Linear->128 + sigmoid, Linear->1.

    ``inputs``: the feature sizes of the branches in use, e.g. ``(1024, 128)`` for image and climate.
    ``dropout`` (0 in v1) acts before and after the fusing Linear. forward(*features ``(B, d_i)``) -> ``(B, 1)``.
    """

    def __init__(self, inputs: tuple[int, ...], hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid()) for d in inputs)
        self.fuse: nn.Module = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden * len(inputs), hidden), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.out: nn.Module = nn.Linear(hidden, 1)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) != len(self.branches):
            raise ValueError(f"regressor expects {len(self.branches)} feature tensors, got {len(features)}")
        fused = torch.cat([branch(f) for branch, f in zip(self.branches, features, strict=True)], dim=1)
        return self.out(self.fuse(fused))


class FusionRegressorV2(FusionRegressor):
    """The seed's regressor v2: per-branch Linear->128 + sigmoid, concatenate, Linear->128, dropout, sigmoid,
    Linear->32 + sigmoid, Linear->1, and a ReLU on the output.

    ``dropout`` 0.25 is what the seed intended (its ``0.5//2`` made it 0, a bug fixed here). The output ReLU suits
    the seed's targets in [0, 1]; ``relu_output=False`` drops it for targets that can be negative (standardised
    ones). forward(*features ``(B, d_i)``) -> ``(B, 1)``.
    """

    def __init__(self, inputs: tuple[int, ...], hidden: int = 128, dropout: float = 0.25, relu_output: bool = True):
        super().__init__(inputs, hidden)
        narrow = hidden // 4
        self.fuse = nn.Sequential(
            nn.Linear(hidden * len(inputs), hidden),
            nn.Dropout(dropout),
            nn.Sigmoid(),
            nn.Linear(hidden, narrow),
            nn.Sigmoid(),
        )
        self.out = nn.Sequential(nn.Linear(narrow, 1), nn.ReLU() if relu_output else nn.Identity())


@register("regressor", "regressor_v1")
def regressor_v1(schema: SampleSchema, inputs: tuple[int, ...] = (128, 128), hidden: int = 128) -> FusionRegressor:
    return FusionRegressor(tuple(inputs), hidden, dropout=0.0)


@register("regressor", "regressor_v2")
def regressor_v2(
    schema: SampleSchema,
    inputs: tuple[int, ...] = (128, 128),
    hidden: int = 128,
    dropout: float = 0.25,
    relu_output: bool = True,
) -> FusionRegressorV2:
    return FusionRegressorV2(tuple(inputs), hidden, dropout=dropout, relu_output=relu_output)


class ProjectionHead(nn.Module):
    """SimCLR-style projection ``(B, d_in)`` -> ``(B, d_out)``: Linear, ReLU, Linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(inplace=True), nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

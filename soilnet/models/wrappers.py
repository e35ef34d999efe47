"""Whole models: the contrastive pair of encoders, and the regressor on top of (pretrained) encoders."""

from __future__ import annotations

import torch
from torch import nn

from soilnet.models.heads import ProjectionHead


def out_features(encoder: nn.Module) -> int:
    """The embedding size an encoder declares as ``out_features``."""
    size = getattr(encoder, "out_features", None)
    if not isinstance(size, int):
        raise TypeError(f"{type(encoder).__name__} must declare its embedding size as an int `out_features`")
    return size


class ContrastiveModel(nn.Module):
    """forward(image ``(B, C, H, W)``, climate ``(B, T, F)``) -> (z_img ``(B, D)``, z_clim ``(B, D)``).

    With ``projection_dim`` each branch gets a projection head to ``D = projection_dim``; without, the two
    encoders must already embed to the same size. The encoders alone are what ``soilnet export`` keeps.
    """

    image_projection: ProjectionHead | None
    climate_projection: ProjectionHead | None

    def __init__(self, image_encoder: nn.Module, climate_encoder: nn.Module, projection_dim: int | None = None):
        super().__init__()
        self.image_encoder = image_encoder
        self.climate_encoder = climate_encoder
        d_img, d_clim = out_features(image_encoder), out_features(climate_encoder)
        if projection_dim is None:
            if d_img != d_clim:
                raise ValueError(f"image ({d_img}) and climate ({d_clim}) embeddings differ: set model.projection_dim")
            self.image_projection = self.climate_projection = None
        else:
            self.image_projection = ProjectionHead(d_img, projection_dim)
            self.climate_projection = ProjectionHead(d_clim, projection_dim)

    def forward(self, image: torch.Tensor, climate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_img, z_clim = self.image_encoder(image), self.climate_encoder(climate)
        if self.image_projection is not None and self.climate_projection is not None:
            z_img, z_clim = self.image_projection(z_img), self.climate_projection(z_clim)
        return z_img, z_clim


class RegressionModel(nn.Module):
    """forward(image ``(B, C, H, W)`` | None, climate ``(B, T, F)`` | None) -> ``(B, 1)``.

    Either encoder may be None (image-only or climate-only models); the regressor sees the features of the
    encoders in use, image first.
    """

    def __init__(self, image_encoder: nn.Module | None, climate_encoder: nn.Module | None, regressor: nn.Module):
        super().__init__()
        if image_encoder is None and climate_encoder is None:
            raise ValueError("a regression model needs at least one encoder")
        self.image_encoder = image_encoder
        self.climate_encoder = climate_encoder
        self.regressor = regressor

    def forward(self, image: torch.Tensor | None = None, climate: torch.Tensor | None = None) -> torch.Tensor:
        features = []
        if self.image_encoder is not None:
            if image is None:
                raise ValueError("this model uses images; got image=None")
            features.append(self.image_encoder(image))
        if self.climate_encoder is not None:
            if climate is None:
                raise ValueError("this model uses climate series; got climate=None")
            features.append(self.climate_encoder(climate))
        return self.regressor(*features)

"""The SoilNet model family: image encoders, climate encoders, heads, and the whole models built from a config.

Every piece is chosen by registry name (:mod:`soilnet.models.registry`); input sizes come from the data schema.
"""

from __future__ import annotations

from soilnet.config.model import ModelConfig
from soilnet.models import climate, cnn, heads, tiny, vit  # noqa: F401  (registers the builders)
from soilnet.models.layer_decay import lr_blocks
from soilnet.models.registry import build, names, register
from soilnet.models.wrappers import ContrastiveModel, RegressionModel, out_features
from soilnet.schema import SampleSchema

__all__ = [
    "ContrastiveModel",
    "RegressionModel",
    "build",
    "build_contrastive_model",
    "build_regression_model",
    "lr_blocks",
    "names",
    "register",
]


def _encoder(kind: str, component, schema: SampleSchema):
    if component is None:
        raise ValueError(f"model.{kind} is not set")
    return build(kind, component.name, schema, **component.kwargs)


def build_contrastive_model(cfg: ModelConfig, schema: SampleSchema) -> ContrastiveModel:
    """Image and climate encoders (+ projection heads) for cross-modal contrastive pretraining."""
    return ContrastiveModel(
        _encoder("image_encoder", cfg.image_encoder, schema),
        _encoder("climate_encoder", cfg.climate_encoder, schema),
        cfg.projection_dim,
    )


def build_regression_model(
    cfg: ModelConfig, schema: SampleSchema, modalities: str | tuple[str, ...] = "both"
) -> RegressionModel:
    """Encoders for ``modalities`` (``both``, ``image``, ``climate``, or a tuple of the latter) and the regressor,
    whose branch sizes follow the encoders' ``out_features``."""
    use = ("image", "climate") if modalities == "both" else (modalities,) if isinstance(modalities, str) else modalities
    unknown = set(use) - {"image", "climate"}
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; use image, climate or both")
    image_encoder = _encoder("image_encoder", cfg.image_encoder, schema) if "image" in use else None
    climate_encoder = _encoder("climate_encoder", cfg.climate_encoder, schema) if "climate" in use else None
    inputs = tuple(out_features(e) for e in (image_encoder, climate_encoder) if e is not None)
    regressor = build("regressor", cfg.regressor.name, schema, **{"inputs": inputs, **cfg.regressor.kwargs})
    return RegressionModel(image_encoder, climate_encoder, regressor)

"""``soilnet model-summary``: one JSON object with the parameter count of each component and the total."""

from __future__ import annotations

import json

from torch import nn

from soilnet.config.model import ModelSummaryConfig
from soilnet.models import build_regression_model


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def summarize(cfg: ModelSummaryConfig) -> dict:
    schema = cfg.schema_.build()
    model = build_regression_model(cfg.model, schema, "both")
    return {
        "image_encoder": {"name": cfg.model.image_encoder.name, "parameters": count(model.image_encoder)},
        "climate_encoder": {"name": cfg.model.climate_encoder.name, "parameters": count(model.climate_encoder)},
        "regressor": {"name": cfg.model.regressor.name, "parameters": count(model.regressor)},
        "total": count(model),
        "input": {"image": list(schema.image_shape), "climate": list(schema.climate_shape)},
    }


def run(cfg: ModelSummaryConfig) -> int:
    print(json.dumps(summarize(cfg)))
    return 0

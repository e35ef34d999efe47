"""``soilnet model-summary``: one JSON object with the parameter count of each component, the total, and the
fine-tuning learning-rate groups.

It reads a fine-tuning config (or a model file, configs/model/*.yaml, whose ``schema`` is the data schema):
the model is sized by ``data.schema`` and built for ``modalities``; ``lr_groups`` is the table fine-tuning logs
for ``train.encoders`` and ``train.layer_decay`` (:func:`soilnet.models.layer_decay.lr_table`).
"""

from __future__ import annotations

import json

from torch import nn

from soilnet.config.finetune import FinetuneConfig
from soilnet.models import build_regression_model
from soilnet.models.layer_decay import lr_groups, lr_table


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def summarize(cfg: FinetuneConfig) -> dict:
    """Counts per component (an encoder the modalities leave out is null), the total, the input shapes, and
    ``lr_groups``: ``[{"name", "parameters", "lr_scale"}]``, summing to the total."""
    schema = cfg.data.schema_.build()
    model = build_regression_model(cfg.model, schema, cfg.modalities)
    parts = {}
    for kind in ("image_encoder", "climate_encoder"):
        encoder = getattr(model, kind)
        parts[kind] = None if encoder is None else {"name": getattr(cfg.model, kind).name, "parameters": count(encoder)}
    return {
        **parts,
        "regressor": {"name": cfg.model.regressor.name, "parameters": count(model.regressor)},
        "total": count(model),
        "input": {"image": list(schema.image_shape), "climate": list(schema.climate_shape)},
        "lr_groups": lr_table(lr_groups(model, cfg.train.encoders, cfg.train.layer_decay)),
    }


def run(cfg: FinetuneConfig) -> int:
    print(json.dumps(summarize(cfg)))
    return 0

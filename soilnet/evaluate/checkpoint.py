"""Scoring a saved fine-tuned model (:func:`soilnet.train.regressor.load_model`) on every point of other
labelled shards: an independent test set, no folds and no baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from soilnet.config.finetune import EvaluateConfig
from soilnet.config.schema import SchemaConfig
from soilnet.data.labelled import LabelledData, load_labelled
from soilnet.evaluate.conformal import coverage, intervals
from soilnet.evaluate.metrics import regression_metrics
from soilnet.evaluate.plan import EvaluationError
from soilnet.train.regressor import Finetuned, load_model


@dataclass
class Scored:
    """The labelled points, the model's predictions ``(N,)`` on them and metrics.json's content (no plots)."""

    data: LabelledData
    pred: np.ndarray
    metrics: dict


def _data_for(cfg: EvaluateConfig, model: Finetuned) -> LabelledData:
    """The shards' points in the model's schema (an error when they cannot give it)."""
    s = model.schema
    data_cfg = cfg.data.model_copy(deep=True)
    data_cfg.schema_ = SchemaConfig(
        channels=list(s.channels),
        climate_variables=list(s.climate_variables),
        first_month=s.months[0],
        last_month=s.months[-1],
        patch_size=s.patch_size,
        pixel_size_m=s.pixel_size_m,
    )
    data = load_labelled(data_cfg, model.modalities)
    if data.schema != model.schema:
        raise EvaluationError(
            f"{cfg.data.shards}: schema differs from the model's: " + "; ".join(data.schema.differences(model.schema))
        )
    return data


def score_checkpoint(cfg: EvaluateConfig) -> Scored:
    """Score the model in ``cfg.checkpoint`` on every point of ``cfg.data.shards``."""
    assert cfg.checkpoint, "scoring needs a checkpoint"
    model = load_model(cfg.checkpoint)
    data = _data_for(cfg, model)
    pred = model.predict(data.image, data.climate)
    q = float(model.conformal.get("half_width", math.inf))
    lo, hi = intervals(pred, q, space=model.conformal.get("space", "original"))
    metrics: dict = {
        "model": regression_metrics(data.y, pred),
        "baseline_rf": None,
        "conformal": {"level": model.conformal.get("level"), "half_width": q, **coverage(data.y, lo, hi)},
        "split": {
            "kind": "independent",
            "note": f"every point of {cfg.data.shards} is a test point for the "
            f"model in {cfg.checkpoint}; no baseline, since no training data is given",
        },
        "target": model.target,
        "data": {**data.counts, "shards": cfg.data.shards},
        "folds": [],
    }
    return Scored(data, pred, metrics)

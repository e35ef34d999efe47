"""Targets in an evaluation: leave out (and list) those above ``target.max_value``, and the metrics.json sections
that say which transform the model and the forest learnt and how large the back-transform's bias is, with and
without the correction (:mod:`soilnet.train.targets`)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from soilnet.config.finetune import TargetConfig
from soilnet.data.labelled import LabelledData
from soilnet.evaluate.metrics import bias
from soilnet.train.targets import check_range

log = logging.getLogger("soilnet.evaluate")


def apply_target_range(cfg: TargetConfig, data: LabelledData, where: str) -> LabelledData:
    """``data`` without the points above ``cfg.max_value`` (``out_of_range: drop``), or unchanged.

    Raises :class:`soilnet.train.targets.TargetRangeError` under ``out_of_range: error``. The dropped points go
    into ``counts`` (``above_max_value``: ``[{"id", "value"}]``, ``dropped_above_max_value``), which metrics.json
    and the report show.
    """
    keep, dropped = check_range(cfg, data.y, data.ids, where)
    counts = {**data.counts, "dropped_above_max_value": len(dropped), "above_max_value": dropped}
    if not dropped:
        return dataclasses.replace(data, counts=counts) if cfg.max_value is not None else data
    log.warning(
        "%d points above target.max_value=%g left out (target.out_of_range=drop); the largest is %g",
        len(dropped),
        cfg.max_value,
        max(d["value"] for d in dropped),
    )
    counts["labelled"] = int(keep.sum())

    def rows(a):
        return None if a is None else a[keep]

    return dataclasses.replace(
        data,
        ids=data.ids[keep],
        lon=data.lon[keep],
        lat=data.lat[keep],
        image=rows(data.image),
        climate=rows(data.climate),
        y=data.y[keep],
        counts=counts,
    )


def transforms_section(cfg: TargetConfig, baseline: bool) -> dict:
    """metrics.json ``transforms``: the target transform and bias correction each of model and forest learnt in."""
    used = {"transform": cfg.transform, "bias_correction": cfg.bias_correction}
    return {"model": used, "baseline_rf": dict(used) if baseline else None}


def bias_section(
    cfg: TargetConfig,
    obs: np.ndarray,
    corrected: dict[str, np.ndarray],
    uncorrected: dict[str, np.ndarray],
    smearing: dict[str, list[float]],
) -> dict | None:
    """metrics.json ``bias_correction`` under ``target.bias_correction: smearing`` (else None): per predictor
    (``model``, ``baseline_rf``), the pooled bias = mean(pred − obs) in target units with and without the
    correction, and the smearing factor of each fold. Arrays ``(N,)`` over the tested points."""
    if cfg.bias_correction == "none":
        return None
    out: dict = {"method": "smearing (Duan 1983) on log1p residuals: pred = (1 + expm1(t)) * S - 1"}
    for who, pred in corrected.items():
        out[who] = {
            "bias_corrected": bias(obs, pred),
            "bias_uncorrected": bias(obs, uncorrected[who]),
            "smearing_by_fold": [float(s) for s in smearing[who]],
        }
    return out

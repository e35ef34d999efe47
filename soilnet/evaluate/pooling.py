"""Pool the folds: every test point's prediction, interval and fold in one set of arrays, the per-fold rows, and
the metrics over all test predictions (never averaged per fold), in metrics.json's layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from soilnet.config.base import to_plain
from soilnet.config.finetune import FinetuneConfig
from soilnet.data.labelled import LabelledData
from soilnet.evaluate.conformal import calibrate, coverage, intervals
from soilnet.evaluate.folds import FoldResult
from soilnet.evaluate.metrics import regression_metrics
from soilnet.evaluate.targets import bias_section, transforms_section

log = logging.getLogger("soilnet.evaluate")

COVERAGE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


@dataclass
class Pooled:
    """Per labelled point ``(N,)``: the model's prediction (and without bias correction), the baseline's, the
    interval, and the fold that tested it (-1: none); per fold, its row of metrics.json and its hits and widths
    at every :data:`COVERAGE_LEVELS`; the training curves by fold; the learning-rate table."""

    n: int
    pred: np.ndarray = field(init=False)
    raw: np.ndarray = field(init=False)
    rf_pred: np.ndarray = field(init=False)
    rf_raw: np.ndarray = field(init=False)
    lower: np.ndarray = field(init=False)
    upper: np.ndarray = field(init=False)
    fold_of: np.ndarray = field(init=False)
    smearing: dict[str, list[float]] = field(default_factory=lambda: {"model": [], "baseline_rf": []})
    rows: list[dict] = field(default_factory=list)
    histories: dict[str, dict] = field(default_factory=dict)
    level_hits: dict[float, list] = field(default_factory=lambda: {lv: [] for lv in COVERAGE_LEVELS})
    level_widths: dict[float, list] = field(default_factory=lambda: {lv: [] for lv in COVERAGE_LEVELS})
    lr_groups: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pred, self.raw, self.rf_pred, self.rf_raw = _nan(self.n), _nan(self.n), _nan(self.n), _nan(self.n)
        self.lower, self.upper, self.fold_of = _nan(self.n), _nan(self.n), np.full(self.n, -1)

    @property
    def tested(self) -> np.ndarray:
        return self.fold_of >= 0


def _fold_row(r: FoldResult, model: dict, conformal: dict) -> dict:
    parts = r.parts
    return {
        "fold": parts.index,
        "n_train": len(parts.train),
        "n_val": len(parts.val),
        "n_calibration": len(parts.cal),
        "n_test": len(parts.test),
        "n_excluded_by_buffer": parts.excluded,
        "n_excluded_by_inner_buffer": len(parts.inner),
        "n_unused_by_label_fraction": parts.unused,
        "best_epoch": r.best_epoch,
        "epochs_run": len(r.history["val_loss"]),
        "model": model,
        "conformal": conformal,
    }


def add_fold(pooled: Pooled, r: FoldResult, cfg: FinetuneConfig, data: LabelledData) -> None:
    """Put fold ``r``'s test predictions, intervals (calibrated on its calibration points) and row in."""
    level, space = cfg.eval.conformal.level, cfg.eval.conformal.space
    test, cal, y = r.parts.test, r.parts.cal, data.y
    pooled.histories[f"fold {r.parts.index}"] = r.history
    pooled.lr_groups = r.lr_groups  # the same table for every fold: one model config
    q = calibrate(y[cal], r.p_cal, level, space)
    lo, hi = intervals(r.p_test, q, space=space)
    pooled.pred[test], pooled.lower[test], pooled.upper[test], pooled.fold_of[test] = r.p_test, lo, hi, r.parts.index
    pooled.raw[test] = r.p_test_uncorrected
    pooled.smearing["model"].append(r.smearing)
    for lv in COVERAGE_LEVELS:
        lo_l, hi_l = intervals(r.p_test, calibrate(y[cal], r.p_cal, lv, space), space=space)
        pooled.level_hits[lv].append((y[test] >= lo_l) & (y[test] <= hi_l))
        pooled.level_widths[lv].append(hi_l - lo_l)
    conformal = {"level": level, "space": space, "half_width": q, **coverage(y[test], lo, hi)}
    row = _fold_row(r, regression_metrics(y[test], r.p_test), conformal)
    if r.rf_test is not None and r.rf_test_uncorrected is not None:
        pooled.rf_pred[test] = r.rf_test
        pooled.rf_raw[test] = r.rf_test_uncorrected
        pooled.smearing["baseline_rf"].append(r.rf_smearing)
        row["baseline_rf"] = regression_metrics(y[test], r.rf_test)
    pooled.rows.append(row)
    rf_r2 = f"{row['baseline_rf']['r2']:.3f}" if "baseline_rf" in row else "-"
    log.info(
        "fold %d: model R2 %.3f RMSE %.3f | RF R2 %s", r.parts.index, row["model"]["r2"], row["model"]["rmse"], rf_r2
    )


def _coverage_by_level(pooled: Pooled) -> list[dict]:
    return [
        {
            "level": lv,
            "coverage": float(np.mean(np.concatenate(pooled.level_hits[lv]))),
            "mean_width": float(np.mean(np.concatenate(pooled.level_widths[lv]))),
        }
        for lv in COVERAGE_LEVELS
    ]


def _bias(pooled: Pooled, cfg: FinetuneConfig, y: np.ndarray, baseline: bool) -> dict | None:
    t = pooled.tested
    corrected = {"model": pooled.pred[t], **({"baseline_rf": pooled.rf_pred[t]} if baseline else {})}
    raw = {"model": pooled.raw[t], "baseline_rf": pooled.rf_raw[t]}
    return bias_section(cfg.target, y[t], corrected, raw, pooled.smearing)


def pooled_metrics(
    pooled: Pooled, cfg: FinetuneConfig, data: LabelledData, split_info: dict, mods: tuple[str, ...], baseline: bool
) -> dict:
    """metrics.json's content (without the final model, plots and written files' paths)."""
    t, y = pooled.tested, data.y
    level, space = cfg.eval.conformal.level, cfg.eval.conformal.space
    return {
        "model": regression_metrics(y[t], pooled.pred[t]),
        "baseline_rf": regression_metrics(y[t], pooled.rf_pred[t]) if baseline else None,
        "conformal": {
            "level": level,
            "space": space,
            "method": "split-conformal, absolute residuals, per fold",
            **coverage(y[t], pooled.lower[t], pooled.upper[t]),
        },
        "coverage_by_level": _coverage_by_level(pooled),
        "folds": pooled.rows,
        "split": split_info,
        "target": {"name": data.target, "unit": data.unit, **to_plain(cfg.target)},
        "transforms": transforms_section(cfg.target, baseline),
        "bias_correction": _bias(pooled, cfg, y, baseline),
        "data": {**data.counts, "shards": cfg.data.shards, "schema": data.schema.to_dict()},
        "modalities": list(mods),
        "pretrained": cfg.pretrained,
        "normalisation": data.normalisation,
        "lr_groups": pooled.lr_groups,
    }


def predictions_table(pooled: Pooled, data: LabelledData) -> pd.DataFrame:
    """predictions.csv: one row per tested point."""
    table = pd.DataFrame(
        {
            "id": data.ids,
            "lon": data.lon,
            "lat": data.lat,
            "fold": pooled.fold_of,
            "observed": data.y,
            "predicted": pooled.pred,
            "lower": pooled.lower,
            "upper": pooled.upper,
            "baseline_rf": pooled.rf_pred,
        }
    )
    return table[pooled.tested]

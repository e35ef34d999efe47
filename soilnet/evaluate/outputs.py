"""The evaluation's files, each written atomically (:mod:`soilnet.atomic`): metrics.json, predictions.csv, the
plots and report.md. The jobs (:mod:`soilnet.jobs`) decide which process writes them and when."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from soilnet.atomic import write_json, write_text
from soilnet.data.labelled import LabelledData
from soilnet.evaluate.plots import (
    interval_coverage,
    learning_curves,
    observed_vs_predicted,
    residual_histogram,
    residual_map,
)
from soilnet.evaluate.pooling import Pooled
from soilnet.evaluate.report import write_report
from soilnet.evaluate.splits import has_coordinates


def json_safe(x):
    """``x`` with numpy scalars as Python numbers and non-finite floats as None (JSON has neither)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_metrics(path: Path, metrics: dict) -> Path:
    """metrics.json, indented, non-finite values as null."""
    write_json(path, json_safe(metrics), indent=2, allow_nan=False)
    return path


def write_predictions(path: Path, table: pd.DataFrame) -> Path:
    write_text(path, table.to_csv(index=False))
    return path


def write_metrics_and_report(out: Path, metrics: dict, resolved_config: dict) -> None:
    write_metrics(out / "metrics.json", metrics)
    write_report(out / "report.md", metrics, resolved_config)


def _observed_plots(data: LabelledData, rows: np.ndarray, pred: np.ndarray, out: Path, rf=None) -> dict:
    """Observed vs predicted, the residuals' histogram and (with coordinates) their map, for ``rows``."""
    obs = data.y[rows]
    plots = {
        "observed_vs_predicted": observed_vs_predicted(obs, pred, out / "observed_vs_predicted.png", data.unit, rf),
        "residual_histogram": residual_histogram(obs, pred, out / "residual_histogram.png", data.unit),
    }
    return plots


def _residual_map(data: LabelledData, rows: np.ndarray, pred: np.ndarray, out: Path) -> dict:
    lon, lat = data.lon[rows], data.lat[rows]
    if not has_coordinates(lon, lat):
        return {}
    return {"residual_map": residual_map(lon, lat, data.y[rows], pred, out / "residual_map.png", data.unit)}


def cross_validation_plots(data: LabelledData, pooled: Pooled, metrics: dict, out: Path) -> dict[str, str]:
    """The cross-validation's figures; returns their paths by name."""
    t = pooled.tested
    p = pooled.pred[t]
    rf = pooled.rf_pred[t] if metrics["baseline_rf"] else None
    plots = _observed_plots(data, t, p, out, rf)
    plots["learning_curves"] = learning_curves(pooled.histories, out / "learning_curves.png")
    by_level = metrics["coverage_by_level"]
    plots["interval_coverage"] = interval_coverage(
        [r["level"] for r in by_level],
        [r["coverage"] for r in by_level],
        [r["mean_width"] for r in by_level],
        out / "interval_coverage.png",
        data.unit,
    )
    plots.update(_residual_map(data, t, p, out))
    return {k: str(v) for k, v in plots.items()}


def checkpoint_plots(data: LabelledData, pred: np.ndarray, out: Path) -> dict[str, str]:
    """The figures of a saved model scored on every point of ``data``; returns their paths by name."""
    rows = np.arange(len(data))
    plots = _observed_plots(data, rows, pred, out)
    plots.update(_residual_map(data, rows, pred, out))
    return {k: str(v) for k, v in plots.items()}

"""Regression metrics in the target's original units, computed on all predictions at once (never per batch).

SOC is roughly log-normal, so besides the usual scores we report them on ``log1p`` of both sides
(``log_rmse``, ``log_r2``), as SoilGrids' cross-validation does on log-transformed SOC. ``log1p`` rather than
``log`` keeps true zeros finite; predictions below zero are clipped to zero before the log.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("rmse", "mae", "r2", "bias", "rpiq", "ccc", "log_rmse", "log_r2", "n")


def _pair(obs: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs = np.asarray(obs, dtype=np.float64).ravel()
    pred = np.asarray(pred, dtype=np.float64).ravel()
    if obs.shape != pred.shape:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} differ in length")
    if not (np.isfinite(obs).all() and np.isfinite(pred).all()):
        raise ValueError("metrics need finite observed and predicted values")
    return obs, pred


def rmse(obs: np.ndarray, pred: np.ndarray) -> float:
    """Root mean squared error, in target units."""
    obs, pred = _pair(obs, pred)
    return float(np.sqrt(np.mean((pred - obs) ** 2)))


def mae(obs: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error, in target units."""
    obs, pred = _pair(obs, pred)
    return float(np.mean(np.abs(pred - obs)))


def r2(obs: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (the modelling efficiency; NaN when obs is constant)."""
    obs, pred = _pair(obs, pred)
    ss_tot = np.sum((obs - obs.mean()) ** 2)
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - np.sum((obs - pred) ** 2) / ss_tot)


def bias(obs: np.ndarray, pred: np.ndarray) -> float:
    """Mean error ``mean(pred - obs)``, in target units; positive means over-prediction."""
    obs, pred = _pair(obs, pred)
    return float(np.mean(pred - obs))


def rpiq(obs: np.ndarray, pred: np.ndarray) -> float:
    """Ratio of performance to interquartile distance: ``(Q3(obs) - Q1(obs)) / RMSE`` (unitless)."""
    obs, pred = _pair(obs, pred)
    q1, q3 = np.percentile(obs, [25, 75])
    err = rmse(obs, pred)
    return float((q3 - q1) / err) if err > 0 else float("inf")


def ccc(obs: np.ndarray, pred: np.ndarray) -> float:
    """Lin's concordance correlation coefficient ``2 cov / (var_o + var_p + (mean_o - mean_p)^2)``.

    Population (``ddof=0``) moments, as in Lin (1989).
    """
    obs, pred = _pair(obs, pred)
    mo, mp = obs.mean(), pred.mean()
    cov = np.mean((obs - mo) * (pred - mp))
    denom = obs.var() + pred.var() + (mo - mp) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def _log_pair(obs: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs, pred = _pair(obs, pred)
    return np.log1p(np.clip(obs, 0, None)), np.log1p(np.clip(pred, 0, None))


def log_rmse(obs: np.ndarray, pred: np.ndarray) -> float:
    """RMSE of ``log1p(obs)`` against ``log1p(max(pred, 0))`` (unitless)."""
    return rmse(*_log_pair(obs, pred))


def log_r2(obs: np.ndarray, pred: np.ndarray) -> float:
    """R² of ``log1p(obs)`` against ``log1p(max(pred, 0))``."""
    return r2(*_log_pair(obs, pred))


def regression_metrics(obs: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """Every metric in :data:`METRIC_NAMES` for one set of predictions.

    obs, pred: ``(N,)`` in the target's original units (e.g. SOC in g/kg).
    """
    obs, pred = _pair(obs, pred)
    if obs.size == 0:
        raise ValueError("metrics need at least one prediction")
    return {
        "rmse": rmse(obs, pred),
        "mae": mae(obs, pred),
        "r2": r2(obs, pred),
        "bias": bias(obs, pred),
        "rpiq": rpiq(obs, pred),
        "ccc": ccc(obs, pred),
        "log_rmse": log_rmse(obs, pred),
        "log_r2": log_r2(obs, pred),
        "n": int(obs.size),
    }

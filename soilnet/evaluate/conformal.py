"""Split-conformal prediction intervals (Vovk et al.; Lei et al. 2018), in the target's original units.

Scores are absolute residuals on a calibration set that the model never trained or early-stopped on. The
half-width is the ``ceil((n + 1) * level) / n`` empirical quantile of the scores, which gives marginal coverage
of at least ``level`` for exchangeable test points. Lower bounds are clipped at zero since SOC cannot be negative
(clipping can only raise coverage).
"""

from __future__ import annotations

import math

import numpy as np


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """Half-width ``q`` of a split-conformal interval from calibration scores ``(N,)`` (``inf`` if too few)."""
    if not 0 < level < 1:
        raise ValueError(f"conformal level must be in (0, 1), got {level}")
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = scores.size
    rank = math.ceil((n + 1) * level)
    if n == 0 or rank > n:
        return float("inf")
    return float(scores[rank - 1])


def calibrate(obs: np.ndarray, pred: np.ndarray, level: float) -> float:
    """Half-width from calibration observations and predictions ``(N,)``, in target units."""
    return conformal_quantile(np.abs(np.asarray(obs, dtype=np.float64) - np.asarray(pred, dtype=np.float64)), level)


def intervals(pred: np.ndarray, q: float, lower_bound: float | None = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)``, each ``(N,)``, for predictions ``(N,)`` and half-width ``q``."""
    pred = np.asarray(pred, dtype=np.float64)
    lower = pred - q
    if lower_bound is not None:
        lower = np.maximum(lower, lower_bound)
    return lower, pred + q


def coverage(obs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    """Empirical coverage (fraction of ``obs`` inside ``[lower, upper]``) and mean width (target units)."""
    obs = np.asarray(obs, dtype=np.float64)
    inside = (obs >= lower) & (obs <= upper)
    return {"coverage": float(np.mean(inside)), "mean_width": float(np.mean(upper - lower)), "n": int(obs.size)}

"""Split-conformal prediction intervals (Vovk et al.; Lei et al. 2018), in the target's original units.

Scores are absolute residuals on a calibration set that the model never trained or early-stopped on. The
half-width is the ``ceil((n + 1) * level) / n`` empirical quantile of the scores, which gives marginal coverage
of at least ``level`` for exchangeable test points. Lower bounds are clipped at zero since SOC cannot be negative
(clipping can only raise coverage).

``space="log"`` computes the scores on ``log1p`` of both sides and maps the interval back: intervals then widen
with the prediction, as fits log-normal SOC, and the guarantee is unchanged (``log1p`` is monotone).
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


def _to_space(x: np.ndarray, space: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if space == "log":
        return np.log1p(np.clip(x, 0.0, None))
    if space != "original":
        raise ValueError(f"conformal space must be 'original' or 'log', got {space!r}")
    return x


def calibrate(obs: np.ndarray, pred: np.ndarray, level: float, space: str = "original") -> float:
    """Half-width from calibration observations and predictions ``(N,)``: target units, or log1p units."""
    return conformal_quantile(np.abs(_to_space(obs, space) - _to_space(pred, space)), level)


def intervals(
    pred: np.ndarray, q: float, lower_bound: float | None = 0.0, space: str = "original"
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)``, each ``(N,)`` in target units, for predictions ``(N,)`` and half-width ``q``."""
    centre = _to_space(pred, space)
    lower, upper = centre - q, centre + q
    if space == "log":
        lower, upper = np.expm1(lower), np.expm1(upper)
    if lower_bound is not None:
        lower = np.maximum(lower, lower_bound)
    return lower, upper


def coverage(obs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    """Empirical coverage (fraction of ``obs`` inside ``[lower, upper]``) and mean width (target units)."""
    obs = np.asarray(obs, dtype=np.float64)
    inside = (obs >= lower) & (obs <= upper)
    return {"coverage": float(np.mean(inside)), "mean_width": float(np.mean(upper - lower)), "n": int(obs.size)}

"""Evaluation figures, each written as one PNG. Matplotlib's Agg backend: no display needed on a cluster node."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from soilnet.atomic import atomic_file  # noqa: E402


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically, and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def observed_vs_predicted(
    obs: np.ndarray, pred: np.ndarray, path: Path, unit: str = "", baseline: np.ndarray | None = None, title: str = ""
) -> Path:
    """Scatter of predictions ``(N,)`` against observations ``(N,)`` with the 1:1 line."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    if baseline is not None:
        ax.scatter(obs, baseline, s=6, alpha=0.35, color="tab:gray", label="random forest")
    ax.scatter(obs, pred, s=6, alpha=0.6, color="tab:blue", label="model")
    lo = float(min(np.min(obs), np.min(pred)))
    hi = float(max(np.max(obs), np.max(pred)))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="1:1")
    ax.set_xlabel(f"observed {unit}".strip())
    ax.set_ylabel(f"predicted {unit}".strip())
    ax.set_title(title or "observed vs predicted (pooled test folds)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def residual_histogram(obs: np.ndarray, pred: np.ndarray, path: Path, unit: str = "") -> Path:
    """Histogram of residuals ``pred - obs``."""
    res = np.asarray(pred) - np.asarray(obs)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.hist(res, bins=min(60, max(10, res.size // 10)), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel(f"residual (predicted - observed) {unit}".strip())
    ax.set_ylabel("points")
    return _save(fig, path)


def residual_map(
    lon: np.ndarray, lat: np.ndarray, obs: np.ndarray, pred: np.ndarray, path: Path, unit: str = ""
) -> Path:
    """Residuals coloured on a lon/lat map (diverging, symmetric around zero)."""
    res = np.asarray(pred) - np.asarray(obs)
    lim = float(np.percentile(np.abs(res), 98)) or 1.0
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(lon, lat, c=res, s=8, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(sc, ax=ax, label=f"residual {unit}".strip())
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")
    ax.set_aspect(1.0 / max(np.cos(np.radians(np.nanmean(lat))), 0.2))
    return _save(fig, path)


def learning_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Training and validation loss per epoch for each run (fold or final model)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i % 10}"
        ax.plot(h["train_loss"], color=color, lw=1, label=f"{name} train")
        ax.plot(h["val_loss"], color=color, lw=1, ls="--", label=f"{name} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (training scale)")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def interval_coverage(
    levels: list[float], coverage: list[float], widths: list[float], path: Path, unit: str = ""
) -> Path:
    """Empirical test coverage of conformal intervals against the nominal level, with their mean width."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.plot([0, 1], [0, 1], "k--", lw=1, label="nominal")
    a1.plot(levels, coverage, "o-", label="empirical (test)")
    a1.set_xlabel("nominal level")
    a1.set_ylabel("coverage")
    a1.set_xlim(min(levels) - 0.05, 1)
    a1.set_ylim(min(min(levels), min(coverage)) - 0.05, 1.01)
    a1.legend(fontsize=8)
    a2.plot(levels, widths, "o-")
    a2.set_xlabel("nominal level")
    a2.set_ylabel(f"mean interval width {unit}".strip())
    return _save(fig, path)

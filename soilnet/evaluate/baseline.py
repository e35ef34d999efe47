"""The random-forest baseline that every fine-tuned model is reported against, on the same folds.

Features (all named, so the report can show importances):
- per image channel, the centre pixel and the patch mean;
- per climate variable, the mean and the standard deviation over the months (NaN months ignored).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.ensemble import RandomForestRegressor


def summary_features(
    image: np.ndarray | None,
    climate: np.ndarray | None,
    channels: tuple[str, ...] = (),
    variables: tuple[str, ...] = (),
) -> tuple[np.ndarray, list[str]]:
    """Feature matrix ``(N, 2C + 2F)`` float32 and its column names.

    image: ``(N, C, H, W)`` in schema units (or normalised; the forest is invariant to per-channel affine maps).
    climate: ``(N, T, F)`` in physical units; NaN = missing month.
    """
    cols: list[np.ndarray] = []
    names: list[str] = []
    if image is not None:
        _, c, h, w = image.shape
        centre = image[:, :, h // 2, w // 2].astype(np.float32)
        # float32 accumulation: a float16 sum of 4096 elevations (m) overflows
        mean = np.nanmean(image.reshape(image.shape[0], c, -1), axis=2, dtype=np.float32)
        cols += [centre, mean]
        chans = channels or tuple(f"ch{i}" for i in range(c))
        names += [f"{n}_centre" for n in chans] + [f"{n}_mean" for n in chans]
    if climate is not None:
        with warnings.catch_warnings():  # an all-NaN variable is expected (e.g. swe in the tropics)
            warnings.simplefilter("ignore", category=RuntimeWarning)
            mean = np.nanmean(climate, axis=1)
            std = np.nanstd(climate, axis=1)
        cols += [mean, std]
        var = variables or tuple(f"var{i}" for i in range(climate.shape[2]))
        names += [f"{n}_mean" for n in var] + [f"{n}_std" for n in var]
    if not cols:
        raise ValueError("the baseline needs an image or a climate series")
    x = np.concatenate(cols, axis=1).astype(np.float32)
    # A variable missing in every month of a point: fall back to 0 so the forest still sees the other features.
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), names


def fit_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    n_estimators: int = 200,
    min_samples_leaf: int = 1,
    max_features: float | str = 1.0 / 3.0,
    seed: int = 0,
    n_jobs: int | None = None,
) -> tuple[np.ndarray, RandomForestRegressor]:
    """Fit a forest on ``(N_train, D)`` features and targets in original units, predict ``(N_test,)``."""
    rf = RandomForestRegressor(
        n_estimators=n_estimators,
        min_samples_leaf=min_samples_leaf,
        max_features=max_features,
        random_state=seed,
        n_jobs=n_jobs,
    )
    rf.fit(x_train, y_train)
    return rf.predict(x_test), rf

"""The random-forest baseline that every fine-tuned model is reported against, on the same folds.

Features (all named, so the report can show importances):
- per image channel, the centre pixel and the patch mean;
- per climate variable, the mean and the standard deviation over the months (NaN months ignored).

The forest learns the same target as the network (``target.transform``, e.g. ``log1p``) and is back-transformed
the same way, including Duan's smearing factor (``target.bias_correction``), so neither side is handicapped: on
skewed SOC stocks a forest of raw units loses half its log-R² (docs/finetuning.md). Its smearing factor comes from
out-of-bag residuals, since a forest's in-bag predictions nearly reproduce its training targets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from soilnet.config.finetune import TargetConfig
from soilnet.train.targets import TargetTransform


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
        mean = np.asarray(np.nanmean(image.reshape(image.shape[0], c, -1), axis=2, dtype=np.float32))
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


@dataclass
class ForestResult:
    """Test predictions ``(N_test,)`` in original units, with and without the bias correction, and the target
    transform the forest learnt in (``TargetTransform.to_dict``, with its smearing factor)."""

    pred: np.ndarray
    uncorrected: np.ndarray
    transform: dict


def fit_predict_target(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    target: TargetConfig,
    n_estimators: int = 200,
    min_samples_leaf: int = 1,
    max_features: float | str = 1.0 / 3.0,
    seed: int = 0,
) -> ForestResult:
    """Fit a forest on ``target.transform`` of ``y_train`` (original units), as the network learns it, and
    back-transform its test predictions the same way.

    No standardising (a forest is invariant to it). With ``target.bias_correction: smearing``, Duan's factor
    comes from the out-of-bag predictions of the training rows (rows no tree left out are skipped).
    """
    transform = TargetTransform.fit(target, y_train, standardize=False)
    smearing = target.bias_correction == "smearing"
    rf = RandomForestRegressor(
        n_estimators=n_estimators, min_samples_leaf=min_samples_leaf, max_features=max_features, random_state=seed
    )
    rf.fit(x_train, transform.forward(y_train))
    if smearing:
        oob = out_of_bag(rf, x_train)
        ok = np.isfinite(oob)
        transform = transform.with_smearing(oob[ok], np.asarray(y_train)[ok])
    scaled = rf.predict(x_test)
    return ForestResult(transform.inverse(scaled), transform.inverse(scaled, corrected=False), transform.to_dict())


def out_of_bag(rf: RandomForestRegressor, x_train: np.ndarray) -> np.ndarray:
    """Each training row's mean prediction over the trees whose bootstrap left it out: ``(N_train,)``, NaN for
    a row every tree drew (scikit-learn's ``oob_prediction_`` gives those 0, which would pass for a prediction)."""
    total = np.zeros(len(x_train))
    count = np.zeros(len(x_train))
    for tree, drawn in zip(rf.estimators_, rf.estimators_samples_, strict=True):
        out = np.ones(len(x_train), dtype=bool)
        out[drawn] = False
        if out.any():
            total[out] += tree.predict(np.asarray(x_train, dtype=np.float32)[out])
            count[out] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)

"""The area of applicability (AOA) of a fine-tuned model: Meyer & Pebesma (2021), "Predicting into unknown space?
Estimating the area of applicability of spatial prediction models", Methods in Ecology and Evolution 12: 1620-1633.

A map cell is inside the area when its inputs resemble the training data at least as much as the cross-validation's
test points resembled the data they were predicted from; outside it the cross-validated error says nothing.

Features. The model is a network on a ``(C, H, W)`` patch and a ``(T, F)`` climate series, so a sample is described
by the random-forest baseline's summary of those same inputs (:func:`soilnet.evaluate.baseline.summary_features`,
one implementation): per image channel the centre pixel and the patch mean, per climate variable the mean and the
standard deviation over the months; ``2C + 2F`` columns (only the modalities the model uses), in schema units. A
network has no per-variable importance, so the columns are weighted equally unless ``weights`` are given (the paper
weights by importance; CAST by a model's ``varImp``).

Dissimilarity index. Every column is standardised with the training data's mean and standard deviation (a column
constant in the training data carries no distance: its weight becomes 0) and multiplied by its weight; then
``DI = d_min / d_mean``: ``d_min`` the Euclidean distance to the nearest training sample, ``d_mean`` the mean of all
pairwise distances between training samples (over a seeded subset of ``MAX_PAIR_ROWS`` rows when there are more).

Threshold, as the paper and CAST's ``trainDI``/``aoa`` take it: the DI of each training sample against the training
rows of the cross-validation fold that held it out (its nearest neighbour among the data its prediction came from),
and the threshold is the upper whisker of those DIs: the largest one not above ``Q3 + 1.5 IQR`` (quartiles by
linear interpolation, :func:`numpy.percentile`; R's ``boxplot.stats`` takes Tukey's hinges, which differ slightly
on small samples). A cell is inside when ``DI <= threshold``.

Files. A fine-tuning run with a final model writes ``aoa.npz`` (:data:`AOA_FILE`) beside ``model.safetensors``: the
training features standardised and weighted ``(N, D)`` float32, the mean, standard deviation and weight per column
``(D,)``, the column names, the modalities, ``d_mean``, the threshold and the training DIs ``(N,)``. It is read
without pickle. The map (``soilnet predict-map``) loads it with :func:`load_reference` and calls
:func:`inputs_aoa` on each batch of cells' model inputs, or :meth:`Reference.aoa` on their :func:`input_features`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import pairwise_distances_argmin_min, pairwise_distances_chunked

from soilnet.atomic import atomic_file
from soilnet.data.labelled import LabelledData
from soilnet.evaluate.baseline import summary_features
from soilnet.evaluate.splits import Fold

AOA_FILE = "aoa.npz"
FORMAT = "soilnet-aoa/1"
MAX_PAIR_ROWS = 5000
CHUNK_ELEMENTS = 1 << 26  # query rows x training rows per torch.cdist call (256 MiB of float32)


class AOAError(ValueError):
    """Training data from which no area of applicability can be derived, or a file that holds none."""


def input_features(
    image: np.ndarray | None,
    climate: np.ndarray | None,
    channels: Sequence[str] = (),
    variables: Sequence[str] = (),
) -> tuple[np.ndarray, list[str]]:
    """The AOA's features of samples as the model takes them: ``(N, 2C + 2F)`` float32 and the column names.

    image: ``(N, C, H, W)`` in schema units or None; climate: ``(N, T, F)`` in physical units (NaN = missing month)
    or None. Pass the modalities the model uses only (a missing value counts as 0, as for the baseline)."""
    return summary_features(image, climate, tuple(channels), tuple(variables))


@dataclass
class Reference:
    """What the AOA of new samples needs (see the module docstring); ``train`` is standardised and weighted.

    mean, std, weights: ``(D,)`` float64 in feature units; train: ``(N, D)`` float32; train_di: ``(N,)`` the
    cross-validated DI of each training sample (NaN: never held out); mean_distance: ``d_mean`` (standardised
    units); threshold: dimensionless, like the DI."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    train: np.ndarray
    mean_distance: float
    threshold: float
    train_di: np.ndarray
    names: list[str] = field(default_factory=list)
    modalities: tuple[str, ...] = ("image", "climate")

    def aoa(self, features: np.ndarray, device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`aoa` of ``features`` ``(M, D)`` against this reference."""
        return aoa(self, features, device)


def standardise(features: np.ndarray, mean: np.ndarray, std: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(features - mean) / std * weights`` as ``(N, D)`` float32; a column with ``std`` 0 becomes 0."""
    safe = np.where(std > 0, std, 1.0)
    z = (np.asarray(features, dtype=np.float64) - mean) / safe * np.where(std > 0, weights, 0.0)
    return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def nearest_distance(query: np.ndarray, reference: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """Euclidean distance ``(M,)`` of each row of ``query`` ``(M, D)`` to its nearest row of ``reference``
    ``(N, D)``, in chunks (memory does not grow with ``M * N``): with scikit-learn in float64, or with ``device``
    (``"cuda"`` for a map's tiles) through :func:`torch.cdist` in float32 (absolute error ~1e-2 in standardised
    units, ~1e-3 in DI)."""
    if len(query) == 0:
        return np.zeros(0)
    if device is None:
        _, dist = pairwise_distances_argmin_min(query, reference, metric="euclidean")
        return np.asarray(dist, dtype=np.float64)
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32), device=device)
    rows = max(1, CHUNK_ELEMENTS // max(1, len(ref)))
    out = []
    for start in range(0, len(query), rows):
        q = torch.as_tensor(np.asarray(query[start : start + rows], dtype=np.float32), device=device)
        out.append(torch.cdist(q, ref).min(dim=1).values.double().cpu().numpy())
    return np.concatenate(out)


def mean_pairwise_distance(z: np.ndarray, max_rows: int = MAX_PAIR_ROWS, seed: int = 0) -> float:
    """Mean Euclidean distance over all pairs ``i != j`` of the rows of ``z`` ``(N, D)``; of a seeded subset of
    ``max_rows`` rows when ``N`` is larger (the pairs grow as ``N**2``)."""
    if len(z) > max_rows:
        z = z[np.sort(np.random.default_rng(seed).choice(len(z), max_rows, replace=False))]
    n = len(z)
    if n < 2:
        raise AOAError(f"the area of applicability needs at least 2 training samples, got {n}")
    total = sum(float(block.sum()) for block in pairwise_distances_chunked(z, metric="euclidean"))
    return total / (n * (n - 1))


def cv_training_di(z: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], mean_distance: float) -> np.ndarray:
    """Each training sample's DI ``(N,)`` against the training rows of the fold that held it out.

    z: ``(N, D)`` standardised features; folds: ``(test_rows, train_rows)`` index pairs into ``z``. A sample that
    no fold held out gets NaN."""
    di = np.full(len(z), np.nan)
    for test, train in folds:
        test, train = np.asarray(test, dtype=np.int64), np.asarray(train, dtype=np.int64)
        if len(test) and len(train):
            di[test] = nearest_distance(z[test], z[train]) / mean_distance
    return di


def upper_whisker(values: np.ndarray) -> float:
    """The largest finite value not above ``Q3 + 1.5 IQR`` (the outlier-removed maximum)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise AOAError("no cross-validated training DI: no fold held out a sample")
    q1, q3 = np.percentile(v, [25, 75])
    return float(v[v <= q3 + 1.5 * (q3 - q1)].max())


def fit_reference(
    features: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: np.ndarray | None = None,
    names: Sequence[str] = (),
    modalities: Sequence[str] = ("image", "climate"),
) -> Reference:
    """The AOA reference of training ``features`` ``(N, D)`` and the cross-validation's ``folds``
    (``(test_rows, train_rows)`` pairs); ``weights`` ``(D,)`` >= 0, default all 1; ``names``, ``modalities``:
    what the columns are, recorded for the map."""
    x = np.asarray(features, dtype=np.float64)
    w = np.ones(x.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (x.shape[1],) or np.any(w < 0):
        raise AOAError(f"weights must be {x.shape[1]} non-negative numbers, got shape {w.shape}")
    mean, std = x.mean(axis=0), x.std(axis=0)
    z = standardise(x, mean, std, w)
    d_mean = mean_pairwise_distance(z)
    if not d_mean > 0:
        raise AOAError("every training sample has the same features: no distance to scale the DI by")
    train_di = cv_training_di(z, folds, d_mean)
    threshold = upper_whisker(train_di)
    return Reference(mean, std, w, z, d_mean, threshold, train_di, list(names), tuple(modalities))


def run_reference(data: LabelledData, folds: Sequence[Fold], modalities: Sequence[str]) -> Reference:
    """The AOA reference of a fine-tuning run: every labelled point of ``data`` (what the cross-validation
    scored and the final model was carved from) with the features of the ``modalities`` the model uses, and the
    run's cross-validation ``folds`` (each fold's test rows against its buffered training rows)."""
    image = data.image if "image" in modalities else None
    climate = data.climate if "climate" in modalities else None
    features, names = input_features(image, climate, data.schema.channels, data.schema.climate_variables)
    return fit_reference(features, [(f.test, f.train) for f in folds], names=names, modalities=modalities)


def summary(reference: Reference, path: str | Path) -> dict:
    """metrics.json's description of a saved reference: where, the threshold, ``d_mean`` and the share of
    training samples whose cross-validated DI is inside."""
    di = reference.train_di[np.isfinite(reference.train_di)]
    return {
        "path": str(path),
        "features": len(reference.mean),
        "threshold": reference.threshold,
        "mean_distance": reference.mean_distance,
        "train_inside": float(np.mean(di <= reference.threshold)) if di.size else None,
    }


def aoa(
    reference: Reference, features: np.ndarray, device: str | torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The dissimilarity index ``(M,)`` float64 of ``features`` ``(M, D)`` (:func:`input_features`, same columns
    as the reference) and whether each sample is inside the area of applicability ``(M,)`` bool."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != len(reference.mean):
        raise AOAError(f"features must be (M, {len(reference.mean)}), got {features.shape}")
    z = standardise(features, reference.mean, reference.std, reference.weights)
    di = nearest_distance(z, reference.train, device) / reference.mean_distance
    return di, di <= reference.threshold


def inputs_aoa(
    reference: Reference,
    image: np.ndarray | None,
    climate: np.ndarray | None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`aoa` of samples given as the model takes them: image ``(M, C, H, W)`` in schema units, climate
    ``(M, T, F)`` in physical units (either may be None when the model does not use it; a modality the reference
    was not built on is ignored); ``device``: as for :func:`nearest_distance`. Returns the DI ``(M,)`` float64
    and inside ``(M,)`` bool."""
    image = image if "image" in reference.modalities else None
    climate = climate if "climate" in reference.modalities else None
    features, _ = input_features(image, climate)
    return aoa(reference, features, device)


def save_reference(path: str | Path, reference: Reference) -> Path:
    """Write ``reference`` to ``path`` (``.npz``, atomically)."""
    meta = {
        "format": FORMAT,
        "mean_distance": reference.mean_distance,
        "threshold": reference.threshold,
        "names": list(reference.names),
        "modalities": list(reference.modalities),
    }
    with atomic_file(path) as f:
        np.savez(
            f,
            meta=np.array(json.dumps(meta)),
            mean=reference.mean,
            std=reference.std,
            weights=reference.weights,
            train=reference.train,
            train_di=reference.train_di,
        )
    return Path(path)


def load_reference(path: str | Path) -> Reference:
    """Read what :func:`save_reference` wrote; ``path`` may be a fine-tuning ``output_dir``."""
    path = Path(path)
    path = path / AOA_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the model was saved without its area of applicability (before it was written "
            "beside model.safetensors); run `soilnet finetune` again to save it"
        )
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT:
            raise AOAError(f"{path}: not an area-of-applicability file (format {meta.get('format')!r})")
        arrays = {k: z[k] for k in ("mean", "std", "weights", "train", "train_di")}
    return Reference(
        arrays["mean"],
        arrays["std"],
        arrays["weights"],
        arrays["train"],
        float(meta["mean_distance"]),
        float(meta["threshold"]),
        arrays["train_di"],
        list(meta["names"]),
        tuple(meta["modalities"]),
    )

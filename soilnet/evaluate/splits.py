"""Cross-validation folds: random k-fold, or spatially blocked k-fold with an exclusion buffer.

Spatial blocks are squares of ``block_km`` on a Lambert azimuthal equal-area plane centred on the data, so every
block covers the same ground area. Whole blocks go to one fold. For each fold, training points closer than
``buffer_km`` (great-circle distance) to any test point are excluded from training, so no test point has a
training point within that distance. Without coordinates only random k-fold is possible.

Points with identical inputs (the same climate series, and the same image when there is one; RaCA has hundreds of
sites that share a series with another site) are one group: random folds, and the validation and calibration
parts carved from a fold, keep a group on one side, or the model is tested on a twin of a training point. Inside a
spatial fold, validation and calibration parts are carved by whole blocks and buffered like the test fold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from pyproj import Transformer
from sklearn.model_selection import KFold
from sklearn.neighbors import BallTree

EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True)
class Fold:
    """Indices into the labelled sample arrays for one fold.

    ``train`` is every non-test point left after the buffer (callers carve validation and calibration sets out
    of it); ``excluded`` are the points dropped by the buffer.
    """

    index: int
    train: np.ndarray
    test: np.ndarray
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def has_coordinates(lon: np.ndarray | None, lat: np.ndarray | None) -> bool:
    """Whether every point has a finite lon/lat (degrees)."""
    if lon is None or lat is None or len(lon) == 0:
        return False
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    return bool(np.isfinite(lon).all() and np.isfinite(lat).all())


def spatial_blocks(lon: np.ndarray, lat: np.ndarray, block_km: float) -> np.ndarray:
    """One integer block ID per point: ``(N,)`` int64, for squares of ``block_km`` km on an equal-area plane."""
    if block_km <= 0:
        raise ValueError(f"block_km must be positive, got {block_km}")
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    lon0, lat0 = float(np.mean(lon)), float(np.mean(lat))
    laea = Transformer.from_crs(
        "EPSG:4326", f"+proj=laea +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=m", always_xy=True
    )
    x, y = laea.transform(lon, lat)
    ix = np.floor(np.asarray(x) / (block_km * 1000.0)).astype(np.int64)
    iy = np.floor(np.asarray(y) / (block_km * 1000.0)).astype(np.int64)
    _, block = np.unique(np.stack([ix, iy], axis=1), axis=0, return_inverse=True)
    return block.reshape(-1).astype(np.int64)


def _assign_blocks(block: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each point: blocks in random order, each to the fold that holds the fewest points so far."""
    ids, counts = np.unique(block, return_counts=True)
    if len(ids) < k:
        raise ValueError(f"only {len(ids)} spatial blocks for {k} folds: use smaller blocks or fewer folds")
    order = rng.permutation(len(ids))
    sizes = np.zeros(k, dtype=np.int64)
    fold_of_block = {}
    for j in order:
        f = int(np.argmin(sizes))
        fold_of_block[ids[j]] = f
        sizes[f] += counts[j]
    return np.array([fold_of_block[b] for b in block], dtype=np.int64)


def _to_radians(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    return np.radians(np.stack([np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)], axis=1))


def nearest_distance_km(
    from_lon: np.ndarray, from_lat: np.ndarray, to_lon: np.ndarray, to_lat: np.ndarray
) -> np.ndarray:
    """Great-circle distance (km) from each ``from`` point to its nearest ``to`` point: ``(N_from,)``."""
    if len(to_lon) == 0:
        return np.full(len(from_lon), np.inf)
    tree = BallTree(_to_radians(to_lon, to_lat), metric="haversine")
    dist, _ = tree.query(_to_radians(from_lon, from_lat), k=1)
    return dist[:, 0] * EARTH_RADIUS_KM


def identical_input_groups(image: np.ndarray | None, climate: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """One group ID per point ``(N,)`` int64: points whose inputs are byte-identical share it.

    image ``(N, C, H, W)`` and/or climate ``(N, T, F)`` (either may be None). The info dict counts the groups of
    more than one point, the points in them and the largest group's size, for the report.
    """
    arrays = [np.ascontiguousarray(a) for a in (image, climate) if a is not None]
    if not arrays:
        raise ValueError("identical_input_groups needs an image or a climate array")
    n = len(arrays[0])
    digests = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            h.update(a[i].tobytes())
        digests.append(h.digest())
    _, first, groups, sizes = np.unique(
        np.array(digests, dtype=object).astype("S16"), return_index=True, return_inverse=True, return_counts=True
    )
    # number groups by their first point, so the IDs do not depend on the hash values
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    groups = rank[groups.reshape(-1)]
    shared = sizes > 1
    info = {
        "groups_with_identical_inputs": int(shared.sum()),
        "points_in_them": int(sizes[shared].sum()),
        "largest_group": int(sizes.max()) if n else 0,
    }
    return groups, info


def random_kfold(n: int, k: int, seed: int, groups: np.ndarray | None = None) -> list[Fold]:
    """Shuffled k-fold over ``n`` points (the seed's split, made k-fold).

    With ``groups`` ``(n,)`` (:func:`identical_input_groups`), whole groups go to one fold: groups in a random
    order from ``seed``, the largest first, each to the fold with the fewest points so far.
    """
    if n < k:
        raise ValueError(f"{n} labelled points cannot make {k} folds")
    if groups is None:
        kf = KFold(n_splits=k, shuffle=True, random_state=seed)
        return [Fold(i, np.sort(tr), np.sort(te)) for i, (tr, te) in enumerate(kf.split(np.arange(n)))]
    groups = np.asarray(groups)
    ids, counts = np.unique(groups, return_counts=True)
    if len(ids) < k:
        raise ValueError(f"{len(ids)} groups of identical inputs cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(len(ids), dtype=np.int64)
    for j in order:
        f = int(np.argmin(sizes))
        fold_of_group[j] = f
        sizes[f] += counts[j]
    fold_of = fold_of_group[np.searchsorted(ids, groups)]
    return [Fold(f, np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def spatial_kfold(
    lon: np.ndarray, lat: np.ndarray, k: int, block_km: float, buffer_km: float | None = None, seed: int = 0
) -> list[Fold]:
    """Spatially blocked k-fold with an exclusion buffer (``buffer_km`` defaults to ``block_km``).

    lon, lat: ``(N,)`` degrees (WGS84). After the buffer, the nearest training point of every test point is at
    least ``buffer_km`` away.
    """
    if not has_coordinates(lon, lat):
        raise ValueError("spatial folds need a finite lon/lat for every point; use split=random without them")
    buffer_km = block_km if buffer_km is None else buffer_km
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    rng = np.random.default_rng(seed)
    fold_of = _assign_blocks(spatial_blocks(lon, lat, block_km), k, rng)
    folds = []
    for f in range(k):
        test = np.flatnonzero(fold_of == f)
        rest = np.flatnonzero(fold_of != f)
        if buffer_km > 0:
            d = nearest_distance_km(lon[rest], lat[rest], lon[test], lat[test])
            keep = d >= buffer_km
        else:
            keep = np.ones(len(rest), dtype=bool)
        folds.append(Fold(f, rest[keep], test, rest[~keep]))
    return folds


def carve(
    indices: np.ndarray,
    fractions: tuple[float, ...],
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split ``indices`` into ``len(fractions) + 1`` disjoint parts: the fractions first, the remainder last.

    With ``groups`` (a block ID per point of the full data set), whole groups go to a part, so validation and
    calibration points sit in other blocks than the training points, as the test points do.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if groups is None:
        order = rng.permutation(indices)
        out, start = [], 0
        for frac in fractions:
            m = int(round(frac * len(indices)))
            out.append(np.sort(order[start : start + m]))
            start += m
        out.append(np.sort(order[start:]))
        return out
    g = np.asarray(groups)[indices]
    ids = rng.permutation(np.unique(g))
    out, pos = [], 0
    for frac in fractions:
        target, taken = frac * len(indices), []
        count = 0
        while pos < len(ids) and count < target:
            taken.append(ids[pos])
            count += int(np.sum(g == ids[pos]))
            pos += 1
        out.append(np.sort(indices[np.isin(g, taken)]))
    out.append(np.sort(indices[np.isin(g, ids[pos:])]))
    return out


def buffer_parts(
    parts: list[np.ndarray],
    lon: np.ndarray | None = None,
    lat: np.ndarray | None = None,
    buffer_km: float | None = None,
) -> list[np.ndarray]:
    """Parts from :func:`carve` (carved by spatial blocks or identical-input groups), with ``buffer_km`` > 0
    dropping from the last one (training) every point closer than ``buffer_km`` to a point of the carved parts
    (validation, calibration), as :func:`spatial_kfold` does around the test fold.

    Returns the carved parts, the training part and the points the buffer dropped (last), all sorted indices.
    """
    *held, train = parts
    excluded = np.zeros(0, dtype=np.int64)
    if buffer_km and buffer_km > 0 and len(train):
        lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
        near = np.zeros(len(train), dtype=bool)
        for part in held:
            if len(part):
                near |= nearest_distance_km(lon[train], lat[train], lon[part], lat[part]) < buffer_km
        train, excluded = train[~near], train[near]
    return [*held, train, excluded]

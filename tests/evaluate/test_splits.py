"""Random and spatially blocked folds: partitions, and the exclusion buffer property."""

import numpy as np
import pytest

from soilnet.evaluate import splits as SP


def _points(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(5, 15, n), rng.uniform(45, 52, n)  # lon, lat degrees (about 750 x 780 km)


def test_random_kfold_partitions_every_point_once():
    folds = SP.random_kfold(103, 5, seed=1)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests) == list(range(103))
    for f in folds:
        assert not set(f.train) & set(f.test)
        assert len(f.train) + len(f.test) == 103


@pytest.mark.parametrize("block_km,buffer_km", [(100.0, None), (80.0, 40.0)])
def test_spatial_buffer_keeps_training_points_away_from_test_points(block_km, buffer_km):
    lon, lat = _points()
    folds = SP.spatial_kfold(lon, lat, k=4, block_km=block_km, buffer_km=buffer_km, seed=3)
    buffer = block_km if buffer_km is None else buffer_km
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(len(lon)))
    for f in folds:
        assert len(f.train) > 0 and len(f.excluded) > 0
        assert len(f.train) + len(f.test) + len(f.excluded) == len(lon)
        # brute-force haversine, independent of the BallTree used inside
        la1, lo1 = np.radians(lat[f.test])[:, None], np.radians(lon[f.test])[:, None]
        la2, lo2 = np.radians(lat[f.train])[None, :], np.radians(lon[f.train])[None, :]
        h = np.sin((la2 - la1) / 2) ** 2 + np.cos(la1) * np.cos(la2) * np.sin((lo2 - lo1) / 2) ** 2
        d = 2 * SP.EARTH_RADIUS_KM * np.arcsin(np.sqrt(h))
        assert d.min() >= buffer


def test_blocks_are_whole_in_one_fold():
    lon, lat = _points()
    blocks = SP.spatial_blocks(lon, lat, 100.0)
    folds = SP.spatial_kfold(lon, lat, k=4, block_km=100.0, buffer_km=0.0, seed=0)
    fold_of = np.empty(len(lon), int)
    for f in folds:
        fold_of[f.test] = f.index
    for b in np.unique(blocks):
        assert len(set(fold_of[blocks == b])) == 1


def test_spatial_split_needs_coordinates():
    lon, lat = _points(50)
    lon[3] = np.nan
    assert not SP.has_coordinates(lon, lat)
    with pytest.raises(ValueError, match="lon/lat"):
        SP.spatial_kfold(lon, lat, k=3, block_km=50.0)


def test_carve_by_groups_keeps_groups_together():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 10)
    val, cal, train = SP.carve(np.arange(400), (0.2, 0.2), rng, groups)
    assert len(val) + len(cal) + len(train) == 400
    assert not (set(groups[val]) & set(groups[train])) and not (set(groups[cal]) & set(groups[train]))
    assert 60 <= len(val) <= 100

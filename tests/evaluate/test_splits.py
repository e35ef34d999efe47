"""Random and spatially blocked folds: partitions, and the exclusion buffer property."""

from pathlib import Path

import numpy as np
import pytest

from soilnet.cli import main
from soilnet.config.finetune import FinetuneConfig, FinetuneDataConfig
from soilnet.data.labelled import LabelledData, load_labelled
from soilnet.evaluate import splits
from soilnet.evaluate.plan import plan_split
from soilnet.schema import SampleSchema, month_range


def _points(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(5, 15, n), rng.uniform(45, 52, n)  # lon, lat degrees (about 750 x 780 km)


def test_random_kfold_partitions_every_point_once():
    folds = splits.random_kfold(103, 5, seed=1)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests) == list(range(103))
    for f in folds:
        assert not set(f.train) & set(f.test)
        assert len(f.train) + len(f.test) == 103


@pytest.mark.parametrize("block_km,buffer_km", [(100.0, None), (80.0, 40.0)])
def test_spatial_buffer_keeps_training_points_away_from_test_points(block_km, buffer_km):
    lon, lat = _points()
    folds = splits.spatial_kfold(lon, lat, k=4, block_km=block_km, buffer_km=buffer_km, seed=3)
    buffer = block_km if buffer_km is None else buffer_km
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(len(lon)))
    for f in folds:
        assert len(f.train) > 0 and len(f.excluded) > 0
        assert len(f.train) + len(f.test) + len(f.excluded) == len(lon)
        # brute-force haversine, independent of the BallTree used inside
        la1, lo1 = np.radians(lat[f.test])[:, None], np.radians(lon[f.test])[:, None]
        la2, lo2 = np.radians(lat[f.train])[None, :], np.radians(lon[f.train])[None, :]
        h = np.sin((la2 - la1) / 2) ** 2 + np.cos(la1) * np.cos(la2) * np.sin((lo2 - lo1) / 2) ** 2
        d = 2 * splits.EARTH_RADIUS_KM * np.arcsin(np.sqrt(h))
        assert d.min() >= buffer


def test_blocks_are_whole_in_one_fold():
    lon, lat = _points()
    blocks = splits.spatial_blocks(lon, lat, 100.0)
    folds = splits.spatial_kfold(lon, lat, k=4, block_km=100.0, buffer_km=0.0, seed=0)
    fold_of = np.empty(len(lon), int)
    for f in folds:
        fold_of[f.test] = f.index
    for b in np.unique(blocks):
        assert len(set(fold_of[blocks == b])) == 1


def test_spatial_split_needs_coordinates():
    lon, lat = _points(50)
    lon[3] = np.nan
    assert not splits.has_coordinates(lon, lat)
    with pytest.raises(ValueError, match="lon/lat"):
        splits.spatial_kfold(lon, lat, k=3, block_km=50.0)


def test_carve_by_groups_keeps_groups_together():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 10)
    val, cal, train = splits.carve(np.arange(400), (0.2, 0.2), rng, groups)
    assert len(val) + len(cal) + len(train) == 400
    assert not (set(groups[val]) & set(groups[train])) and not (set(groups[cal]) & set(groups[train]))
    assert 60 <= len(val) <= 100


# ------------------------------------------------------------------------------- identical inputs (twins)


def _twins(n=200, n_twins=30, seed=0):
    """Climate ``(n, 12, 3)`` where rows ``n - n_twins ..`` copy an earlier row (RaCA sites that share a series)."""
    rng = np.random.default_rng(seed)
    climate = rng.normal(size=(n, 12, 3)).astype(np.float32)
    src = rng.choice(n - n_twins, n_twins, replace=False)
    climate[n - n_twins :] = climate[src]
    climate[n - 1] = climate[src[0]]  # one triple
    return climate, src


def test_identical_input_groups_counts_twins():
    climate, src = _twins()
    groups, info = splits.identical_input_groups(None, climate)
    assert groups.shape == (200,)
    assert groups[170] == groups[src[0]] == groups[199]
    assert info == {"groups_with_identical_inputs": 29, "points_in_them": 59, "largest_group": 3}
    image = np.zeros((200, 2, 4, 4), np.float16)
    image[199, 0, 0, 0] = 1  # another image breaks the triple
    groups, info = splits.identical_input_groups(image, climate)
    assert groups[199] != groups[170] and info["largest_group"] == 2


def test_random_kfold_keeps_identical_inputs_together():
    climate, _ = _twins()
    groups, _ = splits.identical_input_groups(None, climate)
    folds = splits.random_kfold(200, 5, seed=3, groups=groups)
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(200))
    for f in folds:
        assert not set(groups[f.test]) & set(groups[f.train])
        assert 35 <= len(f.test) <= 45
    plain = splits.random_kfold(200, 5, seed=3)  # without groups some twins straddle (the seed's leak)
    assert any(set(groups[f.test]) & set(groups[f.train]) for f in plain)


def test_random_validation_and_calibration_keep_twins_together():
    """plan_split hands the identical-input groups to the carving of validation and calibration parts."""

    climate, _ = _twins()
    nan = np.full(200, np.nan)
    schema = SampleSchema(months=month_range("2014-01", "2014-12"), climate_variables=("pr", "tmmn", "tmmx"))
    data = LabelledData(np.arange(200).astype(str), nan, nan, None, climate, np.ones(200), schema, "soc")
    plan = plan_split(FinetuneConfig(), data)
    folds, groups, info = plan.folds, plan.groups, plan.info
    assert info["kind"] == "random" and info["identical_inputs"]["groups_with_identical_inputs"] == 29
    assert groups is not None
    rng = np.random.default_rng(0)
    val, cal, train, excluded = splits.buffer_parts(splits.carve(folds[0].train, (0.15, 0.15), rng, groups))
    assert len(excluded) == 0
    assert not set(groups[val]) & set(groups[train]) and not set(groups[cal]) & set(groups[train])


def test_spatial_validation_and_calibration_are_buffered_like_the_test_fold():
    lon, lat = _points()
    folds = splits.spatial_kfold(lon, lat, k=4, block_km=80.0, buffer_km=40.0, seed=3)
    blocks = splits.spatial_blocks(lon, lat, 80.0)
    rng = np.random.default_rng(0)
    pool = folds[0].train
    val, cal, train, excluded = splits.buffer_parts(splits.carve(pool, (0.15, 0.15), rng, blocks), lon, lat, 40.0)
    assert sorted(np.concatenate([val, cal, train, excluded])) == sorted(pool)
    assert len(excluded) > 0
    for held in (val, cal):
        d = splits.nearest_distance_km(lon[train], lat[train], lon[held], lat[held])
        assert d.min() >= 40.0


RACA_DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "raca_dev"


@pytest.mark.skipif(not RACA_DEV.is_dir(), reason="the seed's RaCA development half is not in ../shared/data")
def test_raca_dev_twins_share_a_climate_series_and_stay_together(tmp_path):
    """The seed's real RaCA tables: 50 pairs of labelled sites share all 13 series byte for byte."""

    argv = ["import-soilnet", "--climate", str(RACA_DEV), "--id-column", "rcasiteid"]
    assert main([*argv, "--target-column", "SOCstock100", "--out", str(tmp_path / "raca")]) == 0
    cfg = FinetuneDataConfig(shards=str(tmp_path / "raca"), target="soc_stock", use_coordinates=False)
    data = load_labelled(cfg, ("climate",))
    groups, info = splits.identical_input_groups(None, data.climate)
    assert info == {"groups_with_identical_inputs": 50, "points_in_them": 100, "largest_group": 2}
    assert any(set(groups[f.test]) & set(groups[f.train]) for f in splits.random_kfold(len(data), 5, 0))
    assert not any(set(groups[f.test]) & set(groups[f.train]) for f in splits.random_kfold(len(data), 5, 0, groups))

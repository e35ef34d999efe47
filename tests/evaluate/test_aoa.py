"""The area of applicability (soilnet/evaluate/aoa.py): DI, the cross-validated threshold, the saved file, and the
file a fine-tuning run writes beside its model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from scipy.spatial.distance import pdist

from soilnet.evaluate.aoa import (
    AOA_FILE,
    AOAError,
    Reference,
    aoa,
    fit_reference,
    input_features,
    inputs_aoa,
    load_reference,
    mean_pairwise_distance,
    save_reference,
    upper_whisker,
)
from soilnet.evaluate.splits import random_kfold
from soilnet.jobs.predict_map import predict_map


def _folds(n: int, k: int = 5, seed: int = 0):
    return [(f.test, f.train) for f in random_kfold(n, k, seed)]


def _clusters(n: int = 300, seed: int = 0) -> np.ndarray:
    """``(n, 4)`` features in three clusters with columns of very different scales."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, -2.0, 0.5], [-2.0, 2.0, 1.0, -1.0]])
    x = centres[rng.integers(0, 3, n)] + 0.4 * rng.standard_normal((n, 4))
    return x * np.array([1.0, 1000.0, 0.01, 50.0])


def _grid_inputs(kit, n: int, seed: int, level_of_ndvi: np.ndarray | None = None):
    """Images and climate like the labelled kit's training samples; ``level_of_ndvi`` overrides the NDVI patch."""
    _, _, image, climate, _ = kit.make_samples(n, seed)
    image = image.astype(np.float32)
    if level_of_ndvi is not None:
        image[:, kit.SCHEMA.channels.index("NDVI")] = level_of_ndvi[:, None, None]
    return image, climate


def test_mean_pairwise_distance_is_the_mean_over_pairs():
    z = np.random.default_rng(1).standard_normal((60, 3)).astype(np.float32)
    assert mean_pairwise_distance(z) == pytest.approx(pdist(z).mean(), rel=1e-5)


def test_torch_distances_agree_with_scikit_learn(monkeypatch):
    """The device path (torch.cdist, float32, chunked) gives the float64 path's DI to ~1e-3."""
    x = _clusters()
    ref = fit_reference(x, _folds(len(x)))
    new = _clusters(500, seed=9)
    new[:50, 1] += 8000.0
    monkeypatch.setattr("soilnet.evaluate.aoa.CHUNK_ELEMENTS", 300 * 64)  # several chunks
    di, inside = aoa(ref, new)
    di_t, inside_t = aoa(ref, new, device="cpu")
    np.testing.assert_allclose(di_t, di, atol=2e-3)
    assert (inside_t == inside).mean() > 0.99
    assert len(aoa(ref, new[:0], device="cpu")[0]) == 0


def test_upper_whisker_drops_outliers():
    values = np.r_[np.arange(1.0, 11.0), 100.0, np.nan]
    assert upper_whisker(values) == 10.0
    assert upper_whisker(np.arange(1.0, 11.0)) == 10.0


def test_training_points_have_di_zero_and_are_inside():
    x = _clusters()
    ref = fit_reference(x, _folds(len(x)))
    di, inside = aoa(ref, x)
    assert di.shape == (len(x),) and np.all(di < 1e-3) and inside.all()


def test_threshold_comes_from_cross_validation():
    """Each training sample's DI is taken against the fold that held it out, scaled by the mean pairwise
    distance of the standardised training data; the threshold is those DIs' upper whisker."""
    x = _clusters()
    folds = _folds(len(x))
    ref = fit_reference(x, folds)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    d_mean = pdist(z).mean()
    expected = np.empty(len(x))
    for test, train in folds:
        d = np.sqrt(((z[test][:, None, :] - z[train][None, :, :]) ** 2).sum(-1)).min(axis=1)
        expected[test] = d / d_mean
    np.testing.assert_allclose(ref.train_di, expected, rtol=1e-4, atol=1e-6)
    assert ref.mean_distance == pytest.approx(d_mean, rel=1e-5)
    assert ref.threshold == pytest.approx(upper_whisker(expected), rel=1e-4)
    assert ref.threshold > 0  # not the in-sample DI, which is 0 for every training point
    # other folds give another threshold: it is the cross-validation's, not a fixed quantile
    assert fit_reference(x, _folds(len(x), k=2, seed=3)).threshold != pytest.approx(ref.threshold)


def test_in_distribution_cells_inside_and_an_unseen_patch_flagged():
    x = _clusters()
    ref = fit_reference(x, _folds(len(x)))
    new = _clusters(200, seed=7)
    _, inside = aoa(ref, new)
    assert inside.mean() > 0.9
    far = new.copy()
    far[:, 1] += 8000.0  # 8 training standard deviations or so along one column
    di, inside = ref.aoa(far)
    assert not inside.any() and np.all(di > ref.threshold)


def test_weights_and_constant_columns():
    x = _clusters()
    x = np.c_[x, np.full(len(x), 5.0)]  # constant in training: carries no distance
    ref = fit_reference(x, _folds(len(x)))
    assert ref.weights.tolist() == [1.0] * 5
    moved = x[:10].copy()
    moved[:, 4] = 1e6
    np.testing.assert_allclose(aoa(ref, moved)[0], aoa(ref, x[:10])[0])
    # a zero weight ignores the column, however far the new samples are along it
    ref0 = fit_reference(x, _folds(len(x)), weights=np.array([1.0, 0.0, 1.0, 1.0, 1.0]))
    far = x[:10].copy()
    far[:, 1] += 1e7
    assert aoa(ref0, far)[1].all()
    with pytest.raises(AOAError, match="non-negative"):
        fit_reference(x, _folds(len(x)), weights=-np.ones(5))
    with pytest.raises(AOAError, match="same features"):
        fit_reference(np.ones((10, 3)), _folds(10))
    with pytest.raises(AOAError, match=r"\(M, 5\)"):
        aoa(ref, x[:, :3])


def test_region_with_an_out_of_distribution_patch(kit):
    """Map-like cells from the model's inputs: cells like the training samples are inside; a patch whose NDVI is
    far above anything in training is flagged (not dropped)."""
    image, climate = _grid_inputs(kit, 300, seed=0)
    names = (kit.SCHEMA.channels, kit.SCHEMA.climate_variables)
    features, cols = input_features(image, climate, *names)
    assert features.shape == (300, 2 * len(names[0]) + 2 * len(names[1]))
    assert cols[0].endswith("_centre") and cols[-1].endswith("_std")
    ref = fit_reference(features, _folds(300), names=cols)
    assert ref.names == cols
    ndvi = np.random.default_rng(5).uniform(0, 1, 400)
    ndvi[:40] = 6.0  # the out-of-distribution patch
    cells, _ = input_features(*_grid_inputs(kit, 400, seed=11, level_of_ndvi=ndvi), *names)
    di, inside = ref.aoa(cells)
    assert di.shape == inside.shape == (400,)
    assert not inside[:40].any()
    assert inside[40:].mean() > 0.9
    # the same from the model inputs themselves, as the map calls it
    di2, inside2 = inputs_aoa(ref, *_grid_inputs(kit, 400, seed=11, level_of_ndvi=ndvi))
    np.testing.assert_array_equal(di2, di)
    np.testing.assert_array_equal(inside2, inside)


def test_a_climate_only_reference_ignores_the_image(kit):
    image, climate = _grid_inputs(kit, 200, seed=0)
    ref = fit_reference(input_features(None, climate)[0], _folds(200), modalities=("climate",))
    new_image, new_climate = _grid_inputs(kit, 50, seed=4)
    di, inside = inputs_aoa(ref, new_image * 100, new_climate)
    np.testing.assert_array_equal(di, inputs_aoa(ref, None, new_climate)[0])
    assert inside.mean() > 0.9
    assert not inputs_aoa(ref, None, new_climate + 1000)[1].any()


def test_saved_file_round_trips(tmp_path):
    x = _clusters()
    ref = fit_reference(x, _folds(len(x)), names=["a", "b", "c", "d"])
    save_reference(tmp_path / AOA_FILE, ref)
    assert not list(tmp_path.glob("*.tmp"))
    back = load_reference(tmp_path)  # a run's output_dir
    assert isinstance(back, Reference) and back.names == ["a", "b", "c", "d"]
    assert back.modalities == ("image", "climate")
    assert back.threshold == ref.threshold and back.mean_distance == ref.mean_distance
    for k in ("mean", "std", "weights", "train", "train_di"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ref, k))
    new = _clusters(50, seed=3)
    for a, b in zip(aoa(ref, new), aoa(back, new), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="area of applicability"):
        load_reference(tmp_path / "missing")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "x"})))
    with pytest.raises(AOAError, match="not an area-of-applicability file"):
        load_reference(tmp_path / "other.npz")


def test_finetuning_run_writes_the_area_beside_the_model(finetuned_dir, kit):
    ref = load_reference(finetuned_dir / AOA_FILE)
    metrics = json.loads((finetuned_dir / "metrics.json").read_text())
    saved = metrics["final_model"]["aoa"]
    assert saved["path"] == str(finetuned_dir / AOA_FILE)
    assert saved["threshold"] == pytest.approx(ref.threshold) and 0.7 < saved["train_inside"] <= 1
    n = metrics["model"]["n"]
    assert ref.train.shape == (n, saved["features"]) and np.isfinite(ref.train_di).sum() == n
    assert "Area of applicability" in (finetuned_dir / "report.md").read_text()
    # the labelled kit's own distribution is inside; images ten times brighter are not
    assert ref.modalities == ("image", "climate")
    image, climate = _grid_inputs(kit, 100, seed=21)
    assert inputs_aoa(ref, image, climate)[1].mean() > 0.9
    assert not inputs_aoa(ref, image * 10, climate)[1].any()


def test_map_flags_an_out_of_distribution_patch(finetuned_dir, kit, tmp_path):
    """Band 4 of predict-map (the per-point path): cells drawn like the training samples are inside (1); the cells
    east of 10.4 deg E, whose NDVI is far above anything in training, are flagged (0), and still predicted."""
    region = tmp_path / "region.geojson"
    box = [[[9, 46], [11, 46], [11, 47.5], [9, 47.5], [9, 46]]]
    region.write_text(json.dumps({"type": "Polygon", "coordinates": box}))

    def acquire(lon, lat):
        image, climate = _grid_inputs(kit, len(lon), seed=int(abs(lon).sum() * 1e6) % 2**32)
        image[lon > 10.4, kit.SCHEMA.channels.index("NDVI")] = 6.0
        return image.astype(np.float16), climate, np.ones(len(lon), dtype=bool)

    out = tmp_path / "map.tif"
    predict_map(finetuned_dir, region, 10000.0, out, acquire=acquire, tile_size=8, batch_size=100)
    with rasterio.open(out) as src:
        pred, flag = src.read(1), src.read(4)
        assert float(src.tags()["aoa_threshold"]) == pytest.approx(load_reference(finetuned_dir).threshold)
        cols, rows = np.meshgrid(np.arange(src.width) + 0.5, np.arange(src.height) + 0.5)
        t = src.transform
        x, y = t.c + cols * t.a, t.f + rows * t.e  # cell centres (north-up)
        lon, _ = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(x, y)
    ok = np.isfinite(pred)
    assert np.array_equal(ok, np.isfinite(flag))
    east, west = ok & (lon > 10.45), ok & (lon < 10.35)
    assert east.sum() > 20 and west.sum() > 20
    assert (flag[east] == 0).all()
    assert flag[west].mean() > 0.9

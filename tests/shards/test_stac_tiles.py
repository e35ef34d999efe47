"""The STAC source on the map's tile path (``read_window``, ``climate_many``) over the STAC test world
(tests/shards/test_stac_world.py): Earth Engine's winter composite computed from the scenes' COGs, the climate of
many cells from the Zarr store, and ``soilnet predict-map`` taking that path from a model packed from STAC."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import shapely.geometry
from affine import Affine

from shards.sources.landsat import SR_BANDS, SR_OFFSET, SR_SCALE
from shards.sources.stac import StacSource
from soilnet.config.pack import StacConfig
from soilnet.evaluate.tiles import TileAcquire
from soilnet.jobs.predict_map import predict_map, source_tiles
from soilnet.train.regressor import load_model

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))
from cog_kit import QA_CLOUD  # noqa: E402
from labelled_kit import finetuned_dir, labelled_shards, run_packed_from  # noqa: E402, F401  (fixtures)
from test_stac_world import CENTRE, SCHEMA, build, serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EUROPE_STAC = REPO / "configs" / "preprocess" / "europe_stac.yaml"
FIRST = 200  # the window: scene A's rows and columns 200..420, on its own grid
SIZE = 220


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with serving(build(tmp_path_factory.mktemp("stac-tiles"))) as w:
        yield w


def source(world, schema=SCHEMA) -> StacSource:
    return StacSource(schema, StacConfig(url=world.stac.url, climate_store=world.server.href(world.store.path)))


def test_a_window_is_the_median_of_the_clear_winter_scenes_else_the_barest_clear_scene(world):
    """Scene A: A1 (January) and A3 (December) are winter scenes, A2 (July) a summer one. Where both winter scenes
    are clear the composite is their mean (a median of two), rounded half up; inside A3's cloud box only A1 is;
    where A1's cloud box meets A3's, no winter scene is clear, and A2, the only clear scene, fills in."""
    a1, a2, a3 = (world.scenes[k] for k in ("A1", "A2", "A3"))
    transform = a1.transform @ Affine.translation(FIRST, FIRST)
    image, valid = source(world).read_window(a1.crs, transform, SIZE, SIZE)
    assert image.shape == (SCHEMA.n_channels, SIZE, SIZE) and valid.all()
    rows, cols = np.mgrid[FIRST : FIRST + SIZE, FIRST : FIRST + SIZE]
    in_a3_cloud = (a3.qa_pixel[rows, cols] & QA_CLOUD) > 0
    in_a1_cloud = ~a1.clear()[rows, cols]
    both = a1.clear()[rows, cols] & a3.clear()[rows, cols]
    assert both.any() and (in_a3_cloud & ~in_a1_cloud).any() and (in_a1_cloud & in_a3_cloud).any()
    window = (slice(None), rows, cols)
    dn_a1, dn_a2, dn_a3 = (s.dn[window].astype(np.float64) for s in (a1, a2, a3))
    want = np.where(both, np.floor((dn_a1 + dn_a3) / 2 + 0.5), np.where(in_a1_cloud & in_a3_cloud, dn_a2, dn_a1))
    sr = [SCHEMA.channels.index(b) for b in SR_BANDS]
    np.testing.assert_array_equal(image[sr], (want.astype(np.float32) * SR_SCALE + SR_OFFSET).astype(np.float32))
    assert np.isfinite(image[[SCHEMA.channels.index(c) for c in ("elevation", "slope", "NDVI")]]).all()


def test_a_window_without_any_clear_scene_or_outside_every_scene_is_invalid(world):
    a1 = world.scenes["A1"]
    corner = source(world).read_window(a1.crs, a1.transform, 100, 100)  # every scene of A is cloudy there
    assert not corner[1].any() and np.isnan(corner[0][0]).all()
    far = Affine(30.0, 0.0, 900_000.0, 0.0, -30.0, 5_300_000.0)  # 14.5 E: no scene, no DEM
    image, valid = source(world).read_window("EPSG:32632", far, 20, 20)
    assert image.shape == (SCHEMA.n_channels, 20, 20) and not valid.any()


def test_climate_many_agrees_with_the_point_path_and_marks_missing_values(world):
    src = source(world)
    names = ["clouds", "clear", "bare", "sea"]
    lon, lat = (np.array([world.points[n][k] for n in names]) for k in (0, 1))
    climate, ok = src.climate_many(lon, lat)
    assert ok.tolist() == [True, True, True, False] and (climate[3] == 0).all()
    for k in range(3):
        np.testing.assert_array_equal(climate[k], src.climate(lon[k], lat[k]))


def test_tile_acquire_cuts_each_cell_patch_from_the_window(world):
    """One window for a tile of 3 x 3 cells at 300 m: each cell's patch is the window's pixels around its centre."""
    a1 = world.scenes["A1"]
    src = source(world)
    p = SCHEMA.pixel_size_m
    x0, y0 = a1.transform @ (CENTRE + 80, CENTRE + 80)  # clear in A1 and A3: no cloud box
    xs, ys = x0 + 300.0 * np.arange(3), y0 - 300.0 * np.arange(3)
    xx, yy = np.meshgrid(xs, ys)
    lon, lat = src._transformer(a1.crs, "EPSG:4326").transform(xx.ravel(), yy.ravel())
    acquire = TileAcquire(src, SCHEMA.patch_size, p, image_dtype=np.float32)
    [(idx, patches, climate, ok)] = list(acquire.batches(a1.crs, xs, ys, np.ones((3, 3), bool), lon, lat))
    assert ok.all() and patches.shape == (9, *SCHEMA.image_shape) and climate.shape == (9, *SCHEMA.climate_shape)
    n = SCHEMA.patch_size
    whole, _ = src.read_window(a1.crs, Affine(p, 0, x0 - n * p / 2, 0, -p, y0 + n * p / 2), n, n)
    np.testing.assert_array_equal(patches[0], whole)


def test_predict_map_from_stac_takes_the_tile_path(world, finetuned_dir, tmp_path):  # noqa: F811
    stac = [f"source.stac.url={world.stac.url}", f"source.stac.climate_store={world.server.href(world.store.path)}"]
    run = run_packed_from(finetuned_dir, EUROPE_STAC, [*stac, "source.stac.sign=null"], tmp_path / "from-stac")
    a1 = world.scenes["A1"]
    west, south, east, north = a1.bounds_lonlat()
    box = shapely.box(west + 0.03, south + 0.03, east - 0.03, north - 0.03)
    region = tmp_path / "box.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(box)}))
    assert isinstance(source_tiles(run, load_model(run), []), TileAcquire)
    world.server.reset_log()
    summary = predict_map(run, region, 1000.0, tmp_path / "map.tif", tile_size=4, crs=a1.crs)
    assert summary["complete"] and summary["assembled"]
    with rasterio.open(tmp_path / "map.tif") as cog:
        prediction = cog.read(1)
    assert np.isfinite(prediction).mean() > 0.5  # scene A's cloud-free ground: most of the box

"""The STAC source's test world: Landsat scenes, GLO-30 tiles and a TerraClimate Zarr written in the test, served by
nginx with range requests (tests/shards/http_server.py) and catalogued by the fake STAC API (tests/shards/fake_stac.py).

Area A (cell 8 E, 47 N) and area B (cell 10 E, 47 N) are 512 x 512 scenes at 30 m in UTM 32N; named points sit at
scene pixel corners, so their patch grids are aligned with the scenes' and the expected pixels are known exactly:

- ``clouds``: A's centre. Winter scene A1 has a cloud box (8 rows) and a saturated box (4 rows) in its footprint
  (81.25 % clear): chosen by the winter rule, 768 NaN pixels. A3 (December) is cloudy there, A2 is summer.
- ``clear``: A1 and A3 both clear: the earlier of the equally clear winter scenes, A1, with no NaN.
- ``cloudy``: every scene of A is cloudy there: ``cloud``.
- ``sea``: clear patch, but its TerraClimate cell is the store's fill value: ``nodata``.
- ``bare``: B's centre. Its winter scene is cloudy, so the summer scene with the lowest NDVI (B3, 0.1) wins over
  B2 (0.5); B4 (NDVI 0.0) is too cloudy there.
- ``nowhere``: no scene at all (14 E): ``no_scene``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from soilnet.schema import SampleSchema

sys.path.insert(0, str(Path(__file__).parent))
from cog_kit import QA_CLOUD, corner_point, dem_covering, landsat_scene, scene_grid  # noqa: E402
from fake_stac import DEM_COLLECTION, LANDSAT_COLLECTION, FakeStac, dem_item, landsat_item  # noqa: E402
from http_server import require_nginx, serve_directory  # noqa: E402
from zarr_kit import CELLS_PER_DEGREE, terraclimate_zarr  # noqa: E402

SCHEMA = SampleSchema()
YEAR = 2015
CENTRE = 256  # a scene's centre pixel corner; the patch covers rows and columns 224..288
CLOUD_ROWS, SATURATED_ROWS = (224, 232), (280, 284)


@dataclass
class World:
    root: Path
    scenes: dict = field(default_factory=dict)  # name -> cog_kit.LandsatScene
    tiles: list = field(default_factory=list)
    points: dict = field(default_factory=dict)  # name -> (lon, lat)
    store: object = None  # zarr_kit.ClimateStore
    server: object = None  # http_server.StaticServer
    stac: object = None  # fake_stac.FakeStac

    def overrides(self, out: Path, points_csv: Path, *extra: str) -> list[str]:
        """``soilnet pack`` settings for this world (configs/preprocess/europe_stac.yaml with its URLs)."""
        return [
            f"output_dir={out}",
            f"sampling.points={points_csv}",
            "sampling.region=null",
            f"source.stac.url={self.stac.url}",
            f"source.stac.climate_store={self.server.href(self.store.path)}",
            "shard.max_samples=3",
            *extra,
        ]


def cloud_box(rows: tuple[int, int], cols: tuple[int, int] = (CENTRE - 32, CENTRE + 32)) -> tuple:
    return (rows[0], rows[1], cols[0], cols[1])


def build(root: Path) -> World:
    """Write every file of the world under ``root`` (no server yet)."""
    world = World(root)
    crs, a = scene_grid(8.5, 47.3)
    _, b = scene_grid(10.5, 47.3)
    scenes = root / "scenes"
    corner_nw, centre_patch = (0, 128, 0, 128), (160, 352, 160, 352)
    world.scenes["A1"] = landsat_scene(
        scenes,
        crs,
        a,
        date="2015-01-10",
        ndvi=0.3,
        seed=1,
        qa_boxes=[(QA_CLOUD, cloud_box(CLOUD_ROWS)), (QA_CLOUD, corner_nw)],
        saturated=[cloud_box(SATURATED_ROWS)],
    )
    world.scenes["A2"] = landsat_scene(
        scenes, crs, a, date="2015-07-10", ndvi=0.2, seed=2, qa_boxes=[(QA_CLOUD, corner_nw)]
    )
    world.scenes["A3"] = landsat_scene(
        scenes, crs, a, date="2015-12-20", ndvi=0.3, seed=3, qa_boxes=[(QA_CLOUD, corner_nw), (QA_CLOUD, centre_patch)]
    )
    whole = (0, 512, 0, 512)
    world.scenes["B1"] = landsat_scene(
        scenes, crs, b, date="2015-01-10", wrs=(194, 27), seed=4, qa_boxes=[(QA_CLOUD, whole)]
    )
    world.scenes["B2"] = landsat_scene(scenes, crs, b, date="2015-06-10", wrs=(194, 27), ndvi=0.5, seed=5)
    world.scenes["B3"] = landsat_scene(scenes, crs, b, date="2015-08-10", wrs=(194, 27), ndvi=0.1, seed=6)
    world.scenes["B4"] = landsat_scene(
        scenes, crs, b, date="2015-09-10", wrs=(194, 27), ndvi=0.0, seed=7, qa_boxes=[(QA_CLOUD, centre_patch)]
    )
    world.points = {
        "clouds": corner_point(crs, a, CENTRE, CENTRE),
        "clear": corner_point(crs, a, CENTRE, 420),
        "cloudy": corner_point(crs, a, 64, 64),
        "sea": corner_point(crs, a, 420, 420),
        "bare": corner_point(crs, b, CENTRE, CENTRE),
        "nowhere": (14.5, 47.3),
    }
    for name in ("A1", "B2"):
        world.tiles += dem_covering(root / "dem", world.scenes[name].bounds_lonlat())
    lon, lat = world.points["sea"]  # the centre of its TerraClimate cell, and a box around it
    cell = 1.0 / CELLS_PER_DEGREE
    clon = -180.0 + (math.floor((lon + 180.0) * CELLS_PER_DEGREE) + 0.5) * cell
    clat = 90.0 - (math.floor((90.0 - lat) * CELLS_PER_DEGREE) + 0.5) * cell
    sea = (clon - cell / 4, clat - cell / 4, clon + cell / 4, clat + cell / 4)
    world.store = terraclimate_zarr(root / "terraclimate.zarr", SCHEMA, (8.0, 46.8, 15.0, 47.8), sea=[sea])
    return world


@contextlib.contextmanager
def serving(world: World, delay_s: float = 0.0) -> Iterator[World]:
    """The world's files behind nginx and its items in the fake STAC API, until the block ends."""
    require_nginx()
    with serve_directory(world.root, delay_s=delay_s) as server, FakeStac() as stac:
        stac.add(LANDSAT_COLLECTION, [landsat_item(s, server.href) for s in world.scenes.values()])
        stac.add(DEM_COLLECTION, [dem_item(t, server.href) for t in world.tiles])
        world.server, world.stac = server, stac
        yield world


def points_csv(path: Path, world: World, names: list[str]) -> Path:
    rows = ["id,lon,lat", *(f"{n},{world.points[n][0]!r},{world.points[n][1]!r}" for n in names)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_world_puts_each_named_point_where_its_case_needs_it(tmp_path):
    world = build(tmp_path)
    a1 = world.scenes["A1"]
    assert not a1.clear()[CENTRE - 32 : CENTRE + 32, CENTRE - 32 : CENTRE + 32].all()
    assert a1.clear()[CENTRE - 32 : CENTRE + 32, 420 - 32 : 420 + 32].all()
    lon, lat = world.points["sea"]
    assert all(
        world.store.value(v, SCHEMA.months[0], lon, lat) != world.store.value(v, SCHEMA.months[0], lon, lat)
        for v in ("aet", "pr")
    )  # NaN

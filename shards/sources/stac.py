"""A STAC API and cloud-optimized files as a :class:`~shards.sources.base.Source` (``source.kind: stac``).

The Earth Engine source's product, read without a quota: Landsat Collection 2 Level 2 scenes found through a STAC
API (pystac-client) and read as COGs through GDAL's HTTP range requests, Copernicus GLO-30 elevation from a COG
collection of the same API, and TerraClimate from a Zarr store (:mod:`shards.sources.zarr_climate`).

- **Search**: once per ``group_deg`` cell of points (:mod:`shards.sources.stac_catalog`), for the ``year`` and
  ``eo:cloud_cover <= max_cloud_cover``; a point keeps the items whose footprint contains it (and whose
  ``platform`` is the configured one), the first ``max_scenes`` by date, as Earth Engine's ``filterBounds``
  and ``limit`` do.
- **Scene choice**: :func:`shards.sources.landsat.choose_scene` over the scenes' clear fraction and NDVI on
  the patch footprint, computed from windowed reads of ``QA_PIXEL``/``QA_RADSAT`` (and ``SR_B4``/``SR_B5``):
  winter scenes first, the other months only when no winter scene is clear enough.
- **Pixels**: each asset warped onto the point's grid (``patch_size`` x ``patch_size`` pixels of ``pixel_size_m``
  in its UTM zone, the local-raster source's grid) from the file's decoded blocks, which the process's threads
  share (:mod:`shards.sources.cog_reader`): reflectance bands bilinear like :mod:`shards.sources.rasters` (the
  seven of a scene in one warp), the QA bit masks nearest (interpolating bits would invent flags), a pixel
  outside the scene filled (SR 0, ``QA_PIXEL`` 1 = fill). Scale, offset, QA/RADSAT masking, the clear-fraction
  rejection and the indices are :func:`shards.sources.landsat.decode_pixels`, so they have one home.
- **DEM and slope**: the GLO-30 tiles covering the footprint, warped (bilinear) onto the grid widened by one
  pixel; slope in degrees from the 4-neighbour central differences (what ``ee.Terrain.slope`` computes), on the
  30 m grid.
- **Lineage**: ``meta.qa`` records the item ID, its collection, every asset href read (query strings removed:
  never a signed token) and the DEM tiles; ``scene_date`` is the item's date.
- **Threads**: ``threads`` points at a time per process, but one computes at a time
  (:class:`~shards.sources.transport.Turn`): the others wait on the network, and a point's own requests (the
  bands of a scene, the climate variables) overlap on ``max_per_host`` I/O threads.
- **The map's tile path** (:meth:`StacSource.read_window`, :meth:`StacSource.climate_many`): Earth Engine's
  per-pixel winter composite (:func:`shards.sources.landsat.winter_composite`) of the year's scenes over the window,
  and the climate of many cells from the chunks that hold them.

Rejections are the Earth Engine source's: ``no_scene``, ``cloud``, ``nodata``. A file that cannot be read after
the retries fails the point (ledger ``error``) with a message naming the href, never a token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import pystac_client
import rasterio
import shapely
import xarray as xr
import zarr
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from shards.sources.base import Patch, Rejected
from shards.sources.cog_reader import AssetReader, Grid, grid_bounds
from shards.sources.landsat import (
    QA_BANDS,
    QA_NOT_CLEAR,
    SR_BANDS,
    SR_OFFSET,
    SR_SCALE,
    TOPOGRAPHY,
    channels_from_dn,
    choose_scene,
    decode_pixels,
    winter_composite,
)
from shards.sources.rasters import utm_crs
from shards.sources.stac_catalog import Catalogue, Scene
from shards.sources.transport import HostLimit, configure_gdal, gdal_options, load_hook, redact
from shards.sources.zarr_climate import ZarrClimate
from soilnet.config.base import ConfigError
from soilnet.config.pack import StacConfig
from soilnet.schema import SampleSchema, compute_indices

SCENE_BANDS = (*SR_BANDS, *QA_BANDS)
FILL = {"QA_PIXEL": 1}  # the value a pixel outside the scene gets: QA_PIXEL's fill bit; SR's fill is 0
NEAREST = set(QA_BANDS)  # bit masks: never interpolated


def slope_degrees(elevation: np.ndarray, pixel_size_m: float) -> np.ndarray:
    """``(H, W)`` float32 slope in degrees of an elevation grid (metres, ``pixel_size_m`` apart): the 4-neighbour
    central differences ``ee.Terrain.slope`` uses (one-sided on the grid's edge, which the caller crops)."""
    dzdy, dzdx = np.gradient(np.asarray(elevation, dtype=np.float64), pixel_size_m)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)


def terrain(dem: np.ndarray, pixel_size_m: float) -> dict[str, np.ndarray]:
    """``{"elevation", "slope"}`` float32 ``(H, W)`` from an elevation grid one pixel wider on every side
    ``(H + 2, W + 2)``: the slope's central differences need the neighbours, which are then cropped."""
    slope = slope_degrees(dem, pixel_size_m)
    return {"elevation": dem[1:-1, 1:-1].astype(np.float32), "slope": slope[1:-1, 1:-1]}


class StacSource:
    """Acquires the schema's channels and climate series from a STAC API, COGs and Zarr (module docstring)."""

    name = "stac"
    max_window_pixels = 1_000_000  # the map's windows: the local rasters' (a window is warped per scene and band)

    def __init__(self, schema: SampleSchema, cfg: StacConfig):
        missing = [b for b in SCENE_BANDS if b not in cfg.assets]
        if missing:
            raise ConfigError(f"source.stac.assets: no asset key for {missing}")
        if schema.climate_variables and not cfg.climate_store:
            raise ConfigError("source.stac.climate_store: set the TerraClimate Zarr store (a path or a URL)")
        self.schema, self.cfg = schema, cfg
        self.gdal = configure_gdal(gdal_options(cfg.max_retries, cfg.retry_delay_s, cfg.timeout_s), cfg.gdal)
        self.limit = HostLimit(cfg.max_per_host)
        # the requests of one point (a scene's bands, the climate variables) overlap on these threads
        io = ThreadPoolExecutor(cfg.max_per_host, thread_name_prefix="stac-io")
        # one chunk request at a time per Zarr read, which holds one slot of the per-host limit; reads are per
        # chunk of points and cached, so this costs little
        zarr.config.set({"async.concurrency": 1})
        sign = load_hook(cfg.sign)
        self.topography = any(c in schema.channels for c in TOPOGRAPHY)
        collections = [cfg.collection, *([cfg.dem_collection] if self.topography else [])]
        self.catalogue = Catalogue(cfg.url, collections, self.limit, cfg.max_retries, cfg.retry_delay_s, cfg.timeout_s)
        self.reader = AssetReader(sign, self.limit, cfg.max_retries, cfg.retry_delay_s, io, cfg.block_cache_mb << 20)
        self.climate_store = None
        if schema.climate_variables:
            self.climate_store = ZarrClimate(
                str(cfg.climate_store),
                schema,
                cfg.climate_names,
                cfg.climate_units,
                sign=sign,
                limit=self.limit,
                retries=cfg.max_retries,
                delay_s=cfg.retry_delay_s,
                cache_mb=cfg.climate_cache_mb,
                io=io,
            )
        self.concurrency = cfg.threads
        self._to: dict[tuple[str, str], Transformer] = {}

    # -- grids -----------------------------------------------------------------------------------------------

    def _transformer(self, a: str, b: str) -> Transformer:
        if (a, b) not in self._to:
            self._to[(a, b)] = Transformer.from_crs(a, b, always_xy=True)
        return self._to[(a, b)]

    def grid(self, lon: float, lat: float, margin: int = 0) -> Grid:
        """``(crs, transform, width, height)``: the point's patch grid (the local-raster source's), ``margin`` pixels
        wider on each side."""
        s = self.schema
        crs = utm_crs(lon, lat)
        x, y = self._transformer("EPSG:4326", crs).transform(lon, lat)
        half = s.patch_size * s.pixel_size_m / 2.0 + margin * s.pixel_size_m
        size = s.patch_size + 2 * margin
        return crs, from_origin(x - half, y + half, s.pixel_size_m, s.pixel_size_m), size, size

    # -- scenes ----------------------------------------------------------------------------------------------

    def scenes(self, lon: float, lat: float) -> list[Scene]:
        """The point's candidate scenes: in its cell's search, containing it, of the platform, first by date."""
        cfg = self.cfg
        group = self.catalogue.group(cfg.collection, lon, lat, cfg.group_deg, cfg.year, cfg.max_cloud_cover)
        mine = [
            s
            for s in group
            if shapely.intersects_xy(s.geometry, lon, lat) and (cfg.platform is None or s.platform == cfg.platform)
        ]
        return sorted(mine, key=lambda s: (s.date, s.id))[: cfg.max_scenes]

    def scenes_over(self, collection: str, box: tuple[float, float, float, float], year: int, max_cloud: float):
        """The items of ``collection`` whose footprint meets ``box`` (lon/lat), first by date: the searches of
        every ``group_deg`` cell the box touches, each made once per process."""
        g = self.cfg.group_deg
        found: dict[str, Scene] = {}
        for i in range(math.floor(box[0] / g), math.floor(box[2] / g) + 1):
            for j in range(math.floor(box[1] / g), math.floor(box[3] / g) + 1):
                for scene in self.catalogue.group(collection, (i + 0.5) * g, (j + 0.5) * g, g, year, max_cloud):
                    if shapely.intersects(scene.geometry, shapely.box(*box)):
                        found[scene.id] = scene
        return sorted(found.values(), key=lambda s: (s.date, s.id))

    def _lonlat_box(self, grid: Grid) -> tuple[float, float, float, float]:
        return self._transformer(grid[0], "EPSG:4326").transform_bounds(*grid_bounds(grid))

    def _bands(self, scene: Scene, bands: tuple[str, ...], grid: Grid, reads: dict) -> list[np.ndarray]:
        """``bands`` of ``scene`` on ``grid``, each read once per patch; the ones not read yet that resample alike
        (the reflectance bands: bilinear, fill 0) are warped together."""
        missing = [b for b in bands if (scene.id, b) not in reads]
        for how in {self._resampling(b) for b in missing}:
            alike = [b for b in missing if self._resampling(b) == how]
            hrefs = [scene.href(self.cfg.assets[b], f"source.stac.assets.{b}") for b in alike]
            for band, pixels in zip(alike, self.reader.read_bands(hrefs, grid, *how), strict=True):
                reads[(scene.id, band)] = pixels
        return [reads[(scene.id, b)] for b in bands]

    @staticmethod
    def _resampling(band: str) -> tuple[Resampling, float]:
        """How a band is warped: the QA bit masks nearest (interpolating bits would invent flags), the rest
        bilinear; and the value a pixel outside the scene gets."""
        return (Resampling.nearest if band in NEAREST else Resampling.bilinear), FILL.get(band, 0)

    def describe(self, scene: Scene, grid, reads: dict, ndvi: bool) -> dict:
        """Earth Engine's scene description: ``id``, ``date``, ``clear`` fraction, ``ndvi`` mean of clear pixels.

        A scene whose ``QA_PIXEL`` alone leaves it less than ``min_clear_fraction`` clear is not read further
        (saturation can only lower that): its ``clear`` is then that upper bound, which changes no choice."""
        qa = self._bands(scene, ("QA_PIXEL",), grid, reads)[0].astype(np.int64)
        clear = (qa & QA_NOT_CLEAR) == 0
        if clear.mean() >= self.cfg.min_clear_fraction:
            clear &= self._bands(scene, ("QA_RADSAT",), grid, reads)[0] == 0
        out = {"id": scene.id, "date": scene.date, "clear": float(clear.mean()), "ndvi": None}
        if ndvi and clear.any():
            red, nir = (b * SR_SCALE + SR_OFFSET for b in self._bands(scene, ("SR_B4", "SR_B5"), grid, reads))
            index = compute_indices({"SR_B4": red, "SR_B5": nir}, ("NDVI",))["NDVI"]
            out["ndvi"] = float(np.nanmean(index[clear]))
        return out

    def choose(self, scenes: list[Scene], grid, reads: dict) -> tuple[Scene, str, int]:
        """Earth Engine's rule; winter scenes are described first and the rest only if no winter one is clear."""
        cfg = self.cfg
        winter = [s for s in scenes if int(s.date[5:7]) in cfg.winter_months]
        described = [self.describe(s, grid, reads, ndvi=False) for s in winter]
        if not any(d["clear"] >= cfg.min_clear_fraction for d in described):
            for s in scenes:
                if s not in winter:
                    d = self.describe(s, grid, reads, ndvi=False)
                    if d["clear"] >= cfg.min_clear_fraction:
                        d = self.describe(s, grid, reads, ndvi=True)
                    described.append(d)
        chosen, rule = choose_scene(described, cfg.winter_months, cfg.min_clear_fraction)
        return next(s for s in scenes if s.id == chosen["id"]), rule, len(described)

    # -- topography ------------------------------------------------------------------------------------------

    def topography_at(self, lon: float, lat: float) -> tuple[dict[str, np.ndarray], list[str]]:
        """``{"elevation", "slope"}`` ``(H, W)`` float32 (m, degrees) on the patch grid, and the tiles' hrefs."""
        s = self.schema
        if not self.topography:
            return {name: np.zeros((s.patch_size, s.patch_size), dtype=np.float32) for name in TOPOGRAPHY}, []
        dem, hrefs = self.elevation(self.grid(lon, lat, margin=1))
        if not hrefs:
            raise Rejected("nodata", f"no {self.cfg.dem_collection} tile covers the point")
        if np.isnan(dem).any():
            raise Rejected("nodata", f"the DEM has no data at {int(np.isnan(dem).sum())} pixels of the footprint")
        return terrain(dem, s.pixel_size_m), hrefs

    def elevation(self, grid: Grid) -> tuple[np.ndarray, list[str]]:
        """``(H, W)`` float64 elevation (m) on ``grid`` from the GLO-30 tiles that meet it (bilinear; where tiles
        meet, the first by ID that has the pixel; NaN where none has), and the tiles' hrefs (no tokens)."""
        cfg = self.cfg
        _, _, width, height = grid
        dem = np.full((height, width), np.nan, dtype=np.float64)
        hrefs = []
        for tile in sorted(self.scenes_over(cfg.dem_collection, self._lonlat_box(grid), 0, 100.0), key=lambda t: t.id):
            href = tile.href(cfg.dem_asset, "source.stac.dem_asset")
            part = self.reader.read(href, grid, Resampling.bilinear, nodata=np.nan).astype(np.float64)
            dem = np.where(np.isnan(dem), part, dem)
            hrefs.append(redact(href))
        return dem, hrefs

    # -- the map's tile path ---------------------------------------------------------------------------------

    def read_window(self, crs, transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The tile path's read (:mod:`soilnet.evaluate.tiles`): the schema's channels ``(C, H, W)`` float32 on a
        north-up window in ``crs`` (``transform``: its affine, metres) and a valid mask ``(H, W)``.

        The pixels are Earth Engine's tile composite (:func:`shards.sources.landsat.winter_composite`) of the
        year's scenes that meet the window, each read as on the per-point path (QA nearest, reflectance bilinear,
        the same clear rule), and the DEM and slope; invalid (NaN) where no scene is clear or no DEM tile has
        data."""
        with self.limit.turn.computing():
            grid = (crs, transform, width, height)
            dn, has = winter_composite(self._window_scenes(grid))
            wider = (crs, transform @ Affine.translation(-1, -1), width + 2, height + 2)
            dem = self.elevation(wider)[0] if self.topography else np.zeros((height + 2, width + 2))
            topography = terrain(dem, self.schema.pixel_size_m)
            valid = has & np.isfinite(topography["elevation"]) & np.isfinite(topography["slope"])
            image = channels_from_dn(dn, valid, cast(np.ndarray, topography), self.schema)
            return image, valid

    def _window_scenes(self, grid: Grid) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
        """``(dn (7, H, W), clear (H, W), winter)`` of each scene of the year that meets the window."""
        cfg = self.cfg
        scenes = [
            s
            for s in self.scenes_over(cfg.collection, self._lonlat_box(grid), cfg.year, cfg.max_cloud_cover)
            if cfg.platform is None or s.platform == cfg.platform
        ]
        any_clear = False
        for scene in scenes:
            reads: dict = {}
            qa = self._bands(scene, ("QA_PIXEL",), grid, reads)[0].astype(np.int64)
            clear = (qa & QA_NOT_CLEAR) == 0
            if not clear.any():
                continue
            clear &= self._bands(scene, ("QA_RADSAT",), grid, reads)[0] == 0
            dn = np.stack(self._bands(scene, SR_BANDS, grid, reads))
            clear &= (dn > 0).all(axis=0)  # SR fill is 0
            any_clear = True
            yield dn, clear, int(scene.date[5:7]) in cfg.winter_months
        if not any_clear:  # the composite has no pixel at all
            _, _, width, height = grid
            yield np.zeros((len(SR_BANDS), height, width), np.float32), np.zeros((height, width), bool), False

    def climate_many(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T, F)`` float32 TerraClimate of ``N`` points (each chunk of the store read once) and ok ``(N,)``:
        False where a value is missing (the climate is 0 there)."""
        if self.climate_store is None:
            return np.zeros((len(lon), *self.schema.climate_shape), np.float32), np.ones(len(lon), bool)
        with self.limit.turn.computing():
            values = self.climate_store.many(lon, lat)
        ok = ~np.isnan(values).any(axis=(1, 2))
        return np.where(ok[:, None, None], values, 0.0).astype(np.float32), ok

    # -- Source interface ------------------------------------------------------------------------------------

    def patch(self, lon: float, lat: float) -> Patch:
        """image: ``(C, H, W)`` float32 in the schema's channel order; not-clear pixels are NaN. Computed in this
        process's turn (:class:`~shards.sources.transport.Turn`), given away while waiting on the network."""
        with self.limit.turn.computing():
            return self._patch(lon, lat)

    def _patch(self, lon: float, lat: float) -> Patch:
        cfg = self.cfg
        grid = self.grid(lon, lat)
        scenes = self.scenes(lon, lat)
        reads: dict = {}
        scene, rule, considered = self.choose(scenes, grid, reads)
        pixels = dict(zip(SCENE_BANDS, self._bands(scene, SCENE_BANDS, grid, reads), strict=True))
        topography, dem = self.topography_at(lon, lat)
        by_name = cast(np.ndarray, {**pixels, **topography})  # decode_pixels indexes its argument by band name only
        image, fraction = decode_pixels(by_name, self.schema, scene.id, cfg.min_clear_fraction)
        qa = {
            "scene": scene.id,
            "rule": rule,
            "clear_fraction": round(fraction, 4),
            "scenes_considered": considered,
            "crs": grid[0],
            "collection": cfg.collection,
            "assets": {band: redact(scene.hrefs[cfg.assets[band]]) for band in SCENE_BANDS},
            "dem": dem,
        }
        return Patch(image=image, scene_date=scene.date, qa=qa)

    def climate(self, lon: float, lat: float) -> np.ndarray:
        """``(T, F)`` float32 TerraClimate at the point's cell; a missing value is ``Rejected("nodata")``."""
        s = self.schema
        if self.climate_store is None:
            return np.empty(s.climate_shape, dtype=np.float32)
        with self.limit.turn.computing():
            values = self.climate_store.point(lon, lat)
        bad = np.argwhere(np.isnan(values))
        if len(bad):
            t, f = bad[0]
            raise Rejected("nodata", f"TerraClimate has no {s.climate_variables[f]} for {s.months[t]} at the point")
        return values

    def targets(self, lon: float, lat: float, patch: Patch, climate: np.ndarray) -> dict[str, float]:
        return {}

    def versions(self) -> dict[str, str]:
        cfg = self.cfg
        return {
            "pystac-client": pystac_client.__version__,
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "xarray": xr.__version__,
            "zarr": zarr.__version__,
            "stac_api": redact(cfg.url),
            "landsat": cfg.collection,
            "dem": cfg.dem_collection,
            "climate": redact(cfg.climate_store or ""),
        }


def from_config(schema: SampleSchema, cfg: StacConfig | None) -> StacSource:
    """From ``source.stac``; the catalogue and the climate store are checked here, before any point."""
    if cfg is None:
        raise ValueError("source.kind is 'stac' but the source.stac section is missing")
    return StacSource(schema, cfg)

"""Earth Engine as a :class:`~shards.sources.base.Source`: Landsat 8 patches, Copernicus DEM and TerraClimate.

Two requests per point, each holding one slot of the shared :class:`~shards.budget.InFlightBudget`:

1. ``value:compute`` (``getInfo``): the point's Landsat 8 Collection 2 Level 2 scenes of ``year`` with their date,
   clear fraction over the patch footprint and mean NDVI of the clear pixels, and the TerraClimate series at the
   point (raw stored values; ``None`` where masked, so true zeros stay zeros).
2. ``image:computePixels`` (``NUMPY_NDARRAY``): the chosen scene's raw ``SR_B1..SR_B7``, ``QA_PIXEL`` and
   ``QA_RADSAT`` with the Copernicus GLO-30 elevation and its slope, on an explicit grid: ``patch_size x
   patch_size`` pixels of ``pixel_size_m`` metres in the point's UTM zone, centred on the point.

The scene is chosen as the seed did: the clearest scene in the winter window (``winter_months``) if one is at
least ``min_clear_fraction`` clear, else the clear-enough scene with the lowest NDVI (the barest soil). Reflectance
is ``DN * 2.75e-5 - 0.2``; a pixel is clear when ``QA_PIXEL`` has none of fill, dilated cloud, cloud, cloud shadow
and snow set and ``QA_RADSAT`` is 0. Pixels that are not clear become NaN (``shard.on_nonfinite`` then rejects or
masks the sample); a patch less than ``min_clear_fraction`` clear is ``Rejected("cloud")``. The spectral indices
are computed here from the reflectance with :func:`soilnet.schema.compute_indices`, so their definition has one
home. Elevation is in metres, slope in degrees (``ee.Terrain.slope``). Copernicus GLO-30 covers the whole land
surface, north of 60 N too, where SRTM stops.

The map's tile path (:mod:`soilnet.evaluate.tiles`, through :meth:`EarthEngineSource.read_window` and
:meth:`EarthEngineSource.climate_many`) makes two requests per window (a tile, or a strip of its rows) instead of
two per cell:

1. ``image:computePixels`` on the window's own grid (its CRS as ``crsCode``, or ``crsWkt`` (WKT1) for a CRS
   without an EPSG code; its affine; its width and height) of a cloud-masked composite,
   :meth:`EarthEngineSource.winter_composite`: the same collection and year as above (scenes meeting the window's
   lon/lat bounds), each scene's pixels masked by the same QA rule (:func:`_clear`); per pixel the median DN of
   the clear scenes of the winter months, else (no clear winter scene at that pixel) the DN of the clear scene
   with the lowest NDVI, the per-point rule applied per pixel instead of per patch. Bands: ``SR_B1..SR_B7`` (DN,
   rounded to uint16, 0 where masked), the same elevation and slope (float32) and ``valid`` (uint8: 1 where every
   band has data, i.e. a clear scene in the year and the DEM). Pixels are nearest-neighbour, Earth Engine's
   default, as in the patch request. Decoding is the patch's: the same scale and offset, the indices from
   :func:`soilnet.schema.compute_indices`, NaN reflectance where not valid.
2. ``image:computePixels`` of the TerraClimate months on TerraClimate's own grid (EPSG:4326, 1/24 degree) over
   the pixels that hold the window's cells, raw integers with masked values set to :data:`CLIMATE_MASKED`; each
   cell takes the pixel that contains it, as the point request's ``reduceRegion(first)`` does.

A request is at most 48 MiB of uncompressed pixels (width x height x bytes of every band), 32768 pixels a side and
1024 bands (Earth Engine's limits; beyond them it answers HTTP 400). A larger window is cut into the fewest
full-width strips that fit (:func:`request_blocks`): at 23 bytes a pixel, one image request holds up to 2.19 M
pixels (1479 x 1479, :attr:`EarthEngineSource.max_window_pixels`); one climate request of 61 months x 14 variables
(3416 bytes a pixel) up to 14.7 k TerraClimate pixels, about 5 x 5 degrees; more than 1024 climate bands take one
request per 1024. Both answers are ``NPY``, read here with a header limit sized to the bands. A failed request
raises :class:`EarthEngineError` naming the window (or the cells) and the HTTP status.

Retries on 429 and 5xx with exponential backoff are the client's own (``ee.data.setMaxRetries``).
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
from pathlib import Path

import numpy as np
from pyproj import CRS, Transformer

from shards.budget import InFlightBudget
from shards.sources.base import Patch, Rejected
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
)
from shards.sources.rasters import utm_crs
from soilnet.config.base import ConfigError
from soilnet.config.pack import EarthEngineConfig
from soilnet.schema import CLIMATE_BY_NAME, SampleSchema

LANDSAT = "LANDSAT/LC08/C02/T1_L2"
DEM = "COPERNICUS/DEM/GLO30"
TERRACLIMATE = "IDAHO_EPSCOR/TERRACLIMATE"
TERRACLIMATE_DEG = 1 / 24  # TerraClimate's grid: 2.5 arc-minutes in EPSG:4326, edges on whole degrees
TERRACLIMATE_SCALE_M = round(math.radians(TERRACLIMATE_DEG) * 6378137.0, 1)  # 4638.3 m: its pixel at the equator
# computePixels' limits (Earth Engine REST reference, projects.image.computePixels): uncompressed bytes (width x
# height x the bytes of every band), pixels a side, bands; a request beyond them is answered HTTP 400.
MAX_REQUEST_BYTES = 48 * 2**20
MAX_REQUEST_SIDE = 32768
MAX_REQUEST_BANDS = 1024
VALID = "valid"
# The composite's bands as the tile request returns them; their sizes count against MAX_REQUEST_BYTES (23 bytes).
COMPOSITE = np.dtype([*((b, "<u2") for b in SR_BANDS), *((t, "<f4") for t in TOPOGRAPHY), (VALID, "u1")])
CLIMATE_MASKED = -999999  # a masked TerraClimate value in the climate request: below every raw value
CLIMATE_TYPE = np.dtype("<i4")
NPY_HEADER_PER_BAND = 64  # characters of an NPY header a band may take: ``('201001_aet', '<i4'), ``


class EarthEngineError(OSError):
    """A tile-path request that Earth Engine refused or failed (after the client's retries), naming the window."""


def initialize(cfg: EarthEngineConfig) -> None:
    """Authenticate and connect this process, or raise a :class:`ConfigError` that names no secret.

    A service-account key file (``service_account_key`` or ``GOOGLE_APPLICATION_CREDENTIALS``) works on headless
    nodes; without one, the credentials stored by ``earthengine authenticate`` are used.
    """
    import ee
    import google.auth.exceptions

    key = cfg.service_account_key or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    who = f"service-account key {key}" if key else "stored user credentials"
    try:
        credentials = ee.ServiceAccountCredentials(key_file=key) if key else "persistent"
        ee.Initialize(credentials, project=cfg.project, url=cfg.url)
    except (ee.EEException, google.auth.exceptions.GoogleAuthError, OSError, ValueError) as err:
        reason = str(err.args[0] if err.args else err).splitlines()[0][:300]
        message = f"source.earthengine: cannot authenticate with {who}: {type(err).__name__}: {reason}"
        raise ConfigError(message) from None
    ee.data.setMaxRetries(cfg.max_retries)
    ee.data.setDeadline(cfg.timeout_s * 1000)


class EarthEngineSource:
    """Acquires the schema's channels and climate series from Earth Engine (see the module docstring); a
    :class:`~shards.sources.base.TileSource`."""

    name = "earthengine"
    # The most pixels of the composite one request holds (2.19 M): a window up to this size is one request.
    max_window_pixels = MAX_REQUEST_BYTES // COMPOSITE.itemsize

    def __init__(self, schema: SampleSchema, cfg: EarthEngineConfig, budget_dir: str | Path):
        self.schema = schema
        self.cfg = cfg
        initialize(cfg)
        self.budget = InFlightBudget(budget_dir, cfg.max_in_flight)
        self.concurrency = cfg.threads
        self._last = threading.local()
        self._to_utm: dict[str, Transformer] = {}

    # -- expressions shared by the point and the tile requests -----------------------------------------------

    def _year_scenes(self, region):
        """The Landsat 8 scenes of the acquisition year over ``region`` (an ``ee.Geometry``)."""
        import ee

        year = self.cfg.year
        return ee.ImageCollection(LANDSAT).filterBounds(region).filterDate(f"{year}-01-01", f"{year + 1}-01-01")

    def _climate_bands(self):
        """TerraClimate's schema months and variables as one image, bands ``YYYYMM_var`` (raw stored values)."""
        import ee

        s = self.schema
        return (
            ee.ImageCollection(TERRACLIMATE)
            .filterDate(f"{s.months[0]}-01", f"{_next_month(s.months[-1])}-01")
            .select(list(s.climate_variables))
            .toBands()
        )

    def winter_composite(self, region):
        """The tile request's image over ``region``: see the module docstring (tile path, request 1)."""
        import ee

        clear = self._year_scenes(region).map(_clear_dn)
        winter = clear.filter(_months_filter(self.cfg.winter_months)).select(list(SR_BANDS)).median()
        barest = clear.qualityMosaic("bareness").select(list(SR_BANDS))
        stack = barest.blend(winter).round().toUint16().addBands(_topography().toFloat())
        valid = stack.mask().reduce(ee.Reducer.min()).gt(0).rename(VALID).toUint8()
        return stack.addBands(valid).unmask(0, False)

    # -- the point requests ----------------------------------------------------------------------------------

    def _footprint(self, lon: float, lat: float) -> tuple[str, float, float]:
        """The UTM zone and the top-left corner (metres) of the patch grid centred on the point."""
        crs = utm_crs(lon, lat)
        if crs not in self._to_utm:
            self._to_utm[crs] = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        x, y = self._to_utm[crs].transform(lon, lat)
        half = self.schema.patch_size * self.schema.pixel_size_m / 2.0
        return crs, x - half, y + half

    def _scenes_and_climate(self, lon: float, lat: float) -> dict:
        """Request 1: ``{"scenes": FeatureCollection, "climate": {"YYYYMM_var": raw or None}}``."""
        import ee

        s = self.schema
        crs, left, top = self._footprint(lon, lat)
        size = s.patch_size * s.pixel_size_m
        footprint = ee.Geometry.Rectangle([left, top - size, left + size, top], crs, False)
        point = ee.Geometry.Point([lon, lat])

        def describe(image):
            image = ee.Image(image)
            clear = _clear(image).unmask(0)
            means = (
                clear.rename("clear")
                .addBands(_ndvi(image).updateMask(clear).rename("ndvi"))
                .reduceRegion(reducer=ee.Reducer.mean(), geometry=footprint, crs=crs, scale=s.pixel_size_m)
            )
            return ee.Feature(
                None,
                {
                    "id": image.get("system:index"),
                    "date": image.date().format("YYYY-MM-dd"),
                    "clear": means.get("clear"),
                    "ndvi": means.get("ndvi"),
                },
            )

        scenes = self._year_scenes(point).limit(self.cfg.max_scenes, "system:time_start")
        climate = self._climate_bands().reduceRegion(
            reducer=ee.Reducer.first(), geometry=point, scale=TERRACLIMATE_SCALE_M
        )
        request = ee.Dictionary({"scenes": ee.FeatureCollection(scenes.map(describe)), "climate": climate})
        with self.budget.slot():
            info = request.getInfo()
        assert isinstance(info, dict)  # an ee.Dictionary's value
        return info

    def _pixels(self, scene_id: str, lon: float, lat: float) -> np.ndarray:
        """Request 2: a structured ``(H, W)`` array with the raw Landsat bands, elevation and slope."""
        import ee

        s = self.schema
        crs, left, top = self._footprint(lon, lat)
        landsat = ee.Image(f"{LANDSAT}/{scene_id}").select([*SR_BANDS, *QA_BANDS])
        transform = (s.pixel_size_m, 0, left, 0, -s.pixel_size_m, top)
        request = {
            "expression": landsat.addBands(_topography()),
            "fileFormat": "NUMPY_NDARRAY",
            "bandIds": [*SR_BANDS, *QA_BANDS, *TOPOGRAPHY],
            "grid": pixel_grid(crs, transform, s.patch_size, s.patch_size),
        }
        with self.budget.slot():
            return ee.data.computePixels(request)

    # -- the tile requests -----------------------------------------------------------------------------------

    def _compute_pixels(self, expression, bands: list[str], grid: dict, what: str) -> np.ndarray:
        """One ``computePixels`` holding a budget slot, as a structured ``(H, W)`` array; a failure is an
        :class:`EarthEngineError` that names ``what`` and the HTTP status.

        The answer is ``NPY`` read here, not the client's ``NUMPY_NDARRAY`` conversion: its ``numpy.load`` keeps
        numpy's 10 000-character header limit, which a structured type of more than about 400 bands (the
        climate's 854) exceeds. The header is still bounded (:data:`NPY_HEADER_PER_BAND` a band) and never
        unpickled."""
        import ee

        request = {"expression": expression, "fileFormat": "NPY", "bandIds": bands, "grid": grid}
        try:
            with self.budget.slot():
                data = ee.data.computePixels(request)
        except ee.EEException as err:
            status = getattr(getattr(err.__context__, "resp", None), "status", None)
            http = f"HTTP {status}: " if status else ""
            raise EarthEngineError(f"Earth Engine computePixels for {what} failed: {http}{err}") from None
        limit = 10_000 + NPY_HEADER_PER_BAND * len(bands)
        return np.load(io.BytesIO(data), allow_pickle=False, max_header_size=limit)

    def _blocks(self, expression, bands, dtype, crs, transform, width: int, height: int, what: str) -> np.ndarray:
        """``(height, width)`` structured ``dtype`` from the fewest requests that fit (:func:`request_blocks`)."""
        out = np.zeros((height, width), dtype=dtype)
        a, b, c, d, e, f = tuple(transform)[:6]
        for rows, cols in request_blocks(height, width, dtype.itemsize):
            sub = (a, b, c + cols.start * a + rows.start * b, d, e, f + cols.start * d + rows.start * e)
            grid = pixel_grid(crs, sub, cols.stop - cols.start, rows.stop - rows.start)
            got = self._compute_pixels(expression, bands, grid, what)
            for name in bands:
                out[name][rows, cols] = got[name]
        return out

    # -- Source interface ------------------------------------------------------------------------------------

    def patch(self, lon: float, lat: float) -> Patch:
        """image: ``(C, H, W)`` float32 in the schema's channel order; not-clear pixels are NaN."""
        info = self._scenes_and_climate(lon, lat)
        self._last.point, self._last.info = (lon, lat), info  # climate() of the same point reuses request 1
        scenes = [f["properties"] for f in info["scenes"]["features"]]
        scene, rule = choose_scene(scenes, self.cfg.winter_months, self.cfg.min_clear_fraction)
        pixels = self._pixels(scene["id"], lon, lat)
        image, clear_fraction = decode_pixels(pixels, self.schema, scene["id"], self.cfg.min_clear_fraction)
        qa = {
            "scene": scene["id"],
            "rule": rule,
            "clear_fraction": round(clear_fraction, 4),
            "scenes_considered": len(scenes),
            "crs": utm_crs(lon, lat),
        }
        return Patch(image=image, scene_date=scene["date"], qa=qa)

    def climate(self, lon: float, lat: float) -> np.ndarray:
        """``(T, F)`` float32: TerraClimate at the point, each band times its scale factor; zeros stay zeros."""
        if getattr(self._last, "point", None) == (lon, lat):
            info = self._last.info
        else:
            info = self._scenes_and_climate(lon, lat)
        return decode_climate(info["climate"], self.schema)

    def read_window(self, crs, transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The tile path's read (:mod:`soilnet.evaluate.tiles`): the schema's channels ``(C, H, W)`` float32 of
        :meth:`winter_composite` on a north-up window in ``crs`` (``transform``: its affine, metres), from one
        ``computePixels`` on the window's grid (more when it exceeds the request limits), and a valid mask
        ``(H, W)``: False where a band has no data (no clear scene in the year, no DEM); NaN there."""
        import ee

        a, _, c, _, e, f = tuple(transform)[:6]
        box = window_lonlat(crs, (c, f + height * e, c + width * a, f))
        region = ee.Geometry.Rectangle(list(box), "EPSG:4326", False)
        what = f"the window {width} x {height} px at x {c:.1f}..{c + width * a:.1f}, y {f + height * e:.1f}..{f:.1f}"
        what += f" in {_crs_name(crs)} (lon {box[0]:.4f}..{box[2]:.4f}, lat {box[1]:.4f}..{box[3]:.4f})"
        bands = list(COMPOSITE.names or ())
        pixels = self._blocks(self.winter_composite(region), bands, COMPOSITE, crs, transform, width, height, what)
        return decode_composite(pixels, self.schema)

    def climate_many(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T, F)`` float32 TerraClimate of ``N`` points, each band times its scale factor, from one
        ``computePixels`` on TerraClimate's grid over the pixels that hold them (more beyond the request limits),
        and ok ``(N,)``: False where a value is masked."""
        s = self.schema
        lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
        if len(lon) == 0:
            return np.zeros((0, *s.climate_shape), np.float32), np.zeros(0, bool)
        col = np.floor((lon + 180.0) / TERRACLIMATE_DEG).astype(np.int64)
        row = np.floor((90.0 - lat) / TERRACLIMATE_DEG).astype(np.int64)
        r0, c0 = int(row.min()), int(col.min())
        height, width = int(row.max()) - r0 + 1, int(col.max()) - c0 + 1
        transform = (
            TERRACLIMATE_DEG,
            0.0,
            -180.0 + c0 * TERRACLIMATE_DEG,
            0.0,
            -TERRACLIMATE_DEG,
            90.0 - r0 * TERRACLIMATE_DEG,
        )
        names = climate_band_names(s)
        what = f"the climate of {len(lon)} cells (lon {lon.min():.4f}..{lon.max():.4f}, "
        what += f"lat {lat.min():.4f}..{lat.max():.4f})"
        expression = self._climate_bands().unmask(CLIMATE_MASKED, False).toInt32()
        raw = np.empty((len(names), len(lon)), CLIMATE_TYPE)
        for start in range(0, len(names), MAX_REQUEST_BANDS):
            group = names[start : start + MAX_REQUEST_BANDS]
            dtype = np.dtype([(n, CLIMATE_TYPE) for n in group])
            block = self._blocks(expression, group, dtype, "EPSG:4326", transform, width, height, what)
            at = block[row - r0, col - c0]
            raw[start : start + len(group)] = np.stack([at[n] for n in group])
        ok = (raw != CLIMATE_MASKED).all(axis=0)
        scales = np.array([CLIMATE_BY_NAME[v].scale for v in s.climate_variables])
        values = raw.T.reshape(len(lon), *s.climate_shape).astype(np.float64) * scales
        return np.where(ok[:, None, None], values, 0.0).astype(np.float32), ok

    def targets(self, lon: float, lat: float, patch: Patch, climate: np.ndarray) -> dict[str, float]:
        return {}

    def versions(self) -> dict[str, str]:
        import ee

        return {"earthengine-api": ee.__version__, "landsat": LANDSAT, "dem": DEM, "climate": TERRACLIMATE}


def _clear(image):
    """1 where the pixel is usable: no fill, cloud, cloud shadow or snow bit and no saturated band."""
    return image.select("QA_PIXEL").bitwiseAnd(QA_NOT_CLEAR).eq(0).And(image.select("QA_RADSAT").eq(0))


def _ndvi(image):
    """NDVI of a scene's reflectance (``SR_B5``, ``SR_B4`` scaled to reflectance first)."""
    return image.select(["SR_B5", "SR_B4"]).multiply(SR_SCALE).add(SR_OFFSET).normalizedDifference(["SR_B5", "SR_B4"])


def _clear_dn(image):
    """A scene's ``SR_B1..SR_B7`` DN and ``bareness`` (minus NDVI), masked to its clear pixels (:func:`_clear`)."""
    import ee

    image = ee.Image(image)
    return image.select(list(SR_BANDS)).addBands(_ndvi(image).multiply(-1).rename("bareness")).updateMask(_clear(image))


def _months_filter(months: list[int]):
    """Scenes acquired in any of ``months`` (1..12)."""
    import ee

    return ee.Filter.Or(*[ee.Filter.calendarRange(m, m, "month") for m in months])


def _topography():
    """Copernicus GLO-30 ``elevation`` (m) and its ``slope`` (degrees, ``ee.Terrain.slope``)."""
    import ee

    tiles = ee.ImageCollection(DEM).select("DEM")
    # A mosaic has no native projection; the slope needs one at the DEM's own 30 m.
    dem = tiles.mosaic().setDefaultProjection(tiles.first().projection())
    return dem.rename("elevation").addBands(ee.Terrain.slope(dem).rename("slope"))


def _next_month(month: str) -> str:
    y, m = (int(v) for v in month.split("-"))
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}"


@functools.lru_cache(maxsize=64)
def _grid_crs(crs: str) -> tuple[dict, str]:
    """A grid's CRS field (``crsCode`` ``EPSG:n`` when the CRS has an EPSG code, else ``crsWkt``, WKT1 in GDAL's
    flavour) and a name for messages; cached, since every patch request of a point in a UTM zone asks again."""
    parsed = CRS(crs)
    code = parsed.to_epsg()
    if code:
        return {"crsCode": f"EPSG:{code}"}, f"EPSG:{code}"
    return {"crsWkt": parsed.to_wkt("WKT1_GDAL")}, parsed.name


def _crs_name(crs) -> str:
    return _grid_crs(str(crs))[1]


def pixel_grid(crs, transform, width: int, height: int) -> dict:
    """A ``computePixels`` grid: the CRS (:func:`_grid_crs`), the affine ``transform`` ``(a, b, c, d, e, f)`` and
    the dimensions."""
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    where = _grid_crs(str(crs))[0]
    return {
        "dimensions": {"width": int(width), "height": int(height)},
        "affineTransform": {"scaleX": a, "shearX": b, "translateX": c, "shearY": d, "scaleY": e, "translateY": f},
        **where,
    }


def window_lonlat(crs, bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` degrees around a window's ``(left, bottom, right, top)`` in ``crs``
    (edges densified, so a curved edge stays inside)."""
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform_bounds(*bounds, densify_pts=21)


def request_blocks(height: int, width: int, bytes_per_pixel: int) -> list[tuple[slice, slice]]:
    """The fewest ``(rows, cols)`` blocks of a ``height`` x ``width`` window, full-width strips where a row fits,
    each within :data:`MAX_REQUEST_BYTES` and :data:`MAX_REQUEST_SIDE`; equal sizes but the last."""
    max_width = min(MAX_REQUEST_SIDE, MAX_REQUEST_BYTES // bytes_per_pixel)
    if max_width < 1:
        raise ValueError(f"one pixel of {bytes_per_pixel} bytes exceeds a request's {MAX_REQUEST_BYTES} bytes")
    w = math.ceil(width / math.ceil(width / max_width))
    max_rows = min(MAX_REQUEST_SIDE, MAX_REQUEST_BYTES // (w * bytes_per_pixel))
    h = math.ceil(height / math.ceil(height / max_rows))
    return [
        (slice(r, min(r + h, height)), slice(c, min(c + w, width)))
        for r in range(0, height, h)
        for c in range(0, width, w)
    ]


def decode_composite(pixels: np.ndarray, schema: SampleSchema) -> tuple[np.ndarray, np.ndarray]:
    """``(C, H, W)`` float32 in the schema's channels and valid ``(H, W)`` from the tile request's structured
    array (:data:`COMPOSITE`); reflectance and indices are NaN where not valid."""
    valid = pixels[VALID] > 0
    dn = np.stack([pixels[b] for b in SR_BANDS]).astype(np.float32)
    return channels_from_dn(dn, valid, pixels, schema), valid


def climate_band_names(schema: SampleSchema) -> list[str]:
    """TerraClimate's band names ``YYYYMM_var`` (``toBands`` of the monthly images) for the schema's months x
    variables, month-major: the ``(T, F)`` order."""
    return [f"{m.replace('-', '')}_{v}" for m in schema.months for v in schema.climate_variables]


def decode_climate(values: dict, schema: SampleSchema) -> np.ndarray:
    """``(T, F)`` float32 from ``{"YYYYMM_var": raw}``; a masked (None) or absent value is ``Rejected("nodata")``."""
    out = np.empty(schema.climate_shape, dtype=np.float32)
    names = iter(climate_band_names(schema))
    for t, month in enumerate(schema.months):
        for f, var in enumerate(schema.climate_variables):
            raw = values.get(next(names))
            if raw is None:
                raise Rejected("nodata", f"TerraClimate has no {var} for {month} at the point")
            out[t, f] = raw * CLIMATE_BY_NAME[var].scale
    return out


def from_config(schema: SampleSchema, cfg: EarthEngineConfig, output_dir: str) -> EarthEngineSource:
    """From ``source.earthengine``; the request budget lives in ``budget_dir`` or ``<output_dir>/.ee_budget``."""
    return EarthEngineSource(schema, cfg, cfg.budget_dir or Path(output_dir) / ".ee_budget")

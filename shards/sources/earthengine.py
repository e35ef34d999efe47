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

Retries on 429 and 5xx with exponential backoff are the client's own (``ee.data.setMaxRetries``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from pyproj import Transformer

from shards.budget import InFlightBudget
from shards.sources.base import Patch, Rejected
from shards.sources.rasters import utm_crs
from soilnet.config.base import ConfigError
from soilnet.config.pack import EarthEngineConfig
from soilnet.schema import CLIMATE_BY_NAME, LANDSAT_BANDS, SampleSchema, compute_indices

LANDSAT = "LANDSAT/LC08/C02/T1_L2"
DEM = "COPERNICUS/DEM/GLO30"
TERRACLIMATE = "IDAHO_EPSCOR/TERRACLIMATE"
SR_BANDS = tuple(LANDSAT_BANDS)
SR_SCALE, SR_OFFSET = 2.75e-5, -0.2
QA_BANDS = ("QA_PIXEL", "QA_RADSAT")
TOPOGRAPHY = ("elevation", "slope")  # the band names the DEM and its slope get in the pixel request
# QA_PIXEL bits: 0 fill, 1 dilated cloud, 3 cloud, 4 cloud shadow, 5 snow (Landsat 8 C2 L2 product guide).
QA_NOT_CLEAR = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5)
TERRACLIMATE_SCALE_M = 4638.3


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


def choose_scene(scenes: list[dict], winter_months: list[int], min_clear: float) -> tuple[dict, str]:
    """The clearest winter scene, else the lowest-NDVI scene, among those at least ``min_clear`` clear.

    ``scenes``: dicts with ``id``, ``date`` (``YYYY-MM-DD``), ``clear`` (0..1) and ``ndvi`` (may be None).
    Returns the scene and the rule that chose it (``winter`` or ``lowest_ndvi``).
    """
    if not scenes:
        raise Rejected("no_scene", "no Landsat 8 scene covers the point in the acquisition year")
    clear = [s for s in scenes if (s.get("clear") or 0.0) >= min_clear]
    if not clear:
        best = max(s.get("clear") or 0.0 for s in scenes)
        raise Rejected("cloud", f"none of {len(scenes)} scenes is {min_clear:.0%} clear (best {best:.0%})")
    winter = [s for s in clear if int(s["date"][5:7]) in winter_months]
    if winter:
        return min(winter, key=lambda s: (-s["clear"], s["date"])), "winter"
    bare = [s for s in clear if s.get("ndvi") is not None]
    if not bare:
        raise Rejected("cloud", "no clear scene has an NDVI over the footprint")
    return min(bare, key=lambda s: (s["ndvi"], s["date"])), "lowest_ndvi"


class EarthEngineSource:
    """Acquires the schema's channels and climate series from Earth Engine (see the module docstring)."""

    name = "earthengine"

    def __init__(self, schema: SampleSchema, cfg: EarthEngineConfig, budget_dir: str | Path):
        self.schema = schema
        self.cfg = cfg
        initialize(cfg)
        self.budget = InFlightBudget(budget_dir, cfg.max_in_flight)
        self.concurrency = cfg.threads
        self._last = threading.local()
        self._to_utm: dict[str, Transformer] = {}

    # -- requests --------------------------------------------------------------------------------------------

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

        s, cfg = self.schema, self.cfg
        crs, left, top = self._footprint(lon, lat)
        size = s.patch_size * s.pixel_size_m
        footprint = ee.Geometry.Rectangle([left, top - size, left + size, top], crs, False)
        point = ee.Geometry.Point([lon, lat])

        def describe(image):
            image = ee.Image(image)
            clear = _clear(image).unmask(0)
            ndvi = image.select(["SR_B5", "SR_B4"]).multiply(SR_SCALE).add(SR_OFFSET)
            ndvi = ndvi.normalizedDifference(["SR_B5", "SR_B4"]).updateMask(clear)
            means = (
                clear.rename("clear")
                .addBands(ndvi.rename("ndvi"))
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

        scenes = (
            ee.ImageCollection(LANDSAT)
            .filterBounds(point)
            .filterDate(f"{cfg.year}-01-01", f"{cfg.year + 1}-01-01")
            .limit(cfg.max_scenes, "system:time_start")
        )
        climate = (
            ee.ImageCollection(TERRACLIMATE)
            .filterDate(f"{s.months[0]}-01", f"{_next_month(s.months[-1])}-01")
            .select(list(s.climate_variables))
            .toBands()
            .reduceRegion(reducer=ee.Reducer.first(), geometry=point, scale=TERRACLIMATE_SCALE_M)
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
        tiles = ee.ImageCollection(DEM).select("DEM")
        # A mosaic has no native projection; the slope needs one at the DEM's own 30 m.
        dem = tiles.mosaic().setDefaultProjection(tiles.first().projection())
        stack = landsat.addBands(dem.rename("elevation")).addBands(ee.Terrain.slope(dem).rename("slope"))
        request = {
            "expression": stack,
            "fileFormat": "NUMPY_NDARRAY",
            "bandIds": [*SR_BANDS, *QA_BANDS, *TOPOGRAPHY],
            "grid": {
                "dimensions": {"width": s.patch_size, "height": s.patch_size},
                "affineTransform": {
                    "scaleX": s.pixel_size_m,
                    "shearX": 0,
                    "translateX": left,
                    "shearY": 0,
                    "scaleY": -s.pixel_size_m,
                    "translateY": top,
                },
                "crsCode": crs,
            },
        }
        with self.budget.slot():
            return ee.data.computePixels(request)

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

    def targets(self, lon: float, lat: float, patch: Patch, climate: np.ndarray) -> dict[str, float]:
        return {}

    def versions(self) -> dict[str, str]:
        import ee

        return {"earthengine-api": ee.__version__, "landsat": LANDSAT, "dem": DEM, "climate": TERRACLIMATE}


def _clear(image):
    """1 where the pixel is usable: no fill, cloud, cloud shadow or snow bit and no saturated band."""
    return image.select("QA_PIXEL").bitwiseAnd(QA_NOT_CLEAR).eq(0).And(image.select("QA_RADSAT").eq(0))


def _next_month(month: str) -> str:
    y, m = (int(v) for v in month.split("-"))
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}"


def decode_pixels(
    pixels: np.ndarray, schema: SampleSchema, scene_id: str, min_clear: float
) -> tuple[np.ndarray, float]:
    """``(C, H, W)`` float32 in the schema's channels from a ``computePixels`` structured array, and the clear
    fraction; raises :class:`Rejected` (``nodata`` or ``cloud``)."""
    dn = np.stack([pixels[b] for b in SR_BANDS]).astype(np.float32)
    qa, radsat = pixels["QA_PIXEL"].astype(np.int64), pixels["QA_RADSAT"].astype(np.int64)
    covered = (dn > 0).all(axis=0)  # SR fill is 0, and computePixels returns 0 where the scene is masked
    if not covered.any():
        raise Rejected("nodata", f"scene {scene_id} has no data over the footprint")
    clear = covered & ((qa & QA_NOT_CLEAR) == 0) & (radsat == 0)
    fraction = float(clear.mean())
    if fraction < min_clear:
        raise Rejected("cloud", f"{fraction:.0%} of the patch is clear in scene {scene_id}")
    reflectance = dn * SR_SCALE + SR_OFFSET
    reflectance[:, ~clear] = np.nan
    layers = {b: reflectance[k] for k, b in enumerate(SR_BANDS)}
    layers.update(compute_indices(layers, schema.channels))
    layers.update({name: pixels[name].astype(np.float32) for name in TOPOGRAPHY})
    return np.stack([layers[c] for c in schema.channels]).astype(np.float32), fraction


def decode_climate(values: dict, schema: SampleSchema) -> np.ndarray:
    """``(T, F)`` float32 from ``{"YYYYMM_var": raw}``; a masked (None) or absent value is ``Rejected("nodata")``."""
    out = np.empty(schema.climate_shape, dtype=np.float32)
    for t, month in enumerate(schema.months):
        for f, var in enumerate(schema.climate_variables):
            raw = values.get(f"{month.replace('-', '')}_{var}")
            if raw is None:
                raise Rejected("nodata", f"TerraClimate has no {var} for {month} at the point")
            out[t, f] = raw * CLIMATE_BY_NAME[var].scale
    return out


def from_config(schema: SampleSchema, cfg: EarthEngineConfig, output_dir: str) -> EarthEngineSource:
    """From ``source.earthengine``; the request budget lives in ``budget_dir`` or ``<output_dir>/.ee_budget``."""
    return EarthEngineSource(schema, cfg, cfg.budget_dir or Path(output_dir) / ".ee_budget")

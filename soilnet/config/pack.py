"""Config of ``soilnet pack``: where points come from, which source acquires them, and how shards are cut."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from soilnet.config.base import Section
from soilnet.config.schema import SchemaConfig


class SamplingConfig(Section):
    """Random locations inside ``region`` (GeoJSON, GeoPackage or Shapefile; its CRS honoured), or a ready point
    list in ``points``.

    The filters are those of ``soilnet sample``: drop a point when more than ``max_excluded_fraction`` of its
    patch lies in ``exclude_classes`` of ``exclude_raster`` (the seed: ESA WorldCover 50/80/90/95/100, 20 %);
    keep at most one point per TerraClimate cell; keep ``min_spacing_m`` metres between points.
    """

    region: str | None = None
    points: str | None = None
    n: int = Field(default=1000, ge=0)
    seed: int = 0
    exclude_raster: str | None = None
    exclude_classes: list[int] = []
    max_excluded_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    one_per_climate_cell: bool = False
    min_spacing_m: float = Field(default=0.0, ge=0.0)


class RasterImageFile(Section):
    """One channel-group mosaic (GeoTIFF/COG/VRT, any CRS): raster band ``i`` holds channel ``bands[i]``."""

    path: str
    bands: list[str]


class RasterClimateFile(Section):
    """One climate variable: one band per month from ``first_month`` (YYYY-MM); values x ``scale`` = schema units."""

    path: str
    variable: str
    first_month: str
    scale: float = 1.0


class RastersConfig(Section):
    """Local rasters (``source.kind: rasters``): channel mosaics, climate stacks, and the scenes' date if known."""

    images: list[RasterImageFile]
    climate: list[RasterClimateFile]
    scene_date: str | None = None


class EarthEngineConfig(Section):
    """Earth Engine (``source.kind: earthengine``): Landsat 8 C2 L2, Copernicus GLO-30 and TerraClimate.

    Authentication: ``service_account_key`` (a JSON key file; or ``GOOGLE_APPLICATION_CREDENTIALS``) for headless
    nodes, else the credentials of ``earthengine authenticate``. ``url``: null for Google's standard endpoint, or
    ``https://earthengine-highvolume.googleapis.com`` for bulk ``computePixels``. ``max_in_flight`` requests at
    once are shared by every worker that uses ``budget_dir`` (default ``<output_dir>/.ee_budget``; it must be on a
    file system with POSIX locks across nodes, as Lustre with ``flock``, GPFS and NFSv4 have).
    """

    project: str | None = None
    service_account_key: str | None = None
    url: str | None = None
    year: int = Field(default=2015, ge=2013)
    winter_months: list[Annotated[int, Field(ge=1, le=12)]] = [12, 1, 2]
    min_clear_fraction: float = Field(default=0.8, ge=0.0, le=1.0)
    max_scenes: int = Field(default=50, gt=0)
    max_in_flight: int = Field(default=40, gt=0)
    threads: int = Field(default=16, gt=0)
    budget_dir: str | None = None
    max_retries: int = Field(default=5, ge=0, lt=100)
    timeout_s: float = Field(default=120.0, gt=0)


LANDSAT_ASSETS = {  # Landsat C2 L2 asset keys of Planetary Computer's and Earth Search's ``landsat-c2-l2``
    "SR_B1": "coastal",
    "SR_B2": "blue",
    "SR_B3": "green",
    "SR_B4": "red",
    "SR_B5": "nir08",
    "SR_B6": "swir16",
    "SR_B7": "swir22",
    "QA_PIXEL": "qa_pixel",
    "QA_RADSAT": "qa_radsat",
}
TERRACLIMATE_NAMES = {"pr": "ppt", "ro": "q", "tmmn": "tmin", "tmmx": "tmax", "vs": "ws"}  # schema -> NetCDF/Zarr


class StacConfig(Section):
    """A STAC API and cloud-optimized files (``source.kind: stac``): Landsat C2 L2 COGs, a Copernicus GLO-30 COG
    collection and a TerraClimate Zarr store; no quota, so throughput grows with processes and bandwidth.

    ``url``/``collection``: the STAC API and its Landsat collection; ``assets`` maps ``SR_B1..SR_B7``,
    ``QA_PIXEL`` and ``QA_RADSAT`` to the items' asset keys; ``platform`` keeps items whose ``platform`` property
    is that one (null: all). ``sign``: a dotted path to a callable ``href -> signed href`` (e.g.
    ``planetary_computer.sign``) applied to every asset and store URL before it is read; signed URLs are never
    logged or recorded. The scene rule and ``year``, ``winter_months``, ``min_clear_fraction``, ``max_scenes`` are
    the Earth Engine source's; ``max_cloud_cover`` (percent) is the catalogue query on ``eo:cloud_cover`` that
    drops scenes before any pixel is read. One search serves every point of a ``group_deg`` x ``group_deg`` cell.
    ``climate_store``: a TerraClimate Zarr store (local path or ``http(s)://`` URL) with variables named by
    ``climate_names`` (schema -> store; unlisted names are the same) on ``time``/``lat``/``lon``; ``climate_units``
    ``physical``: the values as CF-decoded (``scale_factor`` applied), ``raw``: stored integers times the schema's
    scale. Transport: ``threads`` per process, at most ``max_per_host`` requests in flight per host and process,
    ``block_cache_mb`` of decoded COG blocks and ``climate_cache_mb`` of Zarr chunks kept per process,
    ``max_retries`` on 429/5xx from ``retry_delay_s`` doubling; ``gdal``: extra GDAL config options (docs/shards.md).
    """

    url: str = "https://planetarycomputer.microsoft.com/api/stac/v1"
    collection: str = "landsat-c2-l2"
    platform: str | None = "landsat-8"
    assets: dict[str, str] = dict(LANDSAT_ASSETS)
    sign: str | None = None
    year: int = Field(default=2015, ge=2013)
    winter_months: list[Annotated[int, Field(ge=1, le=12)]] = [12, 1, 2]
    min_clear_fraction: float = Field(default=0.8, ge=0.0, le=1.0)
    max_scenes: int = Field(default=50, gt=0)
    max_cloud_cover: float = Field(default=100.0, ge=0.0, le=100.0)
    group_deg: float = Field(default=1.0, gt=0.0, le=10.0)
    dem_collection: str = "cop-dem-glo-30"
    dem_asset: str = "data"
    climate_store: str | None = None
    climate_names: dict[str, str] = dict(TERRACLIMATE_NAMES)
    climate_units: Literal["physical", "raw"] = "physical"
    threads: int = Field(default=16, gt=0)
    max_per_host: int = Field(default=8, gt=0)
    block_cache_mb: int = Field(default=512, gt=0)
    climate_cache_mb: int = Field(default=1024, gt=0)
    max_retries: int = Field(default=5, ge=0, lt=100)
    retry_delay_s: float = Field(default=0.5, ge=0.0)
    timeout_s: float = Field(default=60.0, gt=0)
    gdal: dict[str, str] = {}


class SourceConfig(Section):
    """Which acquisition backend fills a sample: ``synthetic``, ``rasters``, ``earthengine`` or ``stac``.

    ``seed`` and ``bbox`` (west, south, east, north in degrees) define the synthetic world; without a region or
    a point list, points are sampled uniformly by area inside ``bbox``.
    """

    kind: Literal["synthetic", "rasters", "earthengine", "stac"] = "synthetic"
    seed: int = 0
    bbox: tuple[float, float, float, float] = (5.0, 45.0, 15.0, 55.0)
    rasters: RastersConfig | None = None
    earthengine: EarthEngineConfig = EarthEngineConfig()
    stac: StacConfig | None = None


class ShardConfig(Section):
    """``max_samples`` per shard; ``on_nonfinite``: reject a sample with NaN/inf, or keep it with NaN masked to 0."""

    max_samples: int = Field(default=1000, gt=0)
    image_dtype: Literal["float16"] = "float16"
    on_nonfinite: Literal["reject", "mask"] = "reject"


class PackConfig(Section):
    output_dir: str = "outputs/shards"
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    sampling: SamplingConfig = SamplingConfig()
    source: SourceConfig = SourceConfig()
    shard: ShardConfig = ShardConfig()

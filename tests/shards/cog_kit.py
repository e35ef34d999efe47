"""Builders of test rasters, written by GDAL's COG driver through rasterio: Landsat 8 Collection 2 Level-2 scenes
as the USGS distributes them (one cloud-optimized GeoTIFF per band, UTM, 30 m), Copernicus GLO-30 DEM tiles, and
the same scene and DEM as the local-raster source reads them (channel files in the schema's units).

Scene files are named as USGS names them: ``<product id>_SR_B4.TIF``, ``..._QA_PIXEL.TIF``, ``..._QA_RADSAT.TIF``,
e.g. ``LC08_L2SP_195026_20150110_20200910_02_T1_SR_B4.TIF``; the item ID a STAC catalogue gives the scene drops
the processing date (``LC08_L2SP_195026_20150110_02_T1``, as on the Planetary Computer). Surface reflectance is
``uint16`` DN with nodata 0 and ``reflectance = DN * SR_SCALE + SR_OFFSET`` (the Earth Engine source's constants);
``QA_PIXEL`` holds Landsat's bit flags (nodata 1, fill), ``QA_RADSAT`` the saturated-band bits.

Pixel values are smooth and known: band ``b`` has the reflectance ``BASE_REFLECTANCE[b] * (1 + pattern)`` where
``pattern`` is a gentle wave in the scene's own coordinates, so NDVI is ``ndvi`` everywhere (a common factor
cancels in a normalised difference) and bilinear resampling has something to interpolate. Boxes of QA values
(clouds, shadow, snow, fill) and of saturation are placed by the test.

For the identity test (the same scene through the STAC source and the local-raster source):
:func:`local_rasters` writes the scene's reflectance, the schema's indices, elevation and slope onto the scene's
own grid, in the schema's units (``NaN`` where a pixel is not clear), and returns the ``source.rasters.images``
entries; a point at a scene pixel corner (:func:`corner_point`) has a patch grid aligned with the scene's, so
both sources sample the same pixels without interpolation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject, transform_bounds

from shards.sources.earthengine import QA_BANDS, QA_NOT_CLEAR, SR_BANDS, SR_OFFSET, SR_SCALE
from shards.sources.rasters import utm_crs
from soilnet.schema import PIXEL_SIZE_M, SampleSchema, compute_indices

# QA_PIXEL values of the Landsat 8 C2 L2 product guide, composed from its bits: 0 fill, 1 dilated cloud, 3 cloud,
# 4 cloud shadow, 5 snow, 6 clear, 7 water; 8-9 cloud, 10-11 shadow, 12-13 snow/ice, 14-15 cirrus confidence.
LOW = (1 << 8) | (1 << 10) | (1 << 12) | (1 << 14)  # every confidence pair at "low"
QA_FILL = 1
QA_CLEAR = (1 << 6) | LOW  # 21824, Landsat's value for clear land
QA_WATER = (1 << 6) | (1 << 7) | LOW  # clear water: clear for the packer
QA_CLOUD = (1 << 3) | (1 << 9) | LOW  # 22280: cloud, high confidence
QA_DILATED = (1 << 1) | LOW  # dilated cloud
QA_SHADOW = (1 << 4) | (1 << 11) | LOW  # cloud shadow, high confidence
QA_SNOW = (1 << 5) | (1 << 13) | LOW  # snow, high confidence

BASE_REFLECTANCE = {"SR_B1": 0.04, "SR_B2": 0.06, "SR_B3": 0.09, "SR_B4": 0.12, "SR_B6": 0.26, "SR_B7": 0.19}
COG_OPTIONS = {"driver": "COG", "compress": "DEFLATE", "predictor": 2, "blocksize": 256}

Box = tuple[int, int, int, int]  # rows r0:r1, columns c0:c1 of a scene's own grid


@dataclass
class LandsatScene:
    """One Landsat 8 C2 L2 scene on disk: ``files`` maps ``SR_B1..SR_B7``, ``QA_PIXEL``, ``QA_RADSAT`` to COGs;
    ``dn`` ``(7, H, W)`` uint16, ``qa_pixel`` and ``qa_radsat`` ``(H, W)`` uint16 are what they hold."""

    id: str
    product_id: str
    date: str
    crs: str
    transform: Affine
    shape: tuple[int, int]
    wrs_path: int
    wrs_row: int
    files: dict[str, Path]
    dn: np.ndarray
    qa_pixel: np.ndarray
    qa_radsat: np.ndarray
    cloud_cover: float  # percent of the scene's pixels flagged cloud, dilated cloud or shadow (eo:cloud_cover)

    @property
    def epsg(self) -> int:
        return int(self.crs.split(":")[1])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in the scene's CRS."""
        h, w = self.shape
        t = self.transform
        return t.c, t.f + t.e * h, t.c + t.a * w, t.f

    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)``: the scene's bounding box in degrees (a STAC item's ``bbox``)."""
        return tuple(transform_bounds(self.crs, "EPSG:4326", *self.bounds, densify_pts=21))  # type: ignore[return-value]

    def reflectance(self) -> np.ndarray:
        """``(7, H, W)`` float32 ``DN * SR_SCALE + SR_OFFSET``, computed as the Earth Engine source does."""
        return self.dn.astype(np.float32) * SR_SCALE + SR_OFFSET

    def clear(self) -> np.ndarray:
        """``(H, W)`` bool: covered, and none of fill, dilated cloud, cloud, shadow, snow, nor saturation."""
        return (self.dn > 0).all(axis=0) & ((self.qa_pixel & QA_NOT_CLEAR) == 0) & (self.qa_radsat == 0)


def scene_grid(lon: float, lat: float, width: int = 512, height: int = 512) -> tuple[str, Affine]:
    """A 30 m grid in the point's UTM zone with the point near its centre and corners on multiples of 30 m."""
    crs = utm_crs(lon, lat)
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    left = np.floor((x - width * PIXEL_SIZE_M / 2) / PIXEL_SIZE_M) * PIXEL_SIZE_M
    top = np.ceil((y + height * PIXEL_SIZE_M / 2) / PIXEL_SIZE_M) * PIXEL_SIZE_M
    return crs, from_origin(float(left), float(top), PIXEL_SIZE_M, PIXEL_SIZE_M)


def corner_point(crs: str, transform: Affine, row: int, col: int) -> tuple[float, float]:
    """``(lon, lat)`` of the grid's pixel corner ``(row, col)``: a patch centred there is aligned with the grid
    (its half-width, ``patch_size * 30 m / 2``, is a whole number of pixels)."""
    x, y = transform @ (col, row)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return float(lon), float(lat)


def wave(transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` a smooth pattern in -0.25..0.25 from the pixel centres' map coordinates (kilometre scale)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    x, y = transform @ (cols + 0.5, rows + 0.5)
    return (0.15 * np.sin(np.asarray(x) / 1700.0) + 0.10 * np.cos(np.asarray(y) / 2300.0)).astype(np.float64)


def scene_dn(transform: Affine, shape: tuple[int, int], ndvi: float, seed: int) -> np.ndarray:
    """``(7, H, W)`` uint16 DN: ``BASE_REFLECTANCE * (1 + wave)`` (+ 0.2 % noise), SR_B5 set by ``ndvi``."""
    base = dict(BASE_REFLECTANCE)
    base["SR_B5"] = base["SR_B4"] * (1 + ndvi) / (1 - ndvi)
    factor = 1.0 + wave(transform, shape)
    noise = np.random.default_rng(seed).normal(0.0, 0.002, (len(SR_BANDS), *shape))
    reflectance = np.stack([base[b] * factor for b in SR_BANDS]) * (1.0 + noise)
    return np.clip(np.rint((reflectance - SR_OFFSET) / SR_SCALE), 1, 65535).astype(np.uint16)


def write_cog(path: Path, data: np.ndarray, crs: str, transform: Affine, nodata=None, **options) -> Path:
    """``data`` ``(H, W)`` or ``(B, H, W)`` as a cloud-optimized GeoTIFF (GDAL's COG driver, DEFLATE, 256 blocks,
    overviews)."""
    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {**COG_OPTIONS, **options}
    with rasterio.open(
        path,
        "w",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **profile,
    ) as dst:
        dst.write(data)
    return path


def landsat_scene(
    out_dir: Path,
    crs: str,
    transform: Affine,
    shape: tuple[int, int] = (512, 512),
    date: str = "2015-01-10",
    wrs: tuple[int, int] = (195, 26),
    ndvi: float = 0.3,
    qa_boxes: Sequence[tuple[int, Box]] = (),
    saturated: Sequence[Box] = (),
    seed: int = 0,
    processed: str = "20200910",
) -> LandsatScene:
    """Write one scene's ``SR_B1..SR_B7``, ``QA_PIXEL`` and ``QA_RADSAT`` COGs under ``out_dir/<product id>/``.

    ``qa_boxes``: ``(QA value, (r0, r1, c0, c1))`` painted in order over clear land (``QA_FILL`` also sets the
    DN to 0, the SR nodata); ``saturated``: boxes where ``QA_RADSAT`` has band 1's bit set.
    """
    path, row = wrs
    ymd = date.replace("-", "")
    item_id = f"LC08_L2SP_{path:03d}{row:03d}_{ymd}_02_T1"
    product_id = f"LC08_L2SP_{path:03d}{row:03d}_{ymd}_{processed}_02_T1"
    dn = scene_dn(transform, shape, ndvi, seed)
    qa = np.full(shape, QA_CLEAR, dtype=np.uint16)
    radsat = np.zeros(shape, dtype=np.uint16)
    for value, (r0, r1, c0, c1) in qa_boxes:
        qa[r0:r1, c0:c1] = value
        if value == QA_FILL:
            dn[:, r0:r1, c0:c1] = 0
    for r0, r1, c0, c1 in saturated:
        radsat[r0:r1, c0:c1] = 1
    folder = out_dir / product_id
    files = {b: write_cog(folder / f"{product_id}_{b}.TIF", dn[k], crs, transform, 0) for k, b in enumerate(SR_BANDS)}
    files[QA_BANDS[0]] = write_cog(folder / f"{product_id}_QA_PIXEL.TIF", qa, crs, transform, QA_FILL)
    files[QA_BANDS[1]] = write_cog(folder / f"{product_id}_QA_RADSAT.TIF", radsat, crs, transform)
    cloud_cover = round(100 * float(np.isin(qa, [QA_CLOUD, QA_DILATED, QA_SHADOW]).mean()), 2)
    return LandsatScene(item_id, product_id, date, crs, transform, shape, path, row, files, dn, qa, radsat, cloud_cover)


# -- Copernicus GLO-30 DEM ---------------------------------------------------------------------------------------


@dataclass
class DemTile:
    """A DEM COG in EPSG:4326 (float32 metres): ``id`` as the Copernicus tiles are named; ``elevation`` ``(H, W)``."""

    id: str
    path: Path
    transform: Affine
    shape: tuple[int, int]
    elevation: np.ndarray

    @property
    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        h, w = self.shape
        t = self.transform
        return t.c, t.f + t.e * h, t.c + t.a * w, t.f


def hills(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Elevation in metres: a tilted plane with gentle hills (slopes of a few degrees)."""
    return 300.0 + 2000.0 * (lon - np.floor(lon)) + 60.0 * np.sin(lon * 90.0) * np.cos(lat * 70.0)


def dem_tile(
    out_dir: Path,
    west: float,
    south: float,
    size_deg: float = 0.25,
    px_deg: float = 1.0 / 3600.0,
    elevation: Callable[[np.ndarray, np.ndarray], np.ndarray] = hills,
) -> DemTile:
    """A GLO-30-like tile from ``(west, south)``, ``size_deg`` square at ``px_deg`` (1 arc second), with
    ``elevation(lon, lat)`` at the pixel centres; named like ``Copernicus_DSM_COG_10_N47_00_E008_00_DEM``."""
    n = int(round(size_deg / px_deg))
    transform = from_origin(west, south + n * px_deg, px_deg, px_deg)
    rows, cols = np.mgrid[0:n, 0:n]
    lon, lat = transform @ (cols + 0.5, rows + 0.5)
    z = elevation(np.asarray(lon), np.asarray(lat)).astype(np.float32)
    ns, ew = ("N" if south >= 0 else "S"), ("E" if west >= 0 else "W")
    sub = f"{int(round(abs(south) % 1 * 100)):02d}", f"{int(round(abs(west) % 1 * 100)):02d}"
    tile_id = f"Copernicus_DSM_COG_10_{ns}{int(abs(south)):02d}_{sub[0]}_{ew}{int(abs(west)):03d}_{sub[1]}_DEM"
    path = write_cog(out_dir / tile_id / f"{tile_id}.tif", z, "EPSG:4326", transform)
    return DemTile(tile_id, path, transform, (n, n), z)


# -- the same data as the local-raster source reads it -----------------------------------------------------------


def gradient_slope(elevation: np.ndarray, pixel_size_m: float) -> np.ndarray:
    """Slope in degrees from central differences (one-sided at the edges); the STAC source's own slope function
    can be passed to :func:`local_rasters` instead, so that both sides compute it the same way."""
    dzdy, dzdx = np.gradient(elevation.astype(np.float64), pixel_size_m)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)


def dem_on_grid(tiles: Sequence[DemTile], crs: str, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` float32 elevation of the tiles warped (bilinear) onto a grid; NaN where no tile covers it."""
    out = np.full(shape, np.nan, dtype=np.float32)
    for tile in tiles:
        part = np.full(shape, np.nan, dtype=np.float32)
        with rasterio.open(tile.path) as src:
            reproject(
                rasterio.band(src, 1),
                part,
                dst_transform=transform,
                dst_crs=crs,
                dst_nodata=np.nan,
                resampling=Resampling.bilinear,
            )
        out = np.where(np.isnan(out), part, out)
    return out


def local_rasters(
    scene: LandsatScene,
    dem: Sequence[DemTile],
    out_dir: Path,
    schema: SampleSchema,
    slope: Callable[[np.ndarray, float], np.ndarray] = gradient_slope,
) -> list[tuple[Path, list[str]]]:
    """The ``source.rasters.images`` entries ``[(path, [channels])]`` of the scene and DEM as the local-raster
    source reads them, written on the scene's grid: ``<id>_reflectance.tif``
    (the schema's ``SR_B*`` and indices; NaN where not clear, also the nodata value) and ``<id>_topography.tif``
    (elevation, and ``slope(elevation, 30 m)`` in degrees). COGs, float32."""
    clear = scene.clear()
    reflectance = scene.reflectance()
    reflectance[:, ~clear] = np.nan
    layers = {b: reflectance[k] for k, b in enumerate(SR_BANDS)}
    layers.update(compute_indices(layers, schema.channels))
    spectral = [c for c in schema.channels if c in layers]
    out: list[tuple[Path, list[str]]] = []
    if spectral:
        path = out_dir / f"{scene.id}_reflectance.tif"
        stack = np.stack([layers[c] for c in spectral]).astype(np.float32)
        write_cog(path, stack, scene.crs, scene.transform, np.nan, predictor=3)
        out.append((path, spectral))
    topo = [c for c in ("elevation", "slope") if c in schema.channels]
    if topo:
        z = dem_on_grid(dem, scene.crs, scene.transform, scene.shape)
        grids = {"elevation": z, "slope": slope(z, scene.transform.a)}
        path = out_dir / f"{scene.id}_topography.tif"
        stack = np.stack([grids[c] for c in topo]).astype(np.float32)
        write_cog(path, stack, scene.crs, scene.transform, np.nan, predictor=3)
        out.append((path, topo))
    return out


def dem_covering(
    out_dir: Path, bounds_lonlat: tuple[float, float, float, float], size_deg: float = 0.25, **options
) -> list[DemTile]:
    """The DEM tiles of a ``size_deg`` grid that cover ``(west, south, east, north)`` (one item each)."""
    west, south, east, north = bounds_lonlat
    lons = np.arange(np.floor(west / size_deg), np.ceil(east / size_deg)) * size_deg
    lats = np.arange(np.floor(south / size_deg), np.ceil(north / size_deg)) * size_deg
    return [dem_tile(out_dir, float(x), float(y), size_deg, **options) for y in lats for x in lons]

"""Local rasters as a :class:`~shards.sources.base.Source`: channel mosaics and climate stacks in any CRS.

Every file is a GeoTIFF, COG or VRT that GDAL reads. ``images`` are mosaics per channel group: file ``i`` holds
the channels ``bands`` (one raster band each, in the schema's units). A patch is read through
``rasterio.vrt.WarpedVRT`` onto the patch grid: ``patch_size x patch_size`` pixels of ``pixel_size_m`` metres in
the point's local UTM zone, centred on the point (bilinear resampling), so GDAL reads only the window it needs.
``climate`` files hold one variable each, one band per month from ``first_month`` on; the pixel containing the
point is read and multiplied by ``scale``.

A footprint that leaves a raster is ``Rejected("outside")``; a footprint pixel or climate value equal to the
raster's nodata is ``Rejected("nodata")``. A file that cannot be opened or read raises an error naming the file:
the packer records it in the ledger and goes on with the next point.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from shards.sources.base import Patch, Rejected
from soilnet import __version__
from soilnet.schema import SampleSchema, month_range


def utm_crs(lon: float, lat: float) -> str:
    """The local UTM zone of a point as an EPSG code (326xx north, 327xx south)."""
    zone = min(int((lon + 180.0) // 6) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def patch_vrt(src, crs: str, x: float, y: float, schema: SampleSchema, **nodata) -> WarpedVRT:
    """``src`` warped (bilinear) onto the schema's patch grid centred on ``(x, y)`` in ``crs`` (metres)."""
    half = schema.patch_size * schema.pixel_size_m / 2.0
    grid = from_origin(x - half, y + half, schema.pixel_size_m, schema.pixel_size_m)
    return WarpedVRT(
        src,
        crs=crs,
        transform=grid,
        width=schema.patch_size,
        height=schema.patch_size,
        resampling=Resampling.bilinear,
        **nodata,
    )


class RasterSource:
    """``images``: list of ``(path, bands)``; ``climate``: list of ``(path, variable, first_month, scale)``."""

    name = "rasters"
    # The map's tile path reads windows of at most this many pixels (soilnet.evaluate.tiles): a window of about
    # 3 M pixels warped 8x slower per cell than windows of 1 M here (benchmarks/predict_map.py's reference
    # reads at 1 km: 61 against 477 cells/s), and 1 M read as fast as any size tried at 100 m.
    max_window_pixels = 1_000_000

    def __init__(self, schema: SampleSchema, images, climate, scene_date: str | None = None):
        self.schema = schema
        self.scene_date = scene_date
        self.images = [(Path(p), list(bands)) for p, bands in images]
        have = [b for _, bands in self.images for b in bands]
        missing = [c for c in schema.channels if c not in have]
        if missing:
            raise ValueError(f"source.rasters.images: no file provides the channels {missing}")
        self.climate_files = {var: (Path(p), first, scale) for p, var, first, scale in climate}
        missing = [v for v in schema.climate_variables if v not in self.climate_files]
        if missing:
            raise ValueError(f"source.rasters.climate: no file provides the variables {missing}")
        self._open: dict[Path, rasterio.DatasetReader] = {}
        self._to: dict[str, Transformer] = {}
        self._band_index: dict[Path, list[int]] = {}

    def _dataset(self, path: Path):
        if path not in self._open:
            try:
                self._open[path] = rasterio.open(path)
            except rasterio.errors.RasterioIOError as err:
                raise OSError(f"{path}: cannot open raster ({err})") from None
        return self._open[path]

    def _transformer(self, crs) -> Transformer:
        key = str(crs)
        if key not in self._to:
            self._to[key] = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        return self._to[key]

    def _between(self, a: str, b) -> Transformer:
        """A cached pyproj transformer (rasterio's transform_bounds builds one per call: half of a patch's time)."""
        key = f"{a}->{b}"
        if key not in self._to:
            self._to[key] = Transformer.from_crs(a, b, always_xy=True)
        return self._to[key]

    def patch(self, lon: float, lat: float) -> Patch:
        """image: ``(C, H, W)`` float32 in the schema's channel order, on the point's local UTM grid."""
        s = self.schema
        crs = utm_crs(lon, lat)
        x, y = self._transformer(crs).transform(lon, lat)
        half = s.patch_size * s.pixel_size_m / 2.0
        layers: dict[str, np.ndarray] = {}
        for path, bands in self.images:
            wanted = [i for i, b in enumerate(bands) if b in s.channels]
            if not wanted:
                continue
            src = self._dataset(path)
            left, bottom, right, top = self._between(crs, src.crs).transform_bounds(
                x - half, y - half, x + half, y + half
            )
            b = src.bounds
            if left < b.left or right > b.right or bottom < b.bottom or top > b.top:
                raise Rejected("outside", f"footprint leaves {path.name}")
            try:
                with patch_vrt(src, crs, x, y, s) as vrt:
                    data = vrt.read([i + 1 for i in wanted], masked=True)
            except rasterio.errors.RasterioError as err:
                raise OSError(f"{path}: read failed ({err})") from None
            if np.ma.count_masked(data):
                raise Rejected("nodata", f"{int(np.ma.count_masked(data))} nodata values in {path.name}")
            for k, i in enumerate(wanted):
                layers[bands[i]] = np.asarray(data[k], dtype=np.float32)
        image = np.stack([layers[c] for c in s.channels]).astype(np.float32)
        return Patch(image=image, scene_date=self.scene_date, qa={"crs": crs})

    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)`` in degrees: where every image file has pixels (their intersection)."""
        boxes = [transform_bounds(src.crs, "EPSG:4326", *src.bounds) for src in map(self._dataset, self._paths())]
        return max(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), min(b[3] for b in boxes)

    def _paths(self) -> list[Path]:
        return [p for p, bands in self.images if any(b in self.schema.channels for b in bands)]

    def read_window(self, crs, transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The tile path's read (:mod:`soilnet.evaluate.tiles`): the schema's channels ``(C, H, W)`` float32 warped
        (bilinear) onto a north-up window in ``crs`` (``transform``: its affine, metres), one read per file, and
        a valid mask ``(H, W)``: False outside a raster or on its nodata."""
        s = self.schema
        image = np.zeros((len(s.channels), height, width), dtype=np.float32)
        valid = np.ones((height, width), dtype=bool)
        for path, bands in self.images:
            wanted = [i for i, b in enumerate(bands) if b in s.channels]
            if not wanted:
                continue
            src = self._dataset(path)
            try:
                with WarpedVRT(
                    src, crs=crs, transform=transform, width=width, height=height, resampling=Resampling.bilinear
                ) as vrt:
                    data = vrt.read([i + 1 for i in wanted], masked=True)
                    valid &= vrt.dataset_mask() > 0
            except rasterio.errors.RasterioError as err:
                raise OSError(f"{path}: read failed ({err})") from None
            valid &= ~np.ma.getmaskarray(data).any(axis=0)
            for k, i in enumerate(wanted):
                image[s.channels.index(bands[i])] = np.ma.filled(data[k], 0.0)
        return image, valid

    def climate_many(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T, F)`` climate at the pixels containing ``N`` points, one windowed read per variable (the
        window spanning the points), and ok ``(N,)``: False outside a file or on its nodata."""
        s = self.schema
        out = np.zeros((len(lon), *s.climate_shape), dtype=np.float32)
        ok = np.ones(len(lon), dtype=bool)
        for f, var in enumerate(s.climate_variables):
            path, first, scale = self.climate_files[var]
            src = self._dataset(path)
            x, y = self._transformer(src.crs).transform(np.asarray(lon), np.asarray(lat))
            c, r = ~src.transform @ (np.asarray(x), np.asarray(y))
            row, col = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
            ok &= (row >= 0) & (row < src.height) & (col >= 0) & (col < src.width)
            if not ok.any():
                break
            r0, r1, c0, c1 = row[ok].min(), row[ok].max() + 1, col[ok].min(), col[ok].max() + 1
            try:
                block = src.read(self._bands(path, src, first), window=((r0, r1), (c0, c1)), masked=True)
            except rasterio.errors.RasterioError as err:
                raise OSError(f"{path}: read failed ({err})") from None
            rr, cc = np.clip(row - r0, 0, r1 - r0 - 1), np.clip(col - c0, 0, c1 - c0 - 1)
            ok &= ~np.ma.getmaskarray(block)[:, rr, cc].any(axis=0)
            out[:, :, f] = (np.ma.filled(block, 0.0)[:, rr, cc].T.astype(np.float64) * scale).astype(np.float32)
        return out, ok

    def _bands(self, path: Path, src, first: str) -> list[int]:
        """1-based band numbers of the schema's months in a monthly stack starting at ``first`` (cached)."""
        if path not in self._band_index:
            months = month_range(first, _add_months(first, src.count - 1))
            missing = [m for m in self.schema.months if m not in months]
            if missing:
                raise OSError(f"{path}: {src.count} monthly bands from {first} miss the months {missing[:3]}")
            self._band_index[path] = [months.index(m) + 1 for m in self.schema.months]
        return self._band_index[path]

    def climate(self, lon: float, lat: float) -> np.ndarray:
        """``(T, F)`` float32: the schema's months x variables at the pixel containing the point."""
        s = self.schema
        out = np.empty(s.climate_shape, dtype=np.float32)
        for f, var in enumerate(s.climate_variables):
            path, first, scale = self.climate_files[var]
            src = self._dataset(path)
            idx = self._bands(path, src, first)
            x, y = self._transformer(src.crs).transform(lon, lat)
            c, r = ~src.transform @ (x, y)
            row, col = math.floor(r), math.floor(c)
            if not (0 <= row < src.height and 0 <= col < src.width):
                raise Rejected("outside", f"point outside {path.name}")
            try:
                values = src.read(idx, window=((row, row + 1), (col, col + 1)), masked=True)[:, 0, 0]
            except rasterio.errors.RasterioError as err:
                raise OSError(f"{path}: read failed ({err})") from None
            if np.ma.count_masked(values):
                raise Rejected("nodata", f"{var} nodata in {path.name}")
            out[:, f] = np.asarray(values, dtype=np.float64) * scale
        return out

    def targets(self, lon: float, lat: float, patch: Patch, climate: np.ndarray) -> dict[str, float]:
        return {}

    def versions(self) -> dict[str, str]:
        return {"rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "rasters_source": __version__}


def _add_months(first: str, n: int) -> str:
    y, m = (int(v) for v in first.split("-"))
    t = y * 12 + (m - 1) + n
    return f"{t // 12:04d}-{t % 12 + 1:02d}"


def from_config(schema: SampleSchema, cfg) -> RasterSource:
    """From ``source.rasters`` (:class:`soilnet.config.pack.RastersConfig`)."""
    if cfg is None:
        raise ValueError("source.kind is 'rasters' but the source.rasters section is missing")
    return RasterSource(
        schema,
        [(f.path, f.bands) for f in cfg.images],
        [(f.path, f.variable, f.first_month, f.scale) for f in cfg.climate],
        cfg.scene_date,
    )

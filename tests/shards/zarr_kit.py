"""A TerraClimate-like Zarr store for tests and benchmarks, and the same values as the climate GeoTIFFs the
local-raster source reads.

The store is laid out as TerraClimate's global 1/24-degree grid is published (the Planetary Computer's
``terraclimate`` Zarr, from the NetCDF files of climatologylab.org): one variable per name with dimensions
``(time, lat, lon)``, ``lat`` descending from the north, ``lon`` ascending, both at cell centres of the global grid
(``90 - (i + 0.5) / 24``, ``-180 + (j + 0.5) / 24``); ``time`` the first day of each month. Values are stored as
``int16`` with the CF attributes ``scale_factor`` (the schema's :class:`~soilnet.schema.ClimateVariable` scale),
``add_offset`` 0 and ``_FillValue`` -32768 where there is no data (the sea), so ``xarray`` decodes them to floats
with NaN. The names are TerraClimate's own (``ppt``, ``q``, ``tmax``, ``tmin``, ``ws``), which the Earth Engine
catalogue renamed (``pr``, ``ro``, ``tmmx``, ``tmmn``, ``vs``): :data:`TERRACLIMATE_NAMES` maps the schema's names
to them. Zarr format 2 with consolidated metadata (``.zmetadata``), so a reader over plain HTTP never needs a
directory listing.

Stored raw values are known: ``raw = 100 * (month index + 1) + variable index`` (cycling below the int16 limit),
``swe`` 0 everywhere (a true zero, which must stay 0), and the fill value in the ``sea`` boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import xarray as xr
from rasterio.transform import from_origin

from soilnet.schema import CLIMATE_BY_NAME, SampleSchema

TERRACLIMATE_NAMES = {
    "aet": "aet",
    "def": "def",
    "pdsi": "pdsi",
    "pet": "pet",
    "pr": "ppt",
    "ro": "q",
    "soil": "soil",
    "srad": "srad",
    "swe": "swe",
    "tmmn": "tmin",
    "tmmx": "tmax",
    "vap": "vap",
    "vpd": "vpd",
    "vs": "ws",
}
CELLS_PER_DEGREE = 24
FILL = -32768

LonLatBox = tuple[float, float, float, float]  # (west, south, east, north) in degrees


@dataclass
class ClimateStore:
    """A written store: ``raw[var]`` ``(T, n_lat, n_lon)`` int16 (``FILL`` where missing) by schema name;
    ``names`` the schema name -> stored name; ``lat`` descending, ``lon`` ascending cell centres."""

    path: Path
    months: tuple[str, ...]
    lat: np.ndarray
    lon: np.ndarray
    raw: dict[str, np.ndarray]
    names: dict[str, str]

    def value(self, var: str, month: str, lon: float, lat: float) -> float:
        """The decoded value (raw * scale, NaN where missing) of the cell containing the point."""
        i = int(np.floor((90.0 - lat) * CELLS_PER_DEGREE)) - self.row0
        j = int(np.floor((lon + 180.0) * CELLS_PER_DEGREE)) - self.col0
        raw = self.raw[var][self.months.index(month), i, j]
        return float("nan") if raw == FILL else float(raw) * CLIMATE_BY_NAME[var].scale

    @property
    def row0(self) -> int:
        return int(round((90.0 - self.lat[0]) * CELLS_PER_DEGREE - 0.5))

    @property
    def col0(self) -> int:
        return int(round((self.lon[0] + 180.0) * CELLS_PER_DEGREE - 0.5))


def global_cells(box: LonLatBox) -> tuple[np.ndarray, np.ndarray]:
    """The cell centres of TerraClimate's global grid that cover ``box``: ``lat`` descending, ``lon`` ascending."""
    west, south, east, north = box
    r0, r1 = int(np.floor((90 - north) * CELLS_PER_DEGREE)), int(np.ceil((90 - south) * CELLS_PER_DEGREE))
    c0, c1 = int(np.floor((west + 180) * CELLS_PER_DEGREE)), int(np.ceil((east + 180) * CELLS_PER_DEGREE))
    lat = 90.0 - (np.arange(r0, r1) + 0.5) / CELLS_PER_DEGREE
    lon = -180.0 + (np.arange(c0, c1) + 0.5) / CELLS_PER_DEGREE
    return lat, lon


def raw_values(schema: SampleSchema, months: Sequence[str], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """``(T, n_lat, n_lon)`` int16 per schema variable: ``100 * (t + 1) + f`` (below the int16 limit), swe 0."""
    out = {}
    for f, var in enumerate(schema.climate_variables):
        series = (100 * (np.arange(len(months)) + 1) + f) % 30000
        values = np.broadcast_to(series[:, None, None], (len(months), *shape)).astype(np.int16)
        out[var] = np.zeros_like(values) if var == "swe" else values.copy()
    return out


def terraclimate_zarr(
    path: Path,
    schema: SampleSchema,
    box: LonLatBox,
    months: Sequence[str] | None = None,
    sea: Sequence[LonLatBox] = (),
    chunks: tuple[int, int, int] = (12, 64, 64),
    names: dict[str, str] = TERRACLIMATE_NAMES,
    zarr_format: int = 2,
) -> ClimateStore:
    """Write the store for the schema's variables over ``box`` (``months``: the schema's by default); cells whose
    centre lies in a ``sea`` box hold the fill value in every month. ``chunks``: ``(time, lat, lon)``."""
    months = tuple(months or schema.months)
    lat, lon = global_cells(box)
    raw = raw_values(schema, months, (len(lat), len(lon)))
    for west, south, east, north in sea:
        rows = (lat >= south) & (lat <= north)
        cols = (lon >= west) & (lon <= east)
        for values in raw.values():
            values[:, rows[:, None] & cols[None, :]] = FILL
    time = pd.to_datetime([f"{m}-01" for m in months])
    data = {}
    encoding = {}
    for var, values in raw.items():
        scale = CLIMATE_BY_NAME[var].scale
        decoded = np.where(values == FILL, np.nan, values.astype(np.float64) * scale)
        name = names[var]
        data[name] = (("time", "lat", "lon"), decoded, {"long_name": CLIMATE_BY_NAME[var].description})
        data[name][2]["units"] = CLIMATE_BY_NAME[var].unit
        encoding[name] = {"dtype": "int16", "scale_factor": scale, "add_offset": 0.0, "_FillValue": FILL}
        encoding[name]["chunks"] = tuple(min(c, n) for c, n in zip(chunks, decoded.shape, strict=True))
    ds = xr.Dataset(data, coords={"time": time, "lat": lat, "lon": lon})
    ds["lat"].attrs.update(units="degrees_north", standard_name="latitude")
    ds["lon"].attrs.update(units="degrees_east", standard_name="longitude")
    encoding["time"] = {"units": "days since 1900-01-01", "calendar": "gregorian", "dtype": "int32"}
    ds.to_zarr(path, mode="w", consolidated=True, zarr_format=zarr_format, encoding=encoding)
    return ClimateStore(Path(path), months, lat, lon, raw, {v: names[v] for v in raw})


def climate_geotiffs(store: ClimateStore, out_dir: Path) -> list[tuple[Path, str, str, float]]:
    """The store's values as the local-raster source reads them: one int16 GeoTIFF per variable (EPSG:4326, one
    band per month, nodata -32768; 64 x 64 blocks). Returns the ``source.rasters.climate`` entries
    ``(path, variable, first_month, scale)``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    step = 1.0 / CELLS_PER_DEGREE
    transform = from_origin(store.lon[0] - step / 2, store.lat[0] + step / 2, step, step)
    entries = []
    for var, values in store.raw.items():
        path = out_dir / f"terraclimate_{var}.tif"
        with rasterio.open(
            path,
            "w",
            driver="COG",
            width=values.shape[2],
            height=values.shape[1],
            count=values.shape[0],
            dtype="int16",
            crs="EPSG:4326",
            transform=transform,
            nodata=FILL,
            compress="DEFLATE",
            blocksize=64,  # COG's default 512 x 512 block of 61 interleaved bands costs a 32 MB inflate per read
        ) as dst:
            dst.write(values)
        entries.append((path, var, store.months[0], CLIMATE_BY_NAME[var].scale))
    return entries

"""``soilnet sample``: random points uniform by area on the sphere inside the polygons of a region file.

The region (GeoJSON, GeoPackage or Shapefile, in any CRS) is read by :mod:`soilnet.regions`, in lon/lat degrees.

Equal-area sampling: a candidate picks one polygon's bounding box with probability proportional to the box's
spherical area, then draws longitude uniformly and sin(latitude) uniformly inside the box (uniform by area on the
sphere), and is kept when it falls inside that polygon (``shapely.contains_xy``). The polygons are united first,
so the density is the same everywhere inside the region. Candidates are drawn in fixed-size chunks from one
``numpy`` generator seeded by ``seed``, so the result depends only on the file, ``n``, ``seed`` and the filters,
and memory stays bounded by the chunk size plus the output.

Optional filters, applied in candidate order so they are deterministic too: a land-cover raster that drops a point
whose patch footprint has more than ``max_excluded_fraction`` of its pixels in excluded classes; at most one point
per TerraClimate cell (1/24 degree); a minimum great-circle spacing. Sampling continues until ``n`` points pass.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow
import pyarrow.parquet
import rasterio
import shapely
from pyproj import Transformer
from rasterio.windows import from_bounds

from soilnet.atomic import atomic_file
from soilnet.regions import region_polygons
from soilnet.schema import PATCH_SIZE, PIXEL_SIZE_M

EARTH_RADIUS_M = 6_371_008.8
CLIMATE_CELLS_PER_DEGREE = 24  # TerraClimate's 1/24 degree grid
CHUNK = 1 << 18  # candidates per draw: bounds memory, fixes the random stream
GIVE_UP_AFTER = 20_000  # candidates in a row that fail the filters before the region is declared unusable


def _box_weights(polygons: list[shapely.Polygon]) -> tuple[np.ndarray, np.ndarray]:
    """Bounds ``(P, 4)`` (west, south, east, north, degrees) and the boxes' spherical-area probabilities ``(P,)``."""
    bounds = np.array([p.bounds for p in polygons], dtype=float)
    area = (bounds[:, 2] - bounds[:, 0]) * (np.sin(np.radians(bounds[:, 3])) - np.sin(np.radians(bounds[:, 1])))
    return bounds, area / area.sum()


def iter_candidates(polygons: list[shapely.Polygon], seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless chunks of ``(lon, lat)`` (degrees), uniform by spherical area inside the polygons."""
    bounds, prob = _box_weights(polygons)
    rng = np.random.default_rng(seed)
    while True:
        which = rng.choice(len(polygons), size=CHUNK, p=prob)
        u, v = rng.random(CHUNK), rng.random(CHUNK)
        b = bounds[which]
        lon = b[:, 0] + u * (b[:, 2] - b[:, 0])
        s0, s1 = np.sin(np.radians(b[:, 1])), np.sin(np.radians(b[:, 3]))
        lat = np.degrees(np.arcsin(np.clip(s0 + v * (s1 - s0), -1.0, 1.0)))
        inside = np.zeros(CHUNK, dtype=bool)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            inside[sel] = shapely.contains_xy(polygons[k], lon[sel], lat[sel])
        yield lon[inside], lat[inside]


def climate_cell(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """TerraClimate cell index (int64) of each point: row-major on the global 1/24 degree grid."""
    per = CLIMATE_CELLS_PER_DEGREE
    col = np.floor((np.asarray(lon) + 180.0) * per).astype(np.int64) % (360 * per)
    row = np.clip(np.floor((90.0 - np.asarray(lat)) * per).astype(np.int64), 0, 180 * per - 1)
    return row * (360 * per) + col


class OnePerCell:
    """Keeps the first point of every climate cell (``seen``: sorted int64 array of used cells)."""

    def __init__(self) -> None:
        self.seen = np.empty(0, dtype=np.int64)

    def __call__(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        cells = climate_cell(lon, lat)
        _, first = np.unique(cells, return_index=True)
        keep = np.zeros(len(cells), dtype=bool)
        keep[first] = True
        keep &= ~np.isin(cells, self.seen)
        self.seen = np.union1d(self.seen, cells[keep])
        return keep


def _unit_vectors(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    lo, la = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


class MinSpacing:
    """Greedy minimum great-circle spacing (metres): a point is kept when no kept point is closer.

    Kept points are hashed on a 3-D grid of unit vectors whose cell edge is the chord of the spacing, so each test
    looks at 27 cells."""

    def __init__(self, spacing_m: float) -> None:
        self.chord = 2.0 * math.sin(min(spacing_m / (2.0 * EARTH_RADIUS_M), math.pi / 2))
        self.grid: dict[tuple[int, int, int], list[np.ndarray]] = {}

    def __call__(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        xyz = _unit_vectors(lon, lat)
        cells = np.floor(xyz / self.chord).astype(np.int64)
        keep = np.zeros(len(xyz), dtype=bool)
        c2 = self.chord**2
        for i, (p, c) in enumerate(zip(xyz, map(tuple, cells), strict=True)):
            near = False
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for dz in (-1, 0, 1):
                        for q in self.grid.get((c[0] + dx, c[1] + dy, c[2] + dz), ()):
                            if ((p - q) ** 2).sum() < c2:
                                near = True
                                break
                        if near:
                            break
                    if near:
                        break
                if near:
                    break
            if not near:
                keep[i] = True
                self.grid.setdefault(c, []).append(p)
        return keep


class LandCoverExclusion:
    """Drops a point when more than ``max_fraction`` of its patch footprint lies in ``classes`` of a raster.

    The footprint is the schema's patch (``patch_size * pixel_size_m`` metres square, centred on the point), read
    from the raster in its own CRS with a windowed read. Pixels outside the raster or equal to its nodata value
    are not counted as excluded (the raster says nothing about them); the fraction is over the whole footprint.
    """

    def __init__(
        self, path: str | Path, classes: list[int], max_fraction: float, footprint_m: float = PATCH_SIZE * PIXEL_SIZE_M
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"exclusion raster not found: {self.path}")
        try:
            self.src = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as err:
            raise ValueError(f"{self.path}: cannot read the exclusion raster ({err})") from None
        self.classes = np.asarray(classes)
        self.max_fraction = max_fraction
        self.half = footprint_m / 2.0
        self.geographic = self.src.crs.is_geographic
        self.to_raster = Transformer.from_crs("EPSG:4326", self.src.crs, always_xy=True)

    def excluded_fraction(self, lon: float, lat: float) -> float:
        x, y = self.to_raster.transform(lon, lat)
        if self.geographic:  # metres -> degrees at this latitude
            hy = self.half / (EARTH_RADIUS_M * math.pi / 180.0)
            hx = hy / max(math.cos(math.radians(lat)), 1e-6)
        else:
            hx = hy = self.half
        window = from_bounds(x - hx, y - hy, x + hx, y + hy, self.src.transform).round_offsets().round_lengths()
        nodata = self.src.nodata
        fill = nodata if nodata is not None else (self.classes.max() + 1 if len(self.classes) else 0)
        block = self.src.read(1, window=window, boundless=True, fill_value=fill)
        hits = np.isin(block, self.classes)
        return float(hits.sum()) / max(block.size, 1)

    def __call__(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        fractions = [self.excluded_fraction(a, b) for a, b in zip(lon, lat, strict=True)]
        return np.array(fractions, dtype=float).reshape(-1) <= self.max_fraction


Filter = Callable[[np.ndarray, np.ndarray], np.ndarray]


def iter_region(path: str | Path, n: int, seed: int, filters: Sequence[Filter] = ()) -> Iterator[pd.DataFrame]:
    """Chunks of the ``n`` points as DataFrames (``id`` str ``p0000000123``, ``lon``, ``lat`` in degrees)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    polygons = region_polygons(path)
    done = rejected_in_a_row = 0
    for lon, lat in iter_candidates(polygons, seed):
        if done >= n:
            return
        start = 0
        while start < len(lon) and done < n:
            # Filters may read rasters per point: feed them only about as many candidates as are still needed.
            stop = start + (min(len(lon), max(2 * (n - done), 256)) if filters else len(lon))
            x, y = lon[start:stop], lat[start:stop]
            tried, start = len(x), stop
            for f in filters:
                keep = f(x, y)
                x, y = x[keep], y[keep]
            rejected_in_a_row = 0 if len(x) else rejected_in_a_row + tried
            if rejected_in_a_row >= GIVE_UP_AFTER:
                raise ValueError(
                    f"{path}: {rejected_in_a_row} candidates in a row failed the filters after {done} of "
                    f"{n} points; too little of the region passes them (no land? more points than "
                    "climate cells or the spacing allow?)"
                )
            take = min(len(x), n - done)
            ids = [f"p{i:010d}" for i in range(done, done + take)]
            done += take
            if take:
                yield pd.DataFrame({"id": ids, "lon": x[:take], "lat": y[:take]})


def sample_region(path: str | Path, n: int, seed: int, filters: Sequence[Filter] = ()) -> pd.DataFrame:
    """``n`` points uniform by area on the sphere inside the region: DataFrame(id, lon, lat), degrees WGS84."""
    chunks = list(iter_region(path, n, seed, filters))
    if not chunks:
        return pd.DataFrame({"id": pd.Series([], dtype=str), "lon": np.empty(0), "lat": np.empty(0)})
    return pd.concat(chunks, ignore_index=True)


def filters_from_args(args) -> list[Filter]:
    filters: list[Filter] = []
    if args.exclude_raster:
        if not args.exclude_classes:
            raise ValueError("--exclude-raster needs --exclude-classes (e.g. 50 80 90 95 100 for ESA WorldCover)")
        filters.append(LandCoverExclusion(args.exclude_raster, args.exclude_classes, args.max_excluded_fraction))
    if args.one_per_climate_cell:
        filters.append(OnePerCell())
    if args.min_spacing_m and args.min_spacing_m > 0:
        filters.append(MinSpacing(args.min_spacing_m))
    return filters


def _write_points(f: BinaryIO, chunks: Iterator[pd.DataFrame], csv: bool) -> int:
    """Stream ``chunks`` into ``f`` as CSV or Parquet (an empty table when there is none); the number of rows."""
    rows = 0
    writer = None
    for i, chunk in enumerate(chunks):
        if csv:
            f.write(chunk.to_csv(header=i == 0, index=False).encode())
        else:
            table = pyarrow.Table.from_pandas(chunk, preserve_index=False)
            writer = writer or pyarrow.parquet.ParquetWriter(f, table.schema)
            writer.write_table(table)
        rows += len(chunk)
    if writer is not None:
        writer.close()
    elif not csv:
        pyarrow.parquet.write_table(
            pyarrow.table(
                {
                    "id": pyarrow.array([], pyarrow.string()),
                    "lon": pyarrow.array([], pyarrow.float64()),
                    "lat": pyarrow.array([], pyarrow.float64()),
                }
            ),
            f,
        )
    elif rows == 0:
        f.write(pd.DataFrame({"id": [], "lon": [], "lat": []}).to_csv(index=False).encode())
    return rows


def run_cli(args) -> int:
    """``soilnet sample``: writes ``--out`` (.parquet, or .csv by suffix) atomically, streaming chunk by chunk."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        chunks = iter_region(args.region, args.n, args.seed, filters_from_args(args))
        rows = _write_points(f, chunks, out.suffix == ".csv")
    print(f"sampled {rows} points -> {out}", file=sys.stderr)
    return 0

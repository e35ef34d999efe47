"""TerraClimate from a Zarr store (xarray + zarr; a local path or an ``http(s)://`` URL read through fsspec).

The store has one ``(time, lat, lon)`` variable per TerraClimate variable (names mapped by ``names``), monthly
``time`` steps and cell-centre ``lat``/``lon`` on a regular grid. A point takes the cell containing it. Reads go
by the store's own chunks: the first point that needs a spatial chunk loads it for every schema month in one read
per variable, and the later points of that chunk are served from memory (``cache_mb`` of chunks, least recently
used dropped). Masked cells (``_FillValue``) and chunks absent from the store are NaN, never 0; so is a point
outside the grid. A remote store needs consolidated metadata (object stores cannot list keys).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import numpy as np
import xarray as xr

from shards.sources.transport import HostLimit, SharedCache, redact, with_retries
from soilnet.config.base import ConfigError
from soilnet.schema import CLIMATE_BY_NAME, SampleSchema


def _axis(values: np.ndarray, what: str, store: str) -> tuple[float, float]:
    """``(first, step)`` of a regular coordinate axis."""
    if len(values) < 2:
        raise ConfigError(f"{store}: the {what} axis has {len(values)} value(s); a grid needs two or more")
    return float(values[0]), float(values[1] - values[0])


def signed_store(store: str, sign: Callable[[str], str]) -> tuple[str, dict | None]:
    """The store's URL and fsspec options: a signed URL's query (a SAS token) goes into ``params``, which every
    request for a key of the store carries (appended to the root URL it would precede the keys' paths)."""
    if not store.startswith(("http://", "https://")):
        return store, None
    parts = urlsplit(sign(store))
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(query="")), ({"params": params} if params else {})


class ZarrClimate:
    """``point(lon, lat)`` -> ``(T, F)`` float32 in the schema's units, NaN where the store has no value."""

    def __init__(
        self,
        store: str,
        schema: SampleSchema,
        names: dict[str, str],
        units: str,
        *,
        sign: Callable,
        limit: HostLimit,
        retries: int,
        delay_s: float,
        cache_mb: int = 1024,
        io: Executor | None = None,
    ):
        self.store, self.schema, self.limit, self.io = store, schema, limit, io
        self.retries, self.delay_s, self.cache_bytes = retries, delay_s, cache_mb << 20
        self.names = [names.get(v, v) for v in schema.climate_variables]
        self.scales = [CLIMATE_BY_NAME[v].scale if units == "raw" else 1.0 for v in schema.climate_variables]
        url, options = signed_store(store, sign)
        try:
            self.ds = with_retries(
                lambda: xr.open_zarr(url, chunks=None, consolidated=None, storage_options=options), retries, delay_s
            )
        except Exception as err:
            reason = redact(str(err).splitlines()[0] if str(err) else "")[:300]
            message = f"source.stac.climate_store: cannot open {redact(store)}: {type(err).__name__}: {reason}"
            raise ConfigError(message) from None
        missing = [n for n in self.names if n not in self.ds.variables]
        if missing:
            raise ConfigError(
                f"{redact(store)}: no variables {missing} (source.stac.climate_names); it has "
                f"{sorted(self.ds.data_vars)}"
            )
        months = [str(t)[:7] for t in self.ds["time"].values.astype("datetime64[M]")]
        absent = [m for m in schema.months if m not in months]
        if absent:
            raise ConfigError(f"{redact(store)}: no time steps for the months {absent[:3]} ({len(absent)} in all)")
        self.t = np.array([months.index(m) for m in schema.months])
        self.lat0, self.dlat = _axis(self.ds["lat"].values, "lat", store)
        self.lon0, self.dlon = _axis(self.ds["lon"].values, "lon", store)
        self.shape = (len(self.ds["lat"]), len(self.ds["lon"]))
        chunks = self.ds[self.names[0]].encoding.get("chunks") or (len(months), *self.shape)
        self.chunk = (int(chunks[-2]), int(chunks[-1]))
        self.chunks = SharedCache(limit.turn, max_bytes=self.cache_bytes)

    def point(self, lon: float, lat: float) -> np.ndarray:
        """``(T, F)`` float32 at the cell containing the point (:meth:`many`)."""
        return self.many(np.array([lon]), np.array([lat]))[0]

    def many(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """``(N, T, F)`` float32 at the cells containing ``N`` points, NaN outside the grid: each spatial chunk the
        points fall in read once per variable (the variables' reads overlapping), then served from memory."""
        out = np.full((len(lon), *self.schema.climate_shape), np.nan, dtype=np.float32)
        lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
        if self.lon0 + self.dlon * (self.shape[1] - 1) > 180.0:
            lon = lon % 360.0  # a 0..360 grid
        row = np.rint((lat - self.lat0) / self.dlat).astype(np.int64)
        col = np.rint((lon - self.lon0) / self.dlon).astype(np.int64)
        inside = (row >= 0) & (row < self.shape[0]) & (col >= 0) & (col < self.shape[1])
        blocks = np.stack([row // self.chunk[0], col // self.chunk[1]], axis=1)
        for block in {tuple(b) for b in blocks[inside].tolist()}:
            sel = inside & (blocks == block).all(axis=1)
            r, c = row[sel] % self.chunk[0], col[sel] % self.chunk[1]
            chunks = self.chunks.get_all([self._chunk(name, block) for name in self.names], self.io)
            for f, chunk in enumerate(chunks):
                out[sel, :, f] = chunk[:, r, c].T * self.scales[f]
        return out

    def _chunk(self, name: str, block: tuple[int, int]) -> tuple[tuple, Callable[[], np.ndarray]]:
        """The cache key and the loader of ``(T, chunk_lat, chunk_lon)`` float32: one spatial chunk of ``name`` at
        the schema's months."""
        rows = slice(block[0] * self.chunk[0], (block[0] + 1) * self.chunk[0])
        cols = slice(block[1] * self.chunk[1], (block[1] + 1) * self.chunk[1])

        def read() -> np.ndarray:
            with self.limit.slot(self.store):
                return self.ds[name].isel(time=self.t, lat=rows, lon=cols).values.astype(np.float32)

        def load() -> np.ndarray:
            try:
                values = with_retries(read, self.retries, self.delay_s)
            except Exception as err:
                raise OSError(
                    f"{redact(self.store)}: reading {name} failed ({type(err).__name__}: {redact(str(err))[:300]})"
                ) from None
            full = np.full((len(self.t), *self.chunk), np.nan, dtype=np.float32)
            full[:, : values.shape[1], : values.shape[2]] = values
            return full

        return (name, *block), load

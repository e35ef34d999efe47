"""The tile path of ``soilnet predict-map``: every cell's patch cut from one windowed read per tile.

A tile source (the local-raster source and the synthetic world implement it; duck-typed here, since
:mod:`soilnet.evaluate` does not import :mod:`shards`) has two methods:

- ``read_window(crs, transform, width, height) -> (image (C, H, W) float32, valid (H, W) bool)``: the schema's
  channels on a north-up grid in the map's CRS at the schema's pixel size;
- ``climate_many(lon, lat) -> (climate (N, T, F) float32, ok (N,) bool)``: one read per variable.

For a tile (or, when its window would exceed ``max_values``, a strip of its cell rows) the window covers the
cells' centres plus half a patch on every side; each cell's ``patch_size`` x ``patch_size`` patch is a view of it
(``numpy.lib.stride_tricks.sliding_window_view``) picked by fancy indexing, batch by batch, with no Python per
cell. When the map's resolution is not a multiple of the pixel size, a patch is centred within half a pixel
(15 m at 30 m pixels) of its cell's centre. A cell is valid when every pixel of its patch is valid and its climate
is; the image is rounded through float16 with non-finite values zeroed, as the shards store it for training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from numpy.lib.stride_tricks import sliding_window_view

# one batch: (indices into the tile's inside cells, image | None, climate | None, ok (B,) bool)
Batch = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]


def patch_origins(offsets_m: np.ndarray, pixel: float) -> np.ndarray:
    """Pixel offsets of cells ``offsets_m`` metres from the window's first cell (nearest pixel)."""
    return np.rint(offsets_m / pixel).astype(np.int64)


def window_valid_counts(valid: np.ndarray, size: int) -> np.ndarray:
    """Number of invalid pixels in every ``size`` x ``size`` window of ``valid`` (a summed-area table)."""
    bad = np.pad((~valid).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return bad[size:, size:] - bad[:-size, size:] - bad[size:, :-size] + bad[:-size, :-size]


@dataclass
class TileAcquire:
    """Batches of a tile's inputs from a tile source (see the module docstring)."""

    source: Any  # a shards.sources.base.TileSource (evaluate does not import shards)
    patch_size: int
    pixel_size_m: float
    use_image: bool = True
    use_climate: bool = True
    batch_size: int = 256
    max_values: int = 64 * 2**20
    image_dtype: Any = np.float16  # the shards' storage type, which the model was trained on

    def strip_rows(self, n_cols: int, n_channels: int, resolution: float) -> int:
        """Cell rows per window read so that a window holds at most ``max_values`` values, and at most the
        source's ``max_window_pixels`` pixels where it has a limit (Earth Engine's request size; the local rasters'
        fastest window): ``k`` cell rows
        take ``ceil((k - 1) * step) + patch_size + 1`` pixel rows of the window's width."""
        step = resolution / self.pixel_size_m
        width = math.ceil((n_cols - 1) * step) + self.patch_size + 1
        pixel_rows = self.max_values / (width * n_channels)
        pixel_rows = min(pixel_rows, getattr(self.source, "max_window_pixels", math.inf) / width)
        return max(1, int((math.floor(pixel_rows) - self.patch_size - 1) // step) + 1)

    def batches(self, crs, xs: np.ndarray, ys: np.ndarray, inside: np.ndarray, lon, lat) -> Iterator[Batch]:
        """Batches over a tile's inside cells, row-major. ``xs``/``ys``: the cell centres' map coordinates of the
        tile's columns and rows (metres); ``lon``/``lat``: the inside cells' centres."""
        climate: Any = None
        cok = np.ones(len(lon), bool)
        if self.use_climate:
            climate, cok = self.source.climate_many(np.asarray(lon), np.asarray(lat))
        ir, ic = np.nonzero(inside)
        order = np.arange(len(ir))
        if not self.use_image:
            for start in range(0, len(ir), self.batch_size):
                idx = order[start : start + self.batch_size]
                yield idx, None, climate[idx], cok[idx]
            return
        n_ch = len(getattr(self.source.schema, "channels", ())) or 1
        step = self.strip_rows(len(xs), n_ch, abs(float(xs[1] - xs[0])) if len(xs) > 1 else self.pixel_size_m)
        for r0 in range(0, len(ys), step):
            sel = order[(ir >= r0) & (ir < r0 + step)]
            if len(sel):
                yield from self._strip(crs, xs, ys[r0 : r0 + step], ir[sel] - r0, ic[sel], sel, climate, cok)

    def _strip(self, crs, xs, ys, rows, cols, sel, climate, cok) -> Iterator[Batch]:
        p, n = self.pixel_size_m, self.patch_size
        left, top = xs[0] - n * p / 2, ys[0] + n * p / 2
        col_px = patch_origins(xs - xs[0], p)
        row_px = patch_origins(ys[0] - ys, p)
        width, height = int(col_px[-1]) + n, int(row_px[-1]) + n
        image, valid = self.source.read_window(crs, Affine(p, 0.0, left, 0.0, -p, top), width, height)
        bad = window_valid_counts(valid, n)
        views = sliding_window_view(image, (n, n), axis=(1, 2))  # (C, H-n+1, W-n+1, n, n), no copy
        pr, pc = row_px[rows], col_px[cols]
        ok_image = bad[pr, pc] == 0
        for start in range(0, len(sel), self.batch_size):
            b = slice(start, start + self.batch_size)
            patches = np.moveaxis(views[:, pr[b], pc[b]], 0, 1)  # (B, C, n, n): the one copy, per batch
            patches = np.nan_to_num(patches, nan=0.0, posinf=0.0, neginf=0.0).astype(self.image_dtype)
            idx = sel[b]
            ok = ok_image[b] & cok[idx]
            yield idx, patches, None if climate is None else climate[idx], ok

"""Windowed, warped reads of cloud-optimized GeoTIFF assets for the STAC source, shared by a process's threads.

A point's patch is a few dozen pixels of a scene whose file is tiled in blocks of 256 x 256 (or 512): neighbouring
points, read by different threads, need the same blocks. Reading each patch through its own ``WarpedVRT`` on a
per-thread handle decompressed those blocks once per thread (GDAL's block cache belongs to a dataset handle).
Here the blocks themselves are shared:

- a :class:`~shards.sources.transport.SharedCache` holds decoded blocks (native pixels, the file's dtype) for the
  whole process, least recently used dropped past ``cache_bytes``; a block is fetched and decompressed by
  one thread while the others needing it wait for that result, never fetching it again;
- :meth:`AssetReader.read_bands` assembles the blocks under a patch's footprint (widened by the resampling
  kernel) into one array and warps it in memory onto the patch grid: a GDAL MEM dataset over the array and a
  ``WarpedVRT`` with the options that make a pixel's value independent of the window it is read in
  (:data:`EXACT`), so a pixel warped from these blocks is the pixel a ``WarpedVRT`` over the whole file gives,
  bit for bit; where the grid is a mere shift of the file's, numpy does the warp (:func:`warp_shift`).

Fetches go through GDAL's ``/vsicurl/`` on handles kept per thread (a GDAL dataset is not thread-safe), each
holding one slot of the per-host limit; a failed fetch is retried on transient errors and once more on a handle
signed and opened anew (a signed URL expires: the Planetary Computer's tokens last about an hour).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from shards.sources.transport import HostLimit, SharedCache, redact, with_retries

OPEN_FILES = 64  # handles per thread
CACHE_BYTES = 512 << 20  # decoded blocks per process, by default (source.stac.block_cache_mb)
KERNEL_MARGIN = 3  # source pixels beyond the footprint: bilinear needs 1, cubic 2; one more for rounding
# A pixel's value must not depend on the window it is read in: GDAL's approximate transformer with this error bound
# (pixels) transforms every pixel exactly (0 itself leaves rasterio without a transformer), and a kernel of fixed
# size (XSCALE/YSCALE 1: interpolation at the pixel centre) replaces one scaled by the window's overall ratio.
EXACT = {"tolerance": 1e-9, "XSCALE": 1, "YSCALE": 1}

# A grid to warp onto: (crs, transform, width, height); the transform is the affine of its top-left corner.
Grid = tuple[str, Affine, int, int]


@dataclass(frozen=True)
class Layout:
    """What a file's header says: georeferencing, size, block shape ``(rows, cols)``, nodata and dtype of band 1."""

    crs: rasterio.crs.CRS
    transform: Affine
    width: int
    height: int
    block: tuple[int, int]
    nodata: float | None
    dtype: str
    srs: str  # the CRS as GDAL's MEM driver takes it: an EPSG code, else PROJ (a WKT's commas would split options)


def grid_bounds(grid: Grid) -> tuple[float, float, float, float]:
    """``(left, bottom, right, top)`` of a north-up grid, in its CRS."""
    _, transform, width, height = grid
    left, top = transform.c, transform.f
    right, bottom = left + width * transform.a, top + height * transform.e
    return left, min(top, bottom), right, max(top, bottom)


def _origin(layout: Layout, window: tuple[int, int, int, int]) -> Affine:
    """The affine of block ``window``'s top-left corner."""
    b_r0, b_c0, _, _ = window
    rows, cols = layout.block
    return layout.transform @ Affine.translation(b_c0 * cols, b_r0 * rows)


class AssetReader:
    """Band 1 of COG assets, by href, warped onto patch grids from the blocks this process has read.

    ``sign`` turns an href into the URL to open (identity for public files); ``limit`` bounds the requests in
    flight per host; ``retries`` and ``delay_s`` are the transient-error retries (doubling delay)."""

    def __init__(
        self,
        sign: Callable[[str], str],
        limit: HostLimit,
        retries: int,
        delay_s: float,
        io: Executor | None = None,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.sign, self.limit, self.retries, self.delay_s = sign, limit, retries, delay_s
        self.io = io or ThreadPoolExecutor(limit.per_host, thread_name_prefix="cog-io")
        # blocks are warped from numpy arrays opened as MEM:::DATAPOINTER= datasets, which GDAL refuses unless
        # this is set; a name of that form from a catalogue is refused in _open, so no href can point GDAL at memory
        os.environ["GDAL_MEM_ENABLE_OPEN"] = "YES"
        self.blocks = SharedCache(limit.turn, max_bytes=cache_bytes)
        self.layouts = SharedCache(limit.turn)
        self._local = threading.local()

    # -- handles (per thread) --------------------------------------------------------------------------------

    def _files(self) -> OrderedDict:
        return self._local.__dict__.setdefault("files", OrderedDict())

    def _open(self, href: str):
        files = self._files()
        if href in files:
            files.move_to_end(href)
            return files[href]
        if href.upper().startswith("MEM:"):
            raise OSError(f"{redact(href)[:80]}: not a file or URL")
        files[href] = rasterio.open(self.sign(href))
        while len(files) > OPEN_FILES:
            files.popitem(last=False)[1].close()
        return files[href]

    def _drop(self, href: str) -> None:
        src = self._files().pop(href, None)
        if src is not None:
            src.close()

    def _fetch(self, href: str, what: Callable):
        """``what(dataset)`` on this thread's handle of ``href``, under the host limit, retried (module docstring);
        an error names the href, never a token."""

        def once():
            with self.limit.slot(href):
                try:
                    return what(self._open(href))
                except Exception:
                    self._drop(href)  # a failed handle (expired signature, broken connection) is opened anew
                    raise

        opened_before = href in self._files()
        try:
            try:
                return with_retries(once, self.retries, self.delay_s)
            except (rasterio.errors.RasterioError, OSError):
                if not opened_before:
                    raise
                return once()  # a handle opened earlier (its signature may have expired), signed and opened anew
        except (rasterio.errors.RasterioError, OSError) as err:
            raise OSError(f"{redact(href)}: read failed ({redact(str(err))[:400]})") from None

    # -- layout and blocks -----------------------------------------------------------------------------------

    def _layout(self, href: str) -> tuple[str, Callable[[], Layout]]:
        def header(src) -> Layout:
            block = tuple(src.block_shapes[0])
            epsg = src.crs.to_epsg()
            srs = f"EPSG:{epsg}" if epsg else src.crs.to_proj4()
            return Layout(src.crs, src.transform, src.width, src.height, block, src.nodata, src.dtypes[0], srs)

        return href, lambda: self._fetch(href, header)

    def _block(self, href: str, layout: Layout, row: int, col: int) -> tuple[tuple, Callable[[], np.ndarray]]:
        rows, cols = layout.block
        width, height = min(cols, layout.width - col * cols), min(rows, layout.height - row * rows)
        window = Window(col * cols, row * rows, width, height)
        return (href, row, col), lambda: self._fetch(href, lambda src: src.read(1, window=window))

    def _window(self, layout: Layout, grid: Grid) -> tuple[int, int, int, int] | None:
        """``(first block row, first block col, last block row, last block col)``: the blocks under ``grid``'s
        footprint widened by :data:`KERNEL_MARGIN` pixels; None where the footprint misses the file."""
        crs = grid[0]
        bounds = grid_bounds(grid)
        if str(layout.crs) != str(crs):
            bounds = transform_bounds(crs, layout.crs, *bounds, densify_pts=21)
        inverse = ~layout.transform
        xs, ys = zip(*(inverse @ corner for corner in ((bounds[0], bounds[1]), (bounds[2], bounds[3]))), strict=True)
        c0 = max(0, math.floor(min(xs)) - KERNEL_MARGIN)
        c1 = min(layout.width, math.ceil(max(xs)) + KERNEL_MARGIN)
        r0 = max(0, math.floor(min(ys)) - KERNEL_MARGIN)
        r1 = min(layout.height, math.ceil(max(ys)) + KERNEL_MARGIN)
        if c0 >= c1 or r0 >= r1:
            return None
        rows, cols = layout.block
        return r0 // rows, c0 // cols, (r1 - 1) // rows, (c1 - 1) // cols

    def _assemble(self, hrefs: Sequence[str], layout: Layout, window: tuple[int, int, int, int]) -> np.ndarray:
        """``(len(hrefs), h, w)``: the blocks of ``window`` of each file as one array (edge blocks are smaller); the
        blocks not read yet are fetched at the same time."""
        b_r0, b_c0, b_r1, b_c1 = window
        rows, cols = layout.block
        h = min(layout.height, (b_r1 + 1) * rows) - b_r0 * rows
        w = min(layout.width, (b_c1 + 1) * cols) - b_c0 * cols
        where = [(k, i, j) for k in range(len(hrefs)) for i in range(b_r0, b_r1 + 1) for j in range(b_c0, b_c1 + 1)]
        blocks = self.blocks.get_all([self._block(hrefs[k], layout, i, j) for k, i, j in where], self.io)
        pixels = np.empty((len(hrefs), h, w), dtype=layout.dtype)
        for (k, i, j), block in zip(where, blocks, strict=True):
            y, x = (i - b_r0) * rows, (j - b_c0) * cols
            pixels[k, y : y + block.shape[0], x : x + block.shape[1]] = block
        return pixels

    # -- reads -----------------------------------------------------------------------------------------------

    def read(self, href: str, grid: Grid, resampling: Resampling, nodata: float) -> np.ndarray:
        """``(height, width)`` float32: band 1 of ``href`` warped onto ``grid`` (:meth:`read_bands`)."""
        return self.read_bands([href], grid, resampling, nodata)[0]

    def read_bands(self, hrefs: Sequence[str], grid: Grid, resampling: Resampling, nodata: float) -> np.ndarray:
        """``(len(hrefs), height, width)`` float32: band 1 of each file warped onto ``grid``; ``nodata`` outside a
        file and on its own nodata (an interpolated DN is not rounded to an integer). Files of one layout (the
        bands of a scene) are warped together, in one pass."""
        layouts = self.layouts.get_all([self._layout(h) for h in hrefs], self.io)
        if any(layout != layouts[0] for layout in layouts[1:]):
            return np.concatenate([self.read_bands([h], grid, resampling, nodata) for h in hrefs])
        crs, transform, width, height = grid
        layout = layouts[0]
        window = self._window(layout, grid)
        if window is None:
            return np.full((len(hrefs), height, width), nodata, dtype=np.float32)
        pixels = self._assemble(hrefs, layout, window)
        shifted = warp_shift(pixels, layout, window, grid, resampling)
        if shifted is not None:
            return shifted
        with (
            _in_memory(pixels, layout, window) as src,
            WarpedVRT(
                src,
                crs=crs,
                transform=transform,
                width=width,
                height=height,
                resampling=resampling,
                src_nodata=layout.nodata,
                nodata=nodata,
                dtype="float32",
                **EXACT,
            ) as vrt,
        ):
            return vrt.read()


def warp_shift(
    pixels: np.ndarray, layout: Layout, window: tuple[int, int, int, int], grid: Grid, resampling: Resampling
) -> np.ndarray | None:
    """The warp without GDAL where it is a shift: ``grid`` in the file's CRS at its pixel size, north up, every
    source pixel it needs inside ``pixels`` and none of them nodata. Nearest takes the pixel under each centre;
    bilinear weighs the 4 around it as GDAL's kernel does (the same samples and weights, summed in float64: equal
    to GDAL's result to float32 rounding). None where it is not such a shift: GDAL then warps (NaN, a scene's
    edge, another CRS or pixel size, cubic)."""
    crs, transform, width, height = grid
    origin = _origin(layout, window)
    same_grid = transform.a == origin.a and transform.e == origin.e and transform.b == transform.d == 0
    if not same_grid or origin.b != 0 or origin.d != 0 or str(layout.crs) != str(crs):
        return None
    x0, y0 = (transform.c - origin.c) / origin.a, (transform.f - origin.f) / origin.e  # source pixels
    if resampling == Resampling.nearest:
        ix = np.floor(x0 + 0.5 + np.arange(width)).astype(np.int64)
        iy = np.floor(y0 + 0.5 + np.arange(height)).astype(np.int64)
        span = (iy[0], iy[-1] + 1, ix[0], ix[-1] + 1)
    elif resampling == Resampling.bilinear:
        fx, fy = x0 - math.floor(x0), y0 - math.floor(y0)
        ix, iy = math.floor(x0) + np.arange(width), math.floor(y0) + np.arange(height)
        span = (iy[0], iy[-1] + 2, ix[0], ix[-1] + 2)
    else:
        return None
    if span[0] < 0 or span[2] < 0 or span[1] > pixels.shape[1] or span[3] > pixels.shape[2]:
        return None
    used = pixels[:, span[0] : span[1], span[2] : span[3]]
    if (layout.nodata is not None and (used == layout.nodata).any()) or (
        used.dtype.kind == "f" and np.isnan(used).any()
    ):
        return None
    if resampling == Resampling.nearest:
        return used[:, iy[:, None] - span[0], ix[None, :] - span[2]].astype(np.float32)
    v = used.astype(np.float64)
    top = v[:, :-1, :-1] * (1 - fx) + v[:, :-1, 1:] * fx
    bottom = v[:, 1:, :-1] * (1 - fx) + v[:, 1:, 1:] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _in_memory(pixels: np.ndarray, layout: Layout, window: tuple[int, int, int, int]):
    """``(B, h, w)`` C-contiguous ``pixels`` as a read-only GDAL MEM dataset on the file's grid at block ``window``
    (no copy: GDAL reads the array where it is, so the caller keeps it alive while the dataset is open)."""
    geo = _origin(layout, window)
    bands, h, w = pixels.shape
    options = (
        f"DATAPOINTER={pixels.ctypes.data},PIXELS={w},LINES={h},BANDS={bands},DATATYPE={_gdal_type(pixels.dtype)},"
        f"GEOTRANSFORM={'/'.join(repr(v) for v in geo.to_gdal())},SPATIALREFERENCE={layout.srs}"
    )
    return rasterio.open(f"MEM:::{options}")


def _gdal_type(dtype: np.dtype) -> str:
    return rasterio.dtypes.typename_fwd[rasterio.dtypes.dtype_rev[np.dtype(dtype).name]]

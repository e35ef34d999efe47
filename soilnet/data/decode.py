"""Shard samples -> one batch of raw rows -> one normalised batch tensor.

Per sample: one ``preadv`` of its adjacent ``.npy`` members, the array bytes landing directly in a row of the
raw (b, C, H, W) image array (float16 or int16, as the manifest's ``image_encoding``) and of the raw (b, T, F)
climate array, the headers checked against :class:`NpyLayout`. Per batch: one channel subset, one float32
conversion and one ``x * scale + bias`` (decoding and normalising folded) for the images. Pretraining reads
nothing else, so ``meta.json`` is not read.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from soilnet.data.npy import NpyLayout
from soilnet.data.shards import ShardSet
from soilnet.data.tarindex import ShardIndexError, ShardReader, index_shard

IMAGE, CLIMATE = "image.npy", "climate.npy"
GAP = 1 << 12  # members further apart than this (other members between them) are read by separate preadv calls
PLAN_SAMPLES = 1 << 22  # read plans kept per reader: about 20 bytes a sample, so every shard of a large set fits


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the message names the sample and its shard."""


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as ``default_collate`` does), so that
    handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


@dataclass(frozen=True)
class ShardPlan:
    """Where each sample of one shard keeps the layouts' members: ``start`` (n, m) int64 byte offset of each
    member (its ``.npy`` header first), ``header`` (n, m) int16 header bytes, in layout order; ``bad`` the samples
    that cannot be read this way, with the reason."""

    url: str
    start: np.ndarray
    header: np.ndarray
    bad: dict[int, str]

    @property
    def samples(self) -> int:
        return len(self.start)


def plan_shard(url: str, layouts: list[NpyLayout]) -> ShardPlan:
    """The read plan of shard ``url`` for ``layouts``; raises :class:`ShardIndexError` for an unreadable shard."""
    index = index_shard(url)
    n, m = len(index), len(layouts)
    start = np.zeros((n, m), dtype=np.int64)
    header = np.zeros((n, m), dtype=np.int16)
    bad: dict[int, str] = {}
    for i, (key, members) in enumerate(index):
        where = f"sample '{key}' in shard {url}"
        for j, lay in enumerate(layouts):
            if lay.suffix not in members:
                bad[i] = f"{where}: member '{lay.suffix}' is missing"
                break
            offset, size = members[lay.suffix]
            h = lay.header_size(size)
            if h is None:
                bad[i] = f"{where}: member {lay.suffix} of {size} bytes is no {lay.dtype} {lay.shape} array"
                break
            start[i, j], header[i, j] = offset, h
    return ShardPlan(url, start, header, bad)


class RawRows:
    """Raw (n, ...) arrays of a batch's ``.npy`` members as stored, by suffix, with a writable view of each row."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.views = [[memoryview(r) for r in a.reshape(len(a), -1).view(np.uint8)] for a in arrays.values()]
        self.gap = memoryview(bytearray(GAP))  # scratch for the tar headers between members

    def __getitem__(self, suffix: str) -> np.ndarray:
        return self.arrays[suffix]


def _key(url: str, position: int) -> str:
    try:
        return index_shard(url)[position][0]
    except (ShardIndexError, IndexError):
        return f"#{position}"


def affine(raw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """raw: (b, C, H, W) float16/int16 -> (b, C, H, W) float32 ``raw * scale + bias``, non-finite -> 0.
    scale, bias: (C, 1, 1) float32."""
    y = raw.float() * scale + bias
    return torch.where(torch.isfinite(y), y, 0.0)  # inductor vectorises this, not nan_to_num


_compiled: dict[str, object] = {}


def fused_affine():
    """:func:`affine` compiled by inductor into one vectorised CPU loop (read float16, write float32), a third of
    the eager ops' time; compiled once per process (about 25 s on 2 cold cores, cached on disk after)."""
    if "affine" not in _compiled:
        _compiled["affine"] = torch.compile(affine, dynamic=True)
    return _compiled["affine"]


class BatchDecoder:
    """Decodes the samples of a batch into reused raw rows, then converts and normalises the whole batch.

    ``fused``: normalise with :func:`fused_affine` instead of three eager torch ops."""

    def __init__(self, shards: ShardSet, fused: bool = False):
        self.shards, self.fused = shards, fused
        enc = shards.image_encoding
        self.layouts = [
            NpyLayout(IMAGE, np.dtype(enc.get("dtype", "float16")), shards.available.image_shape),
            NpyLayout(CLIMATE, np.dtype(np.float32), shards.available.climate_shape),
        ]
        # decoded = raw * enc_scale + enc_offset; normalised = (decoded - mean) / std = raw * scale + bias
        enc_scale, enc_offset = float(enc.get("scale", 1.0)), float(enc.get("offset", 0.0))
        std, mean = shards.image_std.astype(np.float64), shards.image_mean.astype(np.float64)
        self.scale = torch.from_numpy((enc_scale / std).astype(np.float32)).view(-1, 1, 1)
        self.bias = torch.from_numpy(((enc_offset - mean) / std).astype(np.float32)).view(-1, 1, 1)
        n_ch, n_mo, n_var = shards.available.image_shape[0], *shards.available.climate_shape
        ch = list(shards.channel_index)
        self.channels = None if ch == list(range(n_ch)) else torch.tensor(ch, dtype=torch.int64)
        mo, var = list(shards.month_index), list(shards.variable_index)
        self.climate_cells = None if (mo, var) == (list(range(n_mo)), list(range(n_var))) else np.ix_(mo, var)
        self._plans: OrderedDict[str, ShardPlan] = OrderedDict()
        self._planned = 0

    def new_rows(self, n: int) -> RawRows:
        """Raw rows for a batch of ``n`` samples, to be filled by :meth:`read` and reused from batch to batch."""
        return RawRows({lay.suffix: np.empty((n, *lay.shape), dtype=lay.dtype) for lay in self.layouts})

    def plan(self, url: str) -> ShardPlan:
        p = self._plans.get(url)
        if p is not None:
            self._plans.move_to_end(url)
            return p
        try:
            p = plan_shard(url, self.layouts)
        except ShardIndexError as err:
            raise CorruptSample(str(err)) from err
        self._plans[url] = p
        self._planned += p.samples
        while self._planned > PLAN_SAMPLES and len(self._plans) > 1:
            self._planned -= self._plans.popitem(last=False)[1].samples
        return p

    def read(self, reader: ShardReader, url: str, position: int, rows: RawRows, row: int) -> None:
        """Sample ``position`` of shard ``url`` into row ``row`` of ``rows``; raises :class:`CorruptSample` naming
        the sample and shard (missing, truncated or malformed members, an unreadable shard)."""
        p = self.plan(url)
        if position >= p.samples:
            raise CorruptSample(f"shard {url}: holds {p.samples} samples, the manifest promises more (#{position})")
        if position in p.bad:
            raise CorruptSample(p.bad[position])
        try:
            fd = reader.fileno(url)
        except ShardIndexError as err:
            raise CorruptSample(str(err)) from err
        starts, heads = p.start[position].tolist(), p.header[position].tolist()
        headers = [bytearray(h) for h in heads]
        # the members are adjacent in the tar: one preadv per run of them, the tar headers between into scratch
        order = sorted(range(len(starts)), key=starts.__getitem__)
        first = cursor = starts[order[0]]
        bufs: list = []
        for j in order:
            if starts[j] - cursor > GAP:
                self._preadv(fd, bufs, first, cursor, url, position)
                first = cursor = starts[j]
                bufs = []
            if starts[j] > cursor:
                bufs.append(rows.gap[: starts[j] - cursor])
            view = rows.views[j][row]
            bufs += [headers[j], view]
            cursor = starts[j] + heads[j] + len(view)
        self._preadv(fd, bufs, first, cursor, url, position)
        for lay, header in zip(self.layouts, headers, strict=True):
            bad = lay.check_header(header)
            if bad is not None:
                raise CorruptSample(f"sample '{_key(url, position)}' in shard {url}: member {lay.suffix}: {bad}")

    @staticmethod
    def _preadv(fd: int, bufs: list, start: int, end: int, url: str, position: int) -> None:
        try:
            got = os.preadv(fd, bufs, start)
        except OSError as err:
            raise CorruptSample(f"sample '{_key(url, position)}' in shard {url}: {err}") from err
        if got != end - start:
            raise CorruptSample(
                f"sample '{_key(url, position)}' in shard {url}: truncated (read {got} of {end - start} bytes)"
            )

    def image(self, raw: np.ndarray, selected: bool = False) -> torch.Tensor:
        """raw: (b, C_shards, H, W) as stored (or (b, C, H, W) when ``selected``: the run's channels already)
        -> (b, C, H, W) float32 normalised (non-finite -> 0, the mean)."""
        x = torch.from_numpy(raw)
        if self.channels is not None and not selected:
            x = x.index_select(1, self.channels)
        if self.fused:
            return fused_affine()(x, self.scale, self.bias)
        out = empty(tuple(x.shape), torch.float32)
        out.copy_(x)
        out.mul_(self.scale).add_(self.bias)
        # the manifest's statistics may prove every value finite; else one reduction instead of a pass writing all
        if not self.shards.image_finite and not bool(torch.isfinite(out.sum())):
            torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)
        return out

    def climate(self, raw: np.ndarray) -> np.ndarray:
        """raw: (b, T_shards, F_shards) float32 -> (b, T, F) float32 in physical units, the run's subset (a view of
        ``raw`` when the run reads every month and variable)."""
        if self.climate_cells is None:
            return raw
        return raw[:, self.climate_cells[0], self.climate_cells[1]]

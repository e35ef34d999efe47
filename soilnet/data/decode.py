"""Shard samples -> raw rows -> normalised rows of a batch tensor.

Per sample: one ``preadv`` of its adjacent ``.npy`` members, the array bytes landing directly in a row of the
raw (k, C, H, W) image array (float16 or int16, as the manifest's ``image_encoding``) and of the raw (k, T, F)
climate array, the headers checked after the whole chunk against :class:`NpyLayout`. Per chunk of rows: one
channel subset, one float32 conversion and one ``x * scale + bias`` (decoding and normalising folded) into the
batch tensor, which comes from a :class:`TensorPool`. Pretraining reads nothing else, so ``meta.json`` is not
read.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from soilnet.data import native
from soilnet.data.npy import NpyLayout
from soilnet.data.pool import TensorPool
from soilnet.data.shards import ShardSet
from soilnet.data.tarindex import ShardIndexError, ShardReader, index_shard

IMAGE, CLIMATE = "image.npy", "climate.npy"
GAP = 1 << 12  # members further apart than this (other members between them) are read by separate preadv calls
PLAN_SAMPLES = 1 << 22  # read plans kept per reader: 10 bytes a sample, so every shard of a large set fits


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the message names the sample and its shard."""


def empty(shape: tuple[int, ...], dtype: torch.dtype, pool: TensorPool) -> torch.Tensor:
    """An uninitialised tensor: from ``pool`` in the process that trains; in a DataLoader worker, in shared memory
    (as ``default_collate`` does), so that handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return pool.tensor(shape, dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


@dataclass(frozen=True)
class ShardPlan:
    """Where each sample of one shard keeps the layouts' members. ``base`` (n,) int64: the byte offset of the
    sample's first member (its ``.npy`` header first); ``kind`` (n,) int16: the sample's entry in ``structures``,
    each a :data:`Structure`: the members' offsets from ``base`` and their header sizes, in layout order (a shard
    written by one packer has a single one). ``bad``: the samples that cannot be read this way, with the reason."""

    url: str
    base: np.ndarray
    kind: np.ndarray
    structures: list[Structure]
    bad: dict[int, str]

    @property
    def samples(self) -> int:
        return len(self.base)


Structure = tuple[tuple[int, ...], tuple[int, ...]]  # (member offsets from the first, .npy header sizes)


def plan_shard(url: str, layouts: list[NpyLayout]) -> ShardPlan:
    """The read plan of shard ``url`` for ``layouts``; raises :class:`ShardIndexError` for an unreadable shard."""
    index = index_shard(url)
    n, m = len(index), len(layouts)
    start = np.zeros((n, m), dtype=np.int64)
    header = np.zeros((n, m), dtype=np.int64)
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
    base = start.min(axis=1)
    distinct, kind = np.unique(np.concatenate([start - base[:, None], header], axis=1), axis=0, return_inverse=True)
    structures = [(tuple(row[:m].tolist()), tuple(row[m:].tolist())) for row in distinct]
    return ShardPlan(url, base, kind.reshape(-1).astype(np.int16), structures, bad)


Run = tuple[int, list, int]  # one preadv: (offset from the sample's base, buffers, bytes)


class RawRows:
    """Raw (n, ...) arrays of a chunk's ``.npy`` members as stored, by suffix, and for each :data:`Structure`
    met, the ``preadv`` buffers of every row: the ``.npy`` headers into (n, header size) uint8 arrays checked
    after the reads, the arrays' bytes straight into their rows, the tar headers between members into scratch."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        self.views = [[memoryview(r) for r in a.reshape(self.n, -1).view(np.uint8)] for a in arrays.values()]
        self.gap = memoryview(bytearray(GAP))
        self.headers: dict[Structure, list[np.ndarray]] = {}
        self._runs: dict[Structure, list[list[Run]]] = {}
        self._tables: dict[Structure, tuple[np.ndarray, np.ndarray]] = {}
        self._owner = self

    def __getitem__(self, suffix: str) -> np.ndarray:
        return self.arrays[suffix]

    def __len__(self) -> int:
        return self.n

    def head(self, k: int) -> RawRows:
        """The first ``k`` rows, sharing this one's memory, buffers and tables."""
        if k == self.n:
            return self
        rows = RawRows.__new__(RawRows)
        rows.__dict__.update(self.__dict__)
        rows.arrays, rows.n = {name: a[:k] for name, a in self.arrays.items()}, k
        return rows

    def runs(self, structure: Structure) -> list[list[Run]]:
        """For each row, the ``preadv`` calls that read a sample of ``structure`` into it (one when its members
        are adjacent, as in every shard ``ShardWriter`` writes)."""
        owner = self._owner
        runs = owner._runs.get(structure)
        if runs is None:
            offsets, sizes = structure
            heads = owner.headers[structure] = [np.empty((owner.n, h), dtype=np.uint8) for h in sizes]
            runs = owner._runs[structure] = [owner._row_runs(offsets, sizes, heads, r) for r in range(owner.n)]
        return runs

    def table(self, structure: Structure) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`runs` for :mod:`soilnet.data.native`: (n, m, 2) int64 address and length of each row's
        ``m`` buffers, and (r, 4) int64 runs (offset from the sample's base, first buffer, buffer count, bytes)."""
        owner = self._owner
        tables = owner._tables.get(structure)
        if tables is None:
            runs = owner.runs(structure)
            buffers = [[b for _, bufs, _ in row for b in bufs] for row in runs]
            iov = np.array([[(np.frombuffer(b, np.uint8).ctypes.data, len(b)) for b in row] for row in buffers])
            spec, first = [], 0
            for offset, bufs, size in runs[0]:
                spec.append((offset, first, len(bufs), size))
                first += len(bufs)
            tables = owner._tables[structure] = (iov.astype(np.int64), np.array(spec, dtype=np.int64))
        return tables

    def _row_runs(self, offsets, sizes, heads, row) -> list[Run]:
        runs: list[Run] = []
        cursor = None
        for j in sorted(range(len(offsets)), key=offsets.__getitem__):
            if cursor is None or offsets[j] - cursor > GAP:
                runs.append((offsets[j], [], 0))
                cursor = offsets[j]
            first, bufs, _ = runs[-1]
            if offsets[j] > cursor:
                bufs.append(self.gap[: offsets[j] - cursor])
            bufs += [memoryview(heads[j][row]), self.views[j][row]]
            cursor = offsets[j] + sizes[j] + len(self.views[j][row])
            runs[-1] = (first, bufs, cursor - first)
        return runs


def _key(url: str, position: int) -> str:
    try:
        return index_shard(url)[position][0]
    except (ShardIndexError, IndexError):
        return f"#{position}"


class BatchDecoder:
    """Decodes the samples of a batch into reused raw rows, then converts and normalises them into a batch
    tensor. One decoder serves every builder thread of a process: its read plans are shared (under a lock),
    the rows and open files are each thread's own."""

    def __init__(self, shards: ShardSet):
        self.shards = shards
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
        self.channels = None if ch == list(range(n_ch)) else np.array(ch)
        mo, var = list(shards.month_index), list(shards.variable_index)
        self.climate_cells = None if (mo, var) == (list(range(n_mo)), list(range(n_var))) else np.ix_(mo, var)
        self._plans: dict[str, ShardPlan] = {}
        self._planned = 0
        self.pool = TensorPool()
        self._lock = threading.Lock()
        self._affine = self._affine_selected = None
        if native.available() and self.layouts[0].dtype in (np.float16, np.int16):
            scale, bias, dtype = self.scale.numpy().ravel(), self.bias.numpy().ravel(), self.layouts[0].dtype
            self._affine = native.Affine(np.asarray(ch), scale, bias, dtype)
            self._affine_selected = native.Affine(np.arange(len(ch)), scale, bias, dtype)

    def new_rows(self, n: int) -> RawRows:
        """Raw rows for a batch of ``n`` samples, to be filled by :meth:`read` and reused from batch to batch."""
        return RawRows({lay.suffix: np.empty((n, *lay.shape), dtype=lay.dtype) for lay in self.layouts})

    def plan(self, url: str) -> ShardPlan:
        """The read plan of shard ``url``, from the cache (the oldest planned shards leave it first)."""
        p = self._plans.get(url)  # a dict read needs no lock; inserts and evictions take it
        if p is not None:
            return p
        try:  # outside the lock: another thread may plan the same shard meanwhile, which costs only time
            p = plan_shard(url, self.layouts)
        except ShardIndexError as err:
            raise CorruptSample(str(err)) from err
        with self._lock:
            if url not in self._plans:
                self._planned += p.samples
                self._plans[url] = p
            while self._planned > PLAN_SAMPLES and len(self._plans) > 1:
                self._planned -= self._plans.pop(next(iter(self._plans))).samples
        return p

    def read(
        self, reader: ShardReader, samples: list[tuple[str, int]], rows: RawRows, into: torch.Tensor | None = None
    ) -> dict[int, str]:
        """Sample ``samples[i]`` (shard url, position in it) into row ``i`` of ``rows``, one ``preadv`` each,
        and with ``into`` (k, C, H, W) float32, its image normalised into ``into[i]`` (see :meth:`image_into`).

        Returns {row: message} for the corrupt ones (missing, truncated or malformed members, an unreadable
        shard), each message naming the sample and its shard; their rows hold anything."""
        corrupt: dict[int, str] = {}
        todo: list[tuple[int, int, int, Structure]] = []  # row, fd, base offset, structure
        for row, (url, position) in enumerate(samples):
            try:
                p = self.plan(url)
                if position >= p.samples:
                    raise CorruptSample(f"shard {url}: holds {p.samples} samples, the manifest promises more "
                                        f"(#{position})")  # fmt: skip
                if position in p.bad:
                    raise CorruptSample(p.bad[position])
                todo.append((row, reader.fileno(url), int(p.base[position]), p.structures[p.kind[position]]))
            except (CorruptSample, ShardIndexError) as err:
                corrupt[row] = str(err)
        native_into = into if self._affine is not None else None
        got = self._read_native(todo, rows, native_into) if native.available() else self._read_python(todo, rows)
        met: dict[Structure, list[int]] = {}
        for (row, _, _, structure), (g, size) in zip(todo, got, strict=True):
            url, position = samples[row]
            if g < 0:
                corrupt[row] = f"sample '{_key(url, position)}' in shard {url}: {os.strerror(-g)}"
            elif g != size:
                corrupt[row] = f"sample '{_key(url, position)}' in shard {url}: truncated (read {g} of {size} bytes)"
            else:
                met.setdefault(structure, []).append(row)
        for structure, read in met.items():  # the .npy headers of the whole chunk, one comparison per layout
            for lay, heads in zip(self.layouts, rows.headers[structure], strict=True):
                for k, bad in lay.check_headers(heads[read]):
                    url, position = samples[read[k]]
                    corrupt[read[k]] = f"sample '{_key(url, position)}' in shard {url}: member {lay.suffix}: {bad}"
        if into is not None and native_into is None:
            self.image_into(rows[IMAGE], into)
        return corrupt

    @staticmethod
    def _read_python(todo, rows: RawRows) -> list[tuple[int, int]]:
        """(bytes read or -errno, bytes wanted) of each sample of ``todo``; the first short run ends a sample."""
        out = []
        for row, fd, base, structure in todo:
            got = want = 0
            for offset, bufs, size in rows.runs(structure)[row]:
                try:
                    g = os.preadv(fd, bufs, base + offset)
                except OSError as err:
                    g = -(err.errno or 5)
                want += size
                if g != size:
                    got = g if g < 0 else got + g
                    break
                got += g
            out.append((got, want))
        return out

    def _read_native(self, todo, rows: RawRows, into: torch.Tensor | None) -> list[tuple[int, int]]:
        """:meth:`_read_python` in one call of ``_native.c`` without the GIL, converting each image into ``into``
        right after its reads."""
        if not todo:
            return []
        by_structure: dict[Structure, list[int]] = {}
        for k, (_, _, _, structure) in enumerate(todo):
            by_structure.setdefault(structure, []).append(k)
        todo_a = np.array([t[:3] for t in todo], dtype=np.int64)  # row, fd, base
        runs, iov, sizes, order, n_iov = [], [], [], [], 0
        for structure, ks in by_structure.items():
            table, spec = rows.table(structure)  # (n, m, 2), (r, 4)
            row, fd, base = todo_a[ks].T
            r, m = len(spec), table.shape[1]
            block = np.empty((len(ks), r, 5), dtype=np.int64)  # fd, offset, first buffer, count, row
            block[:, :, 0], block[:, :, 4] = fd[:, None], row[:, None]
            block[:, :, 1] = base[:, None] + spec[:, 0]
            block[:, :, 2] = n_iov + np.arange(len(ks))[:, None] * m + spec[:, 1]
            block[:, :, 3] = spec[:, 2]
            runs.append(block.reshape(-1, 5))
            iov.append(table[row].reshape(-1, 2))
            sizes.append(np.broadcast_to(spec[:, 3], (len(ks), r)))
            order += ks
            n_iov += len(ks) * m
        got = np.empty(sum(len(x) for x in runs), dtype=np.int64)
        convert = None if into is None else self._affine.args(rows[IMAGE], into)
        native.read_runs(np.concatenate(runs), np.concatenate(iov), got, convert, into)
        out: list[tuple[int, int]] = [(0, 0)] * len(todo)
        start = 0
        for ks, size in zip(by_structure.values(), sizes, strict=True):
            g = got[start : start + size.size].reshape(size.shape)
            start += size.size
            error = np.minimum(g, 0).min(axis=1)  # -errno of a sample's failed run, else 0
            read = np.where(error < 0, error, np.maximum(g, 0).sum(axis=1))
            for k, r_, w in zip(ks, read.tolist(), size.sum(axis=1).tolist(), strict=True):
                out[k] = (r_, w)
        return out

    def new_image(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised (b, C, H, W) float32 batch tensor for :meth:`image_into`."""
        return empty(shape, torch.float32, self.pool)

    def select_channels(self, raw: np.ndarray) -> np.ndarray:
        """raw: (..., C_shards, H, W) as stored -> (..., C, H, W), the run's channels."""
        return raw if self.channels is None else raw[..., self.channels, :, :]

    def image_into(self, raw: np.ndarray, out: torch.Tensor, selected: bool = False) -> None:
        """raw: (b, C_shards, H, W) as stored (or (b, C, H, W) when ``selected``: the run's channels already)
        -> ``out`` (b, C, H, W) float32 normalised (non-finite -> 0, the mean)."""
        affine = self._affine_selected if selected else self._affine
        if affine is not None:
            affine(np.ascontiguousarray(raw), out)
            return
        out.copy_(torch.from_numpy(raw if selected else self.select_channels(raw)))
        out.mul_(self.scale).add_(self.bias)
        # the manifest's statistics may prove every value finite; else one reduction instead of a pass writing all
        if not self.shards.image_finite and not bool(torch.isfinite(out.sum())):
            torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)

    def climate(self, raw: np.ndarray) -> np.ndarray:
        """raw: (b, T_shards, F_shards) float32 -> (b, T, F) float32 in physical units, the run's subset (a view of
        ``raw`` when the run reads every month and variable)."""
        if self.climate_cells is None:
            return raw
        return raw[:, self.climate_cells[0], self.climate_cells[1]]

"""Shard samples -> raw rows -> normalised rows of a batch tensor.

Per sample: one ``preadv`` of its adjacent ``.npy`` members, the array bytes landing directly in a row of the
raw (k, C, H, W) image array (float16 or int16, as the manifest's ``image_encoding``) and of the raw (k, T, F)
climate array; the headers are checked after the whole chunk against :class:`NpyLayout`. Then each image is
decoded and normalised in one pass (``raw * scale + bias``: the encoding and the manifest's statistics folded)
into a row of the batch tensor, float32 or bfloat16, which comes from a :class:`TensorPool`. With the C
extension (:mod:`soilnet.data.native`) a chunk's reads and conversions are one call without the GIL, each image
converted right after its read; without it, ``os.preadv`` and torch do the same. Pretraining reads nothing else,
so ``meta.json`` is not read.

Labelled reading (:mod:`soilnet.data.labelled`) takes every sample whole instead (:func:`read_samples`) and
decodes its image with the same encoding (:func:`decode_image`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from soilnet.data import native
from soilnet.data.index import UNINDEXED, OpenShards, SampleIndex, Structure, sample_key
from soilnet.data.npy import NpyLayout
from soilnet.data.pool import TensorPool
from soilnet.data.shards import ShardSet

IMAGE, CLIMATE = "image.npy", "climate.npy"
GAP = 1 << 12  # members further apart than this (other members between them) are read by separate preadv calls


def empty(shape: tuple[int, ...], dtype: torch.dtype, pool: TensorPool) -> torch.Tensor:
    """An uninitialised tensor: from ``pool`` in the process that trains; in a DataLoader worker, in shared memory
    (as ``default_collate`` does), so that handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return pool.tensor(shape, dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # contiguous
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


Run = tuple[int, list, int]  # one preadv: (offset from the sample's base, buffers, bytes)


class RawRows:
    """Raw (n, ...) arrays of a chunk's ``.npy`` members as stored, by suffix, and for each :data:`Structure`
    met, the ``preadv`` buffers of every row: the ``.npy`` headers into (n, header size) uint8 arrays checked
    after the reads, the arrays' bytes straight into their rows, the tar headers between members into scratch."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        self.views = [[r.data for r in a.reshape(self.n, -1).view(np.uint8)] for a in arrays.values()]
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


def encoding_affine(encoding: dict) -> tuple[float, float]:
    """The manifest's ``image_encoding`` as ``(scale, offset)``: decoded = stored * scale + offset."""
    return float(encoding.get("scale", 1.0)), float(encoding.get("offset", 0.0))


def decode_image(raw: np.ndarray, encoding: dict) -> np.ndarray:
    """One stored image (C, H, W) in schema units: int16 -> float32 through :func:`encoding_affine`; float16 as
    stored."""
    if encoding.get("dtype") == "int16":
        scale, offset = encoding_affine(encoding)
        return raw.astype(np.float32) * scale + offset
    return raw


def read_samples(urls: list[str]) -> Iterator[dict]:
    """Every sample of the shards ``urls`` in order, whole, through WebDataset: ``__key__``, ``__url__`` and each
    member decoded by its extension (``.npy`` arrays, ``.json`` objects). Every process reads every shard
    (labelled sets are small; data-parallel fine-tuning keeps all of one on each rank)."""
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None).decode()


class BatchDecoder:
    """Decodes the samples of a batch into reused raw rows, then converts and normalises them into a batch
    tensor. One decoder serves every builder thread of a process: its :class:`SampleIndex` is shared,
    the rows and open files are each thread's own."""

    def __init__(self, shards: ShardSet):
        self.shards = shards
        enc = shards.image_encoding
        self.layouts = [
            NpyLayout(IMAGE, np.dtype(enc.get("dtype", "float16")), shards.available.image_shape),
            NpyLayout(CLIMATE, np.dtype(np.float32), shards.available.climate_shape),
        ]
        # decoded = raw * enc_scale + enc_offset; normalised = (decoded - mean) / std = raw * scale + bias
        enc_scale, enc_offset = encoding_affine(enc)
        std, mean = shards.image_std.astype(np.float64), shards.image_mean.astype(np.float64)
        self.scale = torch.from_numpy((enc_scale / std).astype(np.float32)).view(-1, 1, 1)
        self.bias = torch.from_numpy(((enc_offset - mean) / std).astype(np.float32)).view(-1, 1, 1)
        n_ch, n_mo, n_var = shards.available.image_shape[0], *shards.available.climate_shape
        ch = list(shards.channel_index)
        self.channels = None if ch == list(range(n_ch)) else np.array(ch)
        mo, var = list(shards.month_index), list(shards.variable_index)
        self.climate_cells = None if (mo, var) == (list(range(n_mo)), list(range(n_var))) else np.ix_(mo, var)
        self.index = SampleIndex(shards, self.layouts)
        self.pool = TensorPool()
        self.channel_index = np.asarray(ch, dtype=np.int64)
        self._native = native.available() and self.layouts[0].dtype in (np.float16, np.int16)

    def new_rows(self, n: int) -> RawRows:
        """Raw rows for a batch of ``n`` samples, to be filled by :meth:`read` and reused from batch to batch."""
        return RawRows({lay.suffix: np.empty((n, *lay.shape), dtype=lay.dtype) for lay in self.layouts})

    def read(
        self, files: OpenShards, ids: np.ndarray, rows: RawRows, into: torch.Tensor | None = None
    ) -> dict[int, str]:
        """Global samples ``ids`` (k,) into rows ``0..k-1`` of ``rows``, one ``preadv`` each, and with ``into``
        (k, C, H, W) float32 or bfloat16, their images normalised into ``into`` (see :meth:`image_into`).

        Returns {row: message} for the corrupt ones (missing, truncated or malformed members, an unreadable
        shard), each message naming the sample and its shard; their rows hold anything. No Python runs per
        sample unless it is corrupt: the lookups are array operations, the reads one C call."""
        sh, index = self.shards, self.index
        shard, position = sh.locate(ids)
        index.ensure(np.unique(shard[index.offset[ids] == UNINDEXED]).tolist())
        offset, kind = index.offset[ids], index.kind[ids]
        corrupt = {i: index.bad[int(ids[i])] for i in np.flatnonzero(offset < 0).tolist()}
        ok = offset >= 0
        for s, err in files.ensure(np.unique(shard[ok & (files.fd[shard] < 0)]).tolist()).items():
            for i in np.flatnonzero(ok & (shard == s)).tolist():
                corrupt[i] = err
            ok &= shard != s

        def where(i: int) -> str:
            url = sh.urls[shard[i]]
            return f"sample '{sample_key(url, int(position[i]))}' in shard {url}"

        todo = np.flatnonzero(ok)
        fd, offset, kind = files.fd[shard[todo]], offset[todo], kind[todo]
        groups = {index.structures[k]: np.flatnonzero(kind == k) for k in np.unique(kind).tolist()}
        native_into = into if self._native and into is not None and into.dtype in native.OUT_DTYPES else None
        if self._native:
            got, want = self._read_native(todo, fd, offset, groups, rows, native_into)
        else:
            got, want = self._read_python(todo, fd, offset, groups, rows)
        for j in np.flatnonzero(got != want).tolist():
            what = os.strerror(-got[j]) if got[j] < 0 else f"truncated (read {got[j]} of {want[j]} bytes)"
            corrupt[int(todo[j])] = f"{where(int(todo[j]))}: {what}"
        for structure, js in groups.items():  # the .npy headers of the whole chunk, one comparison per layout
            full = todo[js][got[js] == want[js]]
            for lay, heads in zip(self.layouts, rows.headers[structure], strict=True):
                for k, bad in lay.check_headers(heads[full]):
                    corrupt[int(full[k])] = f"{where(int(full[k]))}: member {lay.suffix}: {bad}"
        if into is not None and native_into is None:
            self.image_into(rows[IMAGE], into)
        return corrupt

    @staticmethod
    def _read_python(row, fd, offset, groups, rows: RawRows) -> tuple[np.ndarray, np.ndarray]:
        """Samples into rows ``row`` (n,) from files ``fd`` (n,) at byte ``offset`` (n,); groups: structure ->
        indexes into those arrays. Returns (n,) bytes read (or -errno) and (n,) bytes wanted; a sample's first
        short run ends it."""
        got, want = np.zeros(len(row), dtype=np.int64), np.zeros(len(row), dtype=np.int64)
        for structure, js in groups.items():
            runs = rows.runs(structure)
            for j in js.tolist():
                for run_offset, bufs, size in runs[row[j]]:
                    try:
                        g = os.preadv(int(fd[j]), bufs, int(offset[j]) + run_offset)
                    except OSError as err:
                        g = -(err.errno or 5)
                    want[j] += size
                    got[j] = g if g < 0 else got[j] + g
                    if g != size:
                        break
        return got, want

    def _read_native(self, row, fd, offset, groups, rows: RawRows, into: torch.Tensor | None):
        """:meth:`_read_python` in one call of ``_native.c`` without the GIL, converting each image into ``into``
        right after its reads."""
        got, want = np.zeros(len(row), dtype=np.int64), np.zeros(len(row), dtype=np.int64)
        if not len(row):
            return got, want
        runs, iov, n_iov = [], [], 0
        for structure, js in groups.items():
            table, spec = rows.table(structure)  # (n, m, 2), (r, 4)
            r, m = len(spec), table.shape[1]
            block = np.empty((len(js), r, 5), dtype=np.int64)  # fd, offset, first buffer, count, row
            block[:, :, 0], block[:, :, 4] = fd[js, None], row[js, None]
            block[:, :, 1] = offset[js, None] + spec[:, 0]
            block[:, :, 2] = n_iov + np.arange(len(js))[:, None] * m + spec[:, 1]
            block[:, :, 3] = spec[:, 2]
            runs.append(block.reshape(-1, 5))
            iov.append(table[row[js]].reshape(-1, 2))
            want[js] = spec[:, 3].sum()
            n_iov += len(js) * m
        run_got = np.empty(sum(len(b) for b in runs), dtype=np.int64)  # a row's runs are adjacent, as C needs
        convert = None if into is None else self._affine(rows[IMAGE], into, self.channel_index)
        native.read_runs(np.concatenate(runs), np.concatenate(iov), run_got, convert)
        start = 0
        for js, group_runs in zip(groups.values(), runs, strict=True):
            g = run_got[start : start + len(group_runs)].reshape(len(js), -1)
            start += len(group_runs)
            error = g.min(axis=1)  # a failed run's -errno
            got[js] = np.where(error < 0, error, np.maximum(g, 0).sum(axis=1))
        return got, want

    def new_image(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised (b, C, H, W) batch tensor for :meth:`image_into`, float32 or bfloat16."""
        return empty(shape, dtype, self.pool)

    def select_channels(self, raw: np.ndarray) -> np.ndarray:
        """raw: (..., C_shards, H, W) as stored -> (..., C, H, W), the run's channels."""
        return raw if self.channels is None else raw[..., self.channels, :, :]

    def _affine(self, raw: np.ndarray, out: torch.Tensor, channel: np.ndarray, jitter=None) -> native.Affine:
        return native.affine(raw, channel, self.scale.numpy().ravel(), self.bias.numpy().ravel(), out, jitter)

    def image_into(
        self, raw: np.ndarray, out: torch.Tensor, selected: bool = False, jitter: np.ndarray | None = None
    ) -> None:
        """raw: (b, C_shards, H, W) as stored (or (b, C, H, W) when ``selected``: the run's channels already)
        -> ``out`` (b, C, H, W) float32 or bfloat16, normalised (non-finite -> 0, the mean), plus ``jitter``
        (b, C) float32 in normalised units when given."""
        if self._native and out.dtype in native.OUT_DTYPES:
            channel = np.arange(len(self.channel_index)) if selected else self.channel_index
            native.affine_rows(self._affine(np.ascontiguousarray(raw), out, channel, jitter), len(raw))
            return
        y = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        y.copy_(torch.from_numpy(raw if selected else self.select_channels(raw)))
        y.mul_(self.scale).add_(self.bias)
        # the manifest's statistics may prove every value finite; else one reduction instead of a pass writing all
        if not self.shards.image_finite and not bool(torch.isfinite(y.sum())):
            torch.nan_to_num_(y, nan=0.0, posinf=0.0, neginf=0.0)
        if jitter is not None:
            y.add_(torch.from_numpy(np.asarray(jitter, dtype=np.float32)).view(*jitter.shape, 1, 1))
        if y is not out:
            out.copy_(y)

    def climate(self, raw: np.ndarray) -> np.ndarray:
        """raw: (b, T_shards, F_shards) float32 -> (b, T, F) float32 in physical units, the run's subset (a view of
        ``raw`` when the run reads every month and variable)."""
        if self.climate_cells is None:
            return raw
        return raw[:, self.climate_cells[0], self.climate_cells[1]]

"""The pretraining loader: fixed-shape batches of this rank's slice of the global order, from any step on.

``PretrainBatches`` is an ``IterableDataset`` of whole batches. With several DataLoader workers, worker ``w`` of
``n`` builds the batches of steps ``start + w, start + w + n, ...``; the DataLoader hands workers' outputs back
round-robin, so the batches arrive in step order whatever ``n`` is. A corrupt sample is replaced by the next
good sample of the same batch (the batch keeps its shape), counted, and reported in the batch; the training
loop turns the counts into a fatal error above ``data.max_corrupt_fraction``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from soilnet.data.augment import AugmentSpec, augment_climate, augment_image, normalise
from soilnet.data.npy import NpyLayout
from soilnet.data.order import batch_ids, micro_batch, step_epoch
from soilnet.data.shards import DataError, ShardSet
from soilnet.data.tarindex import ShardIndexError, ShardReader

IMAGE, CLIMATE = "image.npy", "climate.npy"


@dataclass(frozen=True)
class LoaderSpec:
    """What a rank reads: ``global_batch`` split over ``world`` ranks, in the order of ``seed``."""

    seed: int
    global_batch: int
    rank: int
    world: int
    augment: AugmentSpec
    two_views: bool = False  # a second, independently augmented image view (SimCLR term)
    num_workers: int = 0


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def climate_keys(raw: np.ndarray) -> np.ndarray:
    """raw: (B, T, F) float32 climate series -> (B,) int64 63-bit keys; equal series (the same TerraClimate cell)
    share a key, different ones collide with probability about 2**-63.

    Each 8-byte word of a series is salted with its position and mixed (SplitMix64), and the mixed words are
    summed: one vectorised pass over the batch instead of one cryptographic hash per sample."""
    b = raw.shape[0]
    flat = np.ascontiguousarray(raw, dtype=np.float32).reshape(b, -1)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((b, 1), np.float32)], axis=1)
    words = flat.view(np.uint64) + np.arange(flat.shape[1] // 2, dtype=np.uint64) * _GOLDEN
    h = _mix64(words).sum(axis=1, dtype=np.uint64) + np.uint64(flat.shape[1])
    return (_mix64(h) >> np.uint64(1)).astype(np.int64)


def climate_key(raw: np.ndarray) -> int:
    """The key of one raw climate series (T, F) float32; see :func:`climate_keys`."""
    return int(climate_keys(np.asarray(raw)[None])[0])


class CorruptSample(ValueError):
    pass


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as ``default_collate`` does), so that
    handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class BatchDecoder:
    """Decodes the samples of a batch into preallocated rows, then converts and normalises the whole batch.

    Per sample: one ``preadv`` of its adjacent members, the array bytes landing directly in a row of the
    (b, C, H, W) raw image array (float16 or int16, as the manifest's ``image_encoding``) and the (b, T, F) raw
    climate array; the ``.npy`` headers are checked against :class:`NpyLayout`. Pretraining reads nothing else,
    so ``meta.json`` is not read. Per batch: one subset, one
    float32 conversion and one ``x * scale + bias`` (decoding and normalising folded) for the images.
    """

    def __init__(self, shards: ShardSet):
        self.shards = shards
        enc = shards.image_encoding
        self.layouts = {
            IMAGE: NpyLayout(IMAGE, np.dtype(enc.get("dtype", "float16")), shards.available.image_shape),
            CLIMATE: NpyLayout(CLIMATE, np.dtype(np.float32), shards.available.climate_shape),
        }
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
        self._rows: dict[str, np.ndarray] = {}
        self._row_views: dict[str, list[memoryview]] = {}
        self._gap = memoryview(b"")  # scratch for the bytes between members; made on first use (picklable till then)

    def rows(self, n: int) -> dict[str, np.ndarray]:
        """The raw (n, ...) arrays of each ``.npy`` member, reused from batch to batch."""
        if not self._rows or len(self._rows[IMAGE]) != n:
            for suffix, lay in self.layouts.items():
                a = np.empty((n, *lay.shape), dtype=lay.dtype)
                self._rows[suffix] = a
                self._row_views[suffix] = [memoryview(r) for r in a.reshape(n, -1).view(np.uint8)]
            self._gap = memoryview(bytearray(1 << 12))
        return self._rows

    def read(self, reader: ShardReader, url: str, position: int, row: int) -> None:
        """Sample ``position`` of shard ``url`` into row ``row``; raises :class:`CorruptSample` naming the sample
        and shard (missing, truncated or malformed members, an unreadable shard)."""
        try:
            key, members = reader.entry(url, position)
            fd = reader.fileno(url)
        except ShardIndexError as err:
            raise CorruptSample(str(err)) from err
        where = f"sample '{key}' in shard {url}"
        for suffix in self.layouts:
            if suffix not in members:
                raise CorruptSample(f"{where}: member '{suffix}' is missing")
        # the members are adjacent in the tar: one preadv per run of them, the tar headers between into scratch
        spans = sorted(((members[s][0], members[s][1], s) for s in self.layouts), key=lambda m: m[0])
        start = cursor = spans[0][0]
        bufs: list = []
        headers: dict[str, bytearray] = {}
        for offset, size, suffix in spans:
            if offset - cursor > len(self._gap):
                self._preadv(fd, bufs, start, cursor, where)
                start = cursor = offset
                bufs = []
            if offset > cursor:
                bufs.append(self._gap[: offset - cursor])
            lay = self.layouts[suffix]
            h = lay.header_size(size)
            if h is None:
                raise CorruptSample(f"{where}: member {suffix} of {size} bytes is no {lay.dtype} {lay.shape} array")
            headers[suffix] = bytearray(h)
            bufs += [headers[suffix], self._row_views[suffix][row]]
            cursor = offset + size
        self._preadv(fd, bufs, start, cursor, where)
        for suffix, header in headers.items():
            bad = self.layouts[suffix].check_header(header)
            if bad is not None:
                raise CorruptSample(f"{where}: member {suffix}: {bad}")

    @staticmethod
    def _preadv(fd: int, bufs: list, start: int, end: int, where: str) -> None:
        try:
            got = os.preadv(fd, bufs, start)
        except OSError as err:
            raise CorruptSample(f"{where}: {err}") from err
        if got != end - start:
            raise CorruptSample(f"{where}: truncated (read {got} of {end - start} bytes)")

    def image(self, raw: np.ndarray) -> torch.Tensor:
        """raw: (b, C_shards, H, W) as stored -> (b, C, H, W) float32 normalised (non-finite -> 0, the mean)."""
        x = torch.from_numpy(raw)
        if self.channels is not None:
            x = x.index_select(1, self.channels)
        out = _empty(tuple(x.shape), torch.float32)
        out.copy_(x)
        out.mul_(self.scale).add_(self.bias)
        if not bool(torch.isfinite(out.sum())):  # one cheap reduction instead of a pass writing every value
            torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)
        return out

    def climate(self, raw: np.ndarray) -> np.ndarray:
        """raw: (b, T_shards, F_shards) float32 -> (b, T, F) float32 in physical units, the run's subset (a view of
        ``raw`` when the run reads every month and variable)."""
        if self.climate_cells is None:
            return raw
        return raw[:, self.climate_cells[0], self.climate_cells[1]]


class PretrainBatches(IterableDataset):
    """Batches of steps ``start_step, start_step + 1, ...`` (endless; the caller stops).

    Each batch: ``image`` (b, C, H, W) float32 normalised; ``image2`` the same shape when ``two_views``;
    ``climate`` (b, T, F) float32 normalised; ``ids`` (b,) int64 global sample ids; ``climate_key`` (b,) int64;
    ``step`` int; ``corrupt`` list of messages about samples replaced in this batch.
    """

    def __init__(self, shards: ShardSet, spec: LoaderSpec, start_step: int = 0):
        super().__init__()
        self.shards, self.spec, self.start_step = shards, spec, start_step
        micro_batch(spec.global_batch, spec.world)
        self.decoder = BatchDecoder(shards)

    def batch(self, reader: ShardReader, step: int) -> dict:
        sp, sh, dec = self.spec, self.shards, self.decoder
        ids = batch_ids(sp.seed, sh.samples, sp.global_batch, step, sp.rank, sp.world)
        epoch = step_epoch(sh.samples, sp.global_batch, step)
        n = len(ids)
        shard_no = np.searchsorted(sh.starts, ids, side="right") - 1
        positions = (ids - sh.starts[shard_no]).tolist()
        rows = dec.rows(n)
        good = np.zeros(n, dtype=bool)
        corrupt: list[str] = []
        for i, (s, pos) in enumerate(zip(shard_no.tolist(), positions, strict=True)):
            try:
                dec.read(reader, sh.urls[s], pos, i)
                good[i] = True
            except CorruptSample as err:
                corrupt.append(str(err))
        if not good.any():
            raise DataError(f"step {step}: every sample of this rank's batch is corrupt, e.g. {corrupt[0]}")
        # a corrupt sample's place is taken by the next good one (same climate key, so masking can exclude it)
        src = np.arange(n)
        for i in np.flatnonzero(~good):
            src[i] = next((i + d) % n for d in range(1, n) if good[(i + d) % n])
            for a in rows.values():
                a[i] = a[src[i]]
        image = dec.image(rows[IMAGE])
        raw_climate = dec.climate(rows[CLIMATE])
        keys = climate_keys(raw_climate)
        climate = normalise(raw_climate, sh.climate_mean, sh.climate_std, axis=2)
        image2 = None
        if sp.augment.enabled:
            base = image.numpy()
            image = _empty(tuple(base.shape), torch.float32)
            image2 = _empty(tuple(base.shape), torch.float32) if sp.two_views else None
            view1 = image.numpy()
            view2 = image2.numpy() if image2 is not None else None
            for i in range(n):
                rng = np.random.default_rng([sp.seed, epoch, int(ids[src[i]])])
                view1[i] = augment_image(base[i], sp.augment, rng)
                if view2 is not None:
                    view2[i] = augment_image(base[i], sp.augment, rng)
                climate[i] = augment_climate(climate[i], sp.augment, rng)
        elif sp.two_views:
            image2 = image.clone()
        out = {
            "image": image,
            "climate": torch.from_numpy(climate),
            "ids": torch.from_numpy(np.asarray(ids, dtype=np.int64)),
            "climate_key": torch.from_numpy(keys),
            "step": step,
            "corrupt": corrupt,
        }
        if image2 is not None:
            out["image2"] = image2
        return out

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader()
        step = self.start_step + wid
        while True:
            yield self.batch(reader, step)
            step += nw


def build_loader(shards: ShardSet, spec: LoaderSpec, start_step: int = 0) -> DataLoader:
    """A DataLoader over :class:`PretrainBatches` from ``start_step`` (batches already formed by the dataset)."""
    return DataLoader(
        PretrainBatches(shards, spec, start_step),
        batch_size=None,
        num_workers=spec.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if spec.num_workers else None,
    )

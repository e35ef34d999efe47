"""The pretraining loader: fixed-shape batches of this rank's slice of the global order, from any step on.

``PretrainBatches`` is an ``IterableDataset`` of whole batches. With several DataLoader workers, worker ``w`` of
``n`` builds the batches of steps ``start + w, start + w + n, ...``; the DataLoader hands workers' outputs back
round-robin, so the batches arrive in step order whatever ``n`` is. A corrupt sample is replaced by the next
good sample of the same batch (the batch keeps its shape), counted, and reported in the batch; the training
loop turns the counts into a fatal error above ``data.max_corrupt_fraction``.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from soilnet.data.augment import AugmentSpec, apply_view, augment_climate, draw_view, normalise
from soilnet.data.decode import CLIMATE, IMAGE, BatchDecoder, CorruptSample, RawRows
from soilnet.data.order import batch_ids, micro_batch, step_epoch
from soilnet.data.shards import DataError, ShardSet
from soilnet.data.tarindex import ShardReader


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
    fused_normalise: bool = False  # one compiled CPU kernel for decode + normalise (see decode.fused_affine)


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
        self.decoder = BatchDecoder(shards, fused=spec.fused_normalise)
        self._work: dict[str, np.ndarray] = {}

    def read(self, reader: ShardReader, step: int, rows: RawRows) -> RawBatch:
        """Stage 1 of a batch: this rank's samples of ``step`` into ``rows``, corrupt ones noted."""
        sp, sh = self.spec, self.shards
        ids = batch_ids(sp.seed, sh.samples, sp.global_batch, step, sp.rank, sp.world)
        shard_no = np.searchsorted(sh.starts, ids, side="right") - 1
        positions = (ids - sh.starts[shard_no]).tolist()
        good = np.zeros(len(ids), dtype=bool)
        corrupt: list[str] = []
        for i, (s, pos) in enumerate(zip(shard_no.tolist(), positions, strict=True)):
            try:
                self.decoder.read(reader, sh.urls[s], pos, rows, i)
                good[i] = True
            except CorruptSample as err:
                corrupt.append(str(err))
        return RawBatch(step, ids, rows, good, corrupt)

    def finish(self, raw: RawBatch) -> dict:
        """Stage 2: replace corrupt samples, convert, normalise, augment; the result shares no memory with
        ``raw.rows``, which the next batch may reuse at once."""
        sp, sh, dec = self.spec, self.shards, self.decoder
        ids, rows, good, n = raw.ids, raw.rows, raw.good, len(raw.ids)
        if not good.any():
            raise DataError(f"step {raw.step}: every sample of this rank's batch is corrupt, e.g. {raw.corrupt[0]}")
        # a corrupt sample's place is taken by the next good one (same climate key, so masking can exclude it)
        src = np.arange(n)
        for i in np.flatnonzero(~good):
            src[i] = next((i + d) % n for d in range(1, n) if good[(i + d) % n])
            for a in rows.arrays.values():
                a[i] = a[src[i]]
        raw_climate = dec.climate(rows[CLIMATE])
        keys = climate_keys(raw_climate)
        climate = normalise(raw_climate, sh.climate_mean, sh.climate_std, axis=2)
        if not sp.augment.enabled:
            image = dec.image(rows[IMAGE])
            image2 = image.clone() if sp.two_views else None
        else:  # views of the raw rows (half the bytes of float32), normalised after: the same values either way
            epoch = step_epoch(sh.samples, sp.global_batch, raw.step)
            views = self._views(rows[IMAGE], 2 if sp.two_views else 1)
            jitter = np.zeros((len(views), n, views[0].shape[1], 1, 1), dtype=np.float32)
            chans = None if dec.channels is None else dec.channels.numpy()
            for i in range(n):
                rng = np.random.default_rng([sp.seed, epoch, int(ids[src[i]])])
                sample = rows[IMAGE][i] if chans is None else rows[IMAGE][i][chans]
                for v, out in enumerate(views):
                    view = draw_view(sp.augment, rng, *sample.shape)
                    apply_view(sample, view, sp.augment.pad, out[i])
                    if view.jitter is not None:
                        jitter[v, i, :, 0, 0] = view.jitter
                climate[i] = augment_climate(climate[i], sp.augment, rng)
            out_views = [dec.image(x, selected=True) for x in views]
            if sp.augment.spectral_jitter > 0:
                for t, j in zip(out_views, jitter, strict=True):
                    t.add_(torch.from_numpy(j))
            image, image2 = out_views[0], (out_views[1] if sp.two_views else None)
        out = {
            "image": image,
            "climate": torch.from_numpy(climate),
            "ids": torch.from_numpy(np.asarray(ids, dtype=np.int64)),
            "climate_key": torch.from_numpy(keys),
            "step": raw.step,
            "corrupt": raw.corrupt,
        }
        if image2 is not None:
            out["image2"] = image2
        return out

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A work array of stage 2, reused from batch to batch (stage 2 runs in one thread)."""
        a = self._work.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._work[name] = np.empty(shape, dtype=dtype)
        return a

    def _views(self, raw: np.ndarray, k: int) -> list[np.ndarray]:
        """``k`` work arrays for views of raw images (b, C_shards, H, W), with the run's channels only."""
        b, _, h, w = raw.shape
        c = len(self.shards.channel_index)
        return [self._scratch(f"view{v}", (b, c, h, w), raw.dtype) for v in range(k)]

    def batch(self, reader: ShardReader, step: int) -> dict:
        """The batch of ``step``, both stages in this thread."""
        return self.finish(
            self.read(reader, step, self.decoder.new_rows(micro_batch(self.spec.global_batch, self.spec.world)))
        )

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from _pipelined(self, itertools.count(self.start_step + wid, nw))


@dataclass
class RawBatch:
    """A batch after stage 1: ``ids`` (b,) int64 global sample ids, the raw ``rows``, ``good`` (b,) bool (False
    for corrupt samples) and the ``corrupt`` messages."""

    step: int
    ids: np.ndarray
    rows: RawRows
    good: np.ndarray
    corrupt: list[str]


def _pipelined(batches: PretrainBatches, steps) -> Iterator[dict]:
    """Finished batches of ``steps``, in order. A reader thread reads the next batch's samples (``preadv`` runs
    without the GIL) while this thread converts and normalises the current one (torch also releases the GIL);
    two sets of raw rows alternate between them.

    The reader is not a daemon: at interpreter exit a daemon thread is killed wherever it is, and one killed
    inside numpy's C++ code aborts the process ("terminate called without an active exception"). It stops when
    this generator closes, or when the main thread has ended and it finds no rows to fill."""
    n = micro_batch(batches.spec.global_batch, batches.spec.world)
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    for _ in range(2):
        free.put(batches.decoder.new_rows(n))

    def next_rows() -> RawRows | None:
        while not stop.is_set():
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                if not threading.main_thread().is_alive():
                    return None
        return None

    def produce() -> None:
        reader = ShardReader()
        try:
            for step in steps:
                rows = next_rows()
                if rows is None:
                    return
                ready.put(batches.read(reader, step, rows))
        except BaseException as err:  # handed to the consumer, which raises it in its own thread
            ready.put(err)
        finally:
            reader.close()

    threading.Thread(target=produce, name="soilnet-shard-reader").start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            out = batches.finish(item)
            free.put(item.rows)
            yield out
    finally:
        stop.set()


def build_loader(shards: ShardSet, spec: LoaderSpec, start_step: int = 0) -> DataLoader:
    """A DataLoader over :class:`PretrainBatches` from ``start_step`` (batches already formed by the dataset)."""
    return DataLoader(
        PretrainBatches(shards, spec, start_step),
        batch_size=None,
        num_workers=spec.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if spec.num_workers else None,
    )

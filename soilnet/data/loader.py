"""The pretraining loader: fixed-shape batches of this rank's slice of the global order, from any step on.

``PretrainBatches`` is an ``IterableDataset`` of whole batches. With several DataLoader workers, worker ``w`` of
``n`` builds the batches of steps ``start + w, start + w + n, ...``; the DataLoader hands workers' outputs back
round-robin, so the batches arrive in step order whatever ``n`` is; within a process, builder threads split
the steps the same way. A corrupt sample is replaced by the next good sample of the same batch (the batch keeps
its shape), counted, and reported in the batch; the training loop turns the counts into a fatal error above
``data.max_corrupt_fraction``.
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

from soilnet.data.augment import AugmentSpec, normalise
from soilnet.data.decode import CLIMATE, BatchDecoder, RawRows
from soilnet.data.index import OpenShards
from soilnet.data.manifest import DataError
from soilnet.data.order import batch_ids, micro_batch, step_epoch
from soilnet.data.pool import SharedAdopter
from soilnet.data.shards import ShardSet


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """What a rank reads: ``global_batch`` split over ``world`` ranks, in the order of ``seed``."""

    seed: int
    global_batch: int
    rank: int
    world: int
    augment: AugmentSpec
    two_views: bool = False  # a second, independently augmented image view (SimCLR term)
    num_workers: int = 0
    threads: int | None = None  # threads building batches per process; None: 2
    image_dtype: torch.dtype = torch.float32  # the batch's images: the model's compute dtype (bfloat16 on GPUs)
    pin_memory: bool = False  # batches in pinned memory, for non_blocking copies to a GPU (needs CUDA)

    @property
    def builder_threads(self) -> int:
        return self.threads or 2


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


CHUNK = 64  # samples per C call: its Python costs little per sample, the raw rows stay in L3


@dataclass
class Stage:
    """One builder thread's own working memory: its open shards and the raw rows of a chunk."""

    files: OpenShards
    rows: RawRows


def _filled(out: torch.Tensor, values: np.ndarray) -> torch.Tensor:
    out.numpy()[...] = values
    return out


class PretrainBatches(IterableDataset):
    """Batches of steps ``start_step, start_step + 1, ...`` (endless; the caller stops).

    Each batch: ``image`` (b, C, H, W) normalised, not augmented, of ``spec.image_dtype`` (float32 or bfloat16,
    rounded to nearest even from float32 values); ``climate`` (b, T, F) float32 normalised; ``ids`` (b,) int64
    global sample ids; ``climate_key`` (b,) int64; ``step`` and ``epoch`` int; ``corrupt`` list of messages about
    samples replaced in this batch. Every tensor comes from the decoder's :class:`~soilnet.data.pool.TensorPool`
    (pinned with ``spec.pin_memory``; shared and reused across the hand-over in DataLoader workers).
    """

    def __init__(self, shards: ShardSet, spec: LoaderSpec, start_step: int = 0):
        super().__init__()
        self.shards, self.spec, self.start_step = shards, spec, start_step
        micro_batch(spec.global_batch, spec.world)
        self.decoder = BatchDecoder(shards)
        self.decoder.pool.pin = spec.pin_memory and torch.cuda.is_available()

    def new_stage(self) -> Stage:
        """A builder thread's working memory."""
        n = micro_batch(self.spec.global_batch, self.spec.world)
        return Stage(OpenShards(self.shards.urls), self.decoder.new_rows(min(CHUNK, n)))

    def batch(self, step: int, stage: Stage | None = None) -> dict:
        """The batch of ``step``, not augmented (:mod:`soilnet.data.device` augments it on the training device),
        built chunk by chunk in this thread: each chunk's samples are read into the stage's raw rows and converted
        and normalised into the batch while the rows are still in cache. A corrupt sample's place is taken by the
        next good sample of the batch: the same values and the same climate key (so that masking can exclude it),
        its own id (so its own views)."""
        sp, sh, dec = self.spec, self.shards, self.decoder
        stage = stage or self.new_stage()
        ids = batch_ids(sp.seed, sh.samples, sp.global_batch, step, sp.rank, sp.world)
        n, epoch = len(ids), step_epoch(sh.samples, sp.global_batch, step)
        c, h, w = len(sh.channel_index), *sh.available.image_shape[1:]
        new = dec.pool.tensor
        image = new((n, c, h, w), sp.image_dtype)
        raw_climate = np.empty((n, len(sh.month_index), len(sh.variable_index)), dtype=np.float32)
        corrupt: dict[int, str] = {}
        for lo in range(0, n, len(stage.rows)):
            hi = min(lo + len(stage.rows), n)
            rows = stage.rows.head(hi - lo)
            bad = dec.read(stage.files, ids[lo:hi], rows, image[lo:hi])
            corrupt.update((lo + i, msg) for i, msg in bad.items())
            raw_climate[lo:hi] = dec.climate(rows[CLIMATE])
        keys = climate_keys(raw_climate)
        climate = new(raw_climate.shape, torch.float32)
        climate.numpy()[...] = normalise(raw_climate, sh.climate_mean, sh.climate_std, axis=2)
        if len(corrupt) == n:
            raise DataError(f"step {step}: every sample of this rank's batch is corrupt, e.g. {corrupt[0]}")
        for i in sorted(corrupt):
            src = next((i + d) % n for d in range(1, n) if (i + d) % n not in corrupt)
            image[i], climate[i], keys[i] = image[src], climate[src], keys[src]
        return {
            "image": image,
            "climate": climate,
            "ids": _filled(new((n,), torch.int64), ids),
            "climate_key": _filled(new((n,), torch.int64), keys),
            "step": step,
            "epoch": epoch,
            "corrupt": [corrupt[i] for i in sorted(corrupt)],
        }

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from _threaded(self, self.start_step + wid, nw, self.spec.builder_threads)


def _threaded(batches: PretrainBatches, first: int, stride: int, threads: int) -> Iterator[dict]:
    """The batches of steps ``first, first + stride, ...`` in order, built by ``threads`` threads: thread ``j``
    builds every ``threads``-th of them, from the ``j``-th on. Reading and converting (one C call, or ``preadv``
    and torch) run without the GIL, so the threads share the cores; each holds at most one finished batch.

    The threads are not daemons: at interpreter exit a daemon thread is killed wherever it is, and one killed
    inside numpy's C++ code aborts the process ("terminate called without an active exception"). They stop when
    this generator closes, or when the main thread has ended while they wait to hand over a batch."""
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue(maxsize=1) for _ in range(threads)]

    def build(j: int) -> None:
        stage = batches.new_stage()
        try:
            for m in itertools.count():
                if not hand_over(queues[j], batches.batch(first + stride * (j + m * threads), stage), stop):
                    return
        except BaseException as err:  # handed to the consumer, which raises it in its own thread
            hand_over(queues[j], err, stop)
        finally:
            stage.files.close()

    for j in range(threads):
        threading.Thread(target=build, args=(j,), name=f"soilnet-batch-builder-{j}").start()
    try:
        for m in itertools.count():
            item = take(queues[m % threads])
            if item is None:  # the main thread has ended (this runs in another thread, e.g. an augmenting one)
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item  # the batch's memory returns to the pool as soon as the consumer drops it
    finally:
        stop.set()


def hand_over(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` on ``q`` (a producer thread's hand-over to its consumer): False, without it, once ``stop`` is
    set (the consumer closed) or the main thread has ended."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if not threading.main_thread().is_alive():
                return False
    return False


def take(q: queue.Queue):
    """The next item of ``q``, or None once the main thread has ended (the producers then stop handing over)."""
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if not threading.main_thread().is_alive():
                return None


class Loader:
    """Iterable :class:`PretrainBatches` from a step, through a DataLoader; with workers, each batch's tensors are
    adopted from the workers' shared buffers (:class:`~soilnet.data.pool.SharedAdopter`) so that the buffers
    return to the workers once the batch is freed (pinned copies with ``spec.pin_memory``)."""

    def __init__(self, batches: PretrainBatches, loader: DataLoader):
        self.batches, self.loader = batches, loader
        self.adopter: SharedAdopter | None = None  # the current iteration's (tests count its buffers)

    def __iter__(self) -> Iterator[dict]:
        """The batches; the workers start here, not at the first batch (a caller may block signals around it)."""
        batches = iter(self.loader)
        if not self.loader.num_workers:
            return batches
        self.adopter = SharedAdopter(pin=self.batches.decoder.pool.pin)
        return map(self.adopter.adopt, batches)


def build_loader(shards: ShardSet, spec: LoaderSpec, start_step: int = 0) -> Loader:
    """The batches of :class:`PretrainBatches` from ``start_step`` (formed by the dataset), not augmented."""
    batches = PretrainBatches(shards, spec, start_step)
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=spec.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if spec.num_workers else None,
    )
    return Loader(batches, loader)

"""Batches onto the training device, then augmented there.

The loader hands over batches that are normalised but not augmented (:mod:`soilnet.data.loader`), pinned when
the device is a GPU. :class:`DeviceBatches` copies each one to the device with ``non_blocking`` copies, then
applies the batch's augmentation there as index operations (:func:`augment_batch`). On a GPU the copy and the
augmentation of batch N+1 are issued on a side CUDA stream before batch N is handed to the step, so they overlap
step N; the step's stream waits for them only when it takes batch N+1. On a CPU the augmentation of batch
N+1 runs in a thread while the caller works on batch N (torch's operations release the GIL).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import torch

from soilnet.data.augment import augment_images, draw
from soilnet.data.loader import LoaderSpec, hand_over, take

DEVICE_KEYS = ("image", "climate", "climate_key")  # what the step reads on the device; ``ids`` stay on the host


def to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """``batch`` with its :data:`DEVICE_KEYS` tensors on ``device`` (the same tensors when they are there), plus
    ``ids_device``: the ids there, for the draws."""
    out = dict(batch)
    for name in (*DEVICE_KEYS, "image2"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=non_blocking)
    out["ids_device"] = batch["ids"].to(device, non_blocking=non_blocking)
    return out


def augment_batch(batch: dict, spec: LoaderSpec) -> dict:
    """The training views of a batch on its device: ``image`` becomes view 0 of each sample and, with
    ``spec.two_views``, ``image2`` view 1; ``climate`` gets its jitter. Draws come from (``spec.seed``, the batch's
    ``epoch``, each sample's id), so they do not depend on the world size, workers, threads or device. Without
    augmentation ``image2`` is ``image``."""
    aug, image, out = spec.augment, batch["image"], dict(batch)
    if not aug.enabled:
        if spec.two_views:
            out["image2"] = image
        return out
    ids = batch.get("ids_device", batch["ids"]).to(image.device)
    climate = batch["climate"]
    views = 2 if spec.two_views else 1
    d = draw(aug, spec.seed, int(batch["epoch"]), ids, views, tuple(image.shape[1:]), tuple(climate.shape[1:]))
    out["image"] = augment_images(image, aug, d, 0)
    if spec.two_views:
        out["image2"] = augment_images(image, aug, d, 1)
    if d.climate is not None:
        out["climate"] = climate + d.climate
    return out


class DeviceBatches:
    """``batches`` (host dicts from the loader) on ``device``, augmented there (:func:`augment_batch`). On CUDA
    the copy and augmentation of the next batch run on a side stream while the caller works on the current one
    (the host tensors should be pinned: ``LoaderSpec.pin_memory``); on a CPU the augmentation of the next batch
    runs in a thread (:func:`_in_thread`)."""

    def __init__(self, batches: Iterable[dict], spec: LoaderSpec, device: torch.device | str):
        self.batches, self.spec, self.device = batches, spec, torch.device(device)

    def __iter__(self) -> Iterator[dict]:
        """The device batches; the loader's iterator (and its workers) starts here, not at the first batch."""
        batches = iter(self.batches)
        if self.device.type == "cuda":
            return self._prefetched(batches)
        if not self.spec.augment.enabled:  # nothing to overlap
            return (augment_batch(to_device(batch, self.device), self.spec) for batch in batches)
        return _in_thread(augment_batch(to_device(batch, self.device), self.spec) for batch in batches)

    def _stage(self, host: dict, stream: torch.cuda.Stream) -> tuple[dict, torch.cuda.Event]:
        """Issue the copy and augmentation of ``host`` on ``stream``; returns the device batch and its event."""
        with torch.cuda.stream(stream):
            batch = augment_batch(to_device(host, self.device, non_blocking=True), self.spec)
            done = torch.cuda.Event()
            done.record(stream)
        return batch, done

    def _prefetched(self, it: Iterator[dict]) -> Iterator[dict]:
        stream = torch.cuda.Stream(self.device)
        host = next(it, None)
        staged = None if host is None else self._stage(host, stream)
        while staged is not None:
            batch, done = staged
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in batch.values():  # made on the side stream, used on this one: not to be reused before
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    t.record_stream(current)
            host = next(it, None)  # batch N+1 is copied and augmented while the caller runs step N
            staged = None if host is None else self._stage(host, stream)
            yield batch


def _in_thread(items: Iterator[dict]) -> Iterator[dict]:
    """``items``, each made in a thread one ahead of the caller. The thread is not a daemon (one killed inside
    torch's C++ code aborts the process); it stops when this generator closes, or when the main thread has ended."""
    handed: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def make() -> None:
        try:
            for item in items:
                if not hand_over(handed, item, stop):
                    return
            hand_over(handed, StopIteration(), stop)
        except BaseException as err:  # handed to the caller, which raises it in its own thread
            hand_over(handed, err, stop)

    threading.Thread(target=make, name="soilnet-augment").start()
    try:
        while True:
            item = take(handed)
            if item is None or isinstance(item, StopIteration):  # None: the main thread has ended
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
    finally:
        stop.set()

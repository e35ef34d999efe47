"""Batch tensors whose memory is reused once nothing refers to them any more.

A fresh batch of 64 float32 patches of 14 x 64 x 64 is 15 MB that the kernel must map and zero page by page on
first touch (2 MiB at a time with transparent huge pages): about 12 us per sample here, as much as decoding and
normalising it. The pool hands out tensors over arrays that it keeps, so a training loop that drops each batch
before the next but one gets the same few arrays back, already mapped.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch


class TensorPool:
    """Hands out uninitialised tensors; an array returns to the pool when the last tensor (or view, or storage)
    over it is freed, whichever thread frees it.

    Only for tensors that stay in this process: a DataLoader worker sends its batches to the main process,
    where this process cannot see them freed (:func:`soilnet.data.decode.empty` covers that case)."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # a copy in another process starts empty (and a lock cannot be pickled)

    def __setstate__(self, state: dict) -> None:
        self._reset()

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``shape`` tensor of ``dtype``, over a pooled array."""
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.setdefault(key, [])
            base = free.pop() if free else None
        if base is None:
            base = np.empty(math.prod(shape) * dtype.itemsize, dtype=np.uint8)  # numpy has no bfloat16
        # torch keeps a reference to the array it wraps until its storage is freed; wrapping a view of ``base``
        # lets that view's finaliser tell when every tensor over the memory is gone
        handed = base.view()
        weakref.finalize(handed, self._release, key, base)
        return torch.from_numpy(handed).view(dtype).view(shape)

    def _release(self, key: tuple, base: np.ndarray) -> None:
        with self._lock:
            self._free[key].append(base)

    def pooled(self) -> int:
        """Arrays waiting in the pool (for tests)."""
        with self._lock:
            return sum(len(v) for v in self._free.values())

"""Batch tensors whose memory is reused once nothing refers to them any more, in the process that trains and
across the DataLoader workers' hand-over.

A fresh batch of 64 float32 patches of 14 x 64 x 64 is 15 MB that the kernel must map and zero page by page on
first touch (2 MiB at a time with transparent huge pages): about 12 us per sample here, as much as decoding and
normalising it. The pool hands out tensors over memory that it keeps:

- in the training process, over numpy arrays (or, to copy them to a GPU with ``non_blocking``, over pinned memory
  from torch's caching host allocator, which keeps a block until the copies from it are done);
- in a DataLoader worker, over shared-memory buffers: each begins with a header whose busy word the main process
  clears (:class:`SharedAdopter`) when it has freed every tensor over the buffer, and the worker hands out a
  buffer again once it is clear. The main process keeps each buffer it has met mapped, so a batch's hand-over is
  one file descriptor per tensor: no fresh shared memory, no page faults.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch
from torch.utils.data import get_worker_info

HEADER = 64  # bytes before a shared buffer's tensor: [busy, magic] int64, the rest padding (keeps alignment)
_MAGIC = 0x536F696C4E6574  # "SoilNet": marks a pooled shared buffer


def _as_numpy(storage: torch.UntypedStorage) -> np.ndarray:
    """A uint8 numpy array over all of ``storage``'s bytes (keeping it alive)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,)).numpy()


def _over(memory: torch.UntypedStorage | np.ndarray, offset: int, shape: tuple[int, ...], dtype: torch.dtype):
    """A contiguous ``shape`` tensor of ``dtype`` over ``memory`` from byte ``offset``; over an array, ``memory``
    must be exactly the tensor's bytes (offset 0): torch then keeps that very array alive, whose finaliser tells
    when the last tensor over it is gone (a slice of it would keep only the array that owns the memory)."""
    if isinstance(memory, np.ndarray):
        assert offset == 0 and memory.nbytes == math.prod(shape) * dtype.itemsize
        return torch.from_numpy(memory).view(dtype).view(shape)
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return torch.empty(0, dtype=dtype).set_(memory, offset // dtype.itemsize, shape, strides)


class TensorPool:
    """Hands out uninitialised tensors; their memory returns to the pool when the last tensor (or view, or storage)
    over it is freed, whichever thread (or, from a DataLoader worker, whichever process) frees it.

    ``pin``: in the training process, pinned memory (for ``non_blocking`` copies to a GPU). ``allocations``: the
    buffers this process's pool has created (a reused pool stops growing)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._reset()

    def _reset(self) -> None:
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._shared: dict[int, list[tuple[torch.UntypedStorage, np.ndarray]]] = {}
        self._lock = threading.Lock()
        self.allocations = 0

    def __getstate__(self) -> dict:
        return {"pin": self.pin}  # a copy in another process starts empty (and a lock cannot be pickled)

    def __setstate__(self, state: dict) -> None:
        self.pin = state["pin"]
        self._reset()

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous ``shape`` tensor of ``dtype``: in a DataLoader worker over a shared buffer
        of the pool, else over a pooled array (or pinned memory with ``pin``)."""
        if get_worker_info() is not None:
            return self._shared_tensor(tuple(shape), dtype)
        if self.pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)  # torch's caching host allocator reuses it
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.setdefault(key, [])
            base = free.pop() if free else None
            if base is None:
                self.allocations += 1
        if base is None:
            base = np.empty(math.prod(shape) * dtype.itemsize, dtype=np.uint8)  # numpy has no bfloat16
        # torch keeps a reference to the array it wraps until its storage is freed; wrapping a view of ``base``
        # lets that view's finaliser tell when every tensor over the memory is gone
        handed = base.view()
        weakref.finalize(handed, self._release, key, base)
        return _over(handed, 0, shape, dtype)

    def _release(self, key: tuple, base: np.ndarray) -> None:
        with self._lock:
            self._free[key].append(base)

    def _shared_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over a shared buffer whose busy word the main process has cleared (or a new buffer)."""
        nbytes = HEADER + math.prod(shape) * dtype.itemsize
        with self._lock:
            buffers = self._shared.setdefault(nbytes, [])
            found = next(((s, h) for s, h in buffers if h[0] == 0), None)
            if found is None:
                storage = torch.UntypedStorage._new_shared(nbytes)
                header = _as_numpy(storage)[:16].view(np.int64)
                header[1] = _MAGIC
                found = (storage, header)
                buffers.append(found)
                self.allocations += 1
            found[1][0] = 1  # busy until the main process has freed it
        return _over(found[0], HEADER, shape, dtype)

    def pooled(self) -> int:
        """Arrays waiting in the pool (for tests)."""
        with self._lock:
            return sum(len(v) for v in self._free.values())


def _clear(header: np.ndarray) -> None:
    header[0] = 0


class SharedAdopter:
    """The main process's side of the workers' shared buffers: :meth:`adopt` replaces a batch's tensors over
    pooled shared buffers by tensors over the same memory whose last release clears the buffer's busy word (or,
    with ``pin``, by pinned copies, clearing it at once). It keeps every buffer it has met mapped (``buffers``,
    by address): a buffer met again is the same mapping, not a new one with fresh page faults."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self.buffers: dict[int, np.ndarray] = {}

    def _buffer(self, t: torch.Tensor) -> np.ndarray | None:
        storage = t.untyped_storage()
        if not storage.is_shared() or storage.nbytes() < HEADER or t.storage_offset() * t.element_size() != HEADER:
            return None
        memory = self.buffers.get(storage.data_ptr())
        if memory is None:
            memory = _as_numpy(storage)
            if memory[:16].view(np.int64)[1] != _MAGIC:
                return None
            self.buffers[storage.data_ptr()] = memory
        return memory

    def adopt(self, batch: dict) -> dict:
        """``batch`` with each tensor over a pooled shared buffer replaced as above (others as they are)."""
        out = dict(batch)
        for name, t in batch.items():
            memory = self._buffer(t) if isinstance(t, torch.Tensor) else None
            if memory is None:
                continue
            header = memory[:16].view(np.int64)
            if self.pin:
                out[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
                header[0] = 0
                continue
            handed = memory[HEADER : HEADER + t.numel() * t.element_size()]  # a new array object: see _over
            weakref.finalize(handed, _clear, header)
            out[name] = _over(handed, 0, tuple(t.shape), t.dtype)
        return out

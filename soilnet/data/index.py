"""Where the manifest's samples lie in their shards, and a thread's open shard files.

A shard's samples share one member layout (the offsets of ``image.npy`` and ``climate.npy`` from the sample's
first member, and their ``.npy`` header sizes), so indexing a shard keeps one byte offset and one layout number
per sample. :class:`SampleIndex` holds them for the whole manifest, filled a shard at a time on first use, so
that a chunk of samples is located by array operations, without Python per sample.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from soilnet.data.npy import NpyLayout
from soilnet.data.shards import ShardSet
from soilnet.data.tarindex import ShardIndexError, index_shard

UNINDEXED, BAD = -1, -2  # SampleIndex.offset of a sample whose shard is not indexed yet, and of a corrupt one


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


class SampleIndex:
    """Where every sample of the manifest lies, filled a shard at a time on first use and shared by the builder
    threads of a process: ``offset`` (N,) int64 byte offset in its shard of the sample's first member
    (:data:`UNINDEXED` until its shard is indexed, :data:`BAD` for a sample that cannot be read, with the reason
    in ``bad``); ``kind`` (N,) int32 its entry in ``structures``. 12 bytes a sample: 120 MB for 10 M samples."""

    def __init__(self, shards: ShardSet, layouts: list[NpyLayout]):
        self.shards, self.layouts = shards, layouts
        self.offset = np.full(shards.samples, UNINDEXED, dtype=np.int64)
        self.kind = np.zeros(shards.samples, dtype=np.int32)
        self.structures: list[Structure] = []
        self.bad: dict[int, str] = {}
        self._ids: dict[Structure, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn get a pickled copy; a lock is not sent
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def ensure(self, shard_numbers: list[int]) -> None:
        """Index these shards (of the manifest's list); two threads may index one shard at once, to equal effect."""
        for s in shard_numbers:
            url, first, promised = self.shards.urls[s], int(self.shards.starts[s]), int(self.shards.counts[s])
            try:
                plan = plan_shard(url, self.layouts)
            except ShardIndexError as err:
                self._mark_bad(range(first, first + promised), str(err))
                continue
            n = min(plan.samples, promised)
            with self._lock:
                for st in plan.structures:
                    if st not in self._ids:
                        self._ids[st] = len(self.structures)
                        self.structures.append(st)
                ids = [self._ids[st] for st in plan.structures]
            self.kind[first : first + n] = np.asarray(ids, dtype=np.int32)[plan.kind[:n]]
            offsets = plan.base[:n].copy()
            for pos, msg in plan.bad.items():
                if pos < n:
                    self.bad[first + pos] = msg
                    offsets[pos] = BAD
            short = f"shard {url}: holds {plan.samples} samples, the manifest promises more"
            for pos in range(n, promised):
                self.bad[first + pos] = f"{short} (#{pos})"
            self.offset[first + n : first + promised] = BAD
            self.offset[first : first + n] = offsets  # last: a sample is indexed once its offset is set

    def _mark_bad(self, ids: range, msg: str) -> None:
        for i in ids:
            self.bad[i] = msg
        self.offset[ids.start : ids.stop] = BAD


class OpenShards:
    """One thread's open shard files, by shard number (``fd`` (S,) int32, -1 when closed); beyond ``limit``
    the file opened first is closed."""

    def __init__(self, urls: Sequence[str], limit: int = 512):
        self.urls, self.limit = urls, limit
        self.fd = np.full(len(urls), -1, dtype=np.int32)
        self._opened: collections.deque[int] = collections.deque()

    def ensure(self, shard_numbers: list[int]) -> dict[int, str]:
        """Open these shards; returns {shard number: message} for those that cannot be opened."""
        errors = {}
        for s in shard_numbers:
            try:
                self.fd[s] = os.open(self.urls[s], os.O_RDONLY)
            except OSError as err:
                errors[s] = f"shard {self.urls[s]}: cannot open it: {err}"
                continue
            self._opened.append(s)
            while len(self._opened) > self.limit:
                old = self._opened.popleft()
                os.close(int(self.fd[old]))
                self.fd[old] = -1
        return errors

    def close(self) -> None:
        while self._opened:
            s = self._opened.popleft()
            os.close(int(self.fd[s]))
            self.fd[s] = -1


def sample_key(url: str, position: int) -> str:
    """The WebDataset key of sample ``position`` of shard ``url``, for messages (the shard is indexed again)."""
    try:
        return index_shard(url)[position][0]
    except (ShardIndexError, IndexError):
        return f"#{position}"

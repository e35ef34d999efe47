"""Random access into WebDataset tar shards through a per-shard member index.

A shard's index maps each sample (in tar order) to the byte offset and size of its members, read from the tar
headers once (``tarfile`` seeks past the data, so indexing costs one header read per member). With it a sample is
one ``preadv`` of its adjacent members (or one ``pread`` per member), which is what lets any rank or worker read
exactly its slice of a global order.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict

Members = dict[str, tuple[int, int]]  # member suffix ("image.npy") -> (offset, size)


class ShardIndexError(OSError):
    """A shard whose tar headers cannot be read."""


def index_shard(url: str) -> list[tuple[str, Members]]:
    """``[(key, {suffix: (offset, size)}), ...]`` in tar order; keys are WebDataset keys (name up to the first dot)."""
    samples: list[tuple[str, Members]] = []
    try:
        with tarfile.open(url, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                key, suffix = base.split(".", 1)
                key = os.path.join(os.path.dirname(m.name), key)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][suffix] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardIndexError(f"shard {url}: cannot read its tar headers: {err}") from err
    return samples


class ShardReader:
    """Reads members of samples by (shard url, position), keeping the indexes and open files of the last ``cache``
    shards."""

    def __init__(self, cache: int = 64):
        self._cache: OrderedDict[str, list[tuple[str, Members]]] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()
        self._size = cache

    def index(self, url: str) -> list[tuple[str, Members]]:
        if url in self._cache:
            self._cache.move_to_end(url)
            return self._cache[url]
        idx = index_shard(url)
        self._cache[url] = idx
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return idx

    def fileno(self, url: str) -> int:
        """A descriptor of shard ``url`` opened for reading, kept open for the next reads."""
        fd = self._files.get(url)
        if fd is not None:
            self._files.move_to_end(url)
            return fd
        try:
            fd = os.open(url, os.O_RDONLY)
        except OSError as err:
            raise ShardIndexError(f"shard {url}: cannot open it: {err}") from err
        self._files[url] = fd
        if len(self._files) > self._size:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def entry(self, url: str, position: int) -> tuple[str, Members]:
        """(key, {suffix: (offset, size)}) of the sample at ``position`` in shard ``url``."""
        idx = self.index(url)
        if position >= len(idx):
            raise ShardIndexError(f"shard {url}: holds {len(idx)} samples, the manifest promises more (#{position})")
        return idx[position]

    def read(self, url: str, position: int) -> tuple[str, dict[str, bytes]]:
        """(key, {suffix: bytes}) of the sample at ``position`` in shard ``url``."""
        key, members = self.entry(url, position)
        fd = self.fileno(url)
        out = {}
        for suffix, (offset, size) in members.items():
            out[suffix] = os.pread(fd, size, offset)
            if len(out[suffix]) != size:
                raise ShardIndexError(f"shard {url}: sample '{key}' member {suffix} is truncated")
        return key, out

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit ``os`` may already be gone; the OS closes the files anyway
            pass

"""A limit on requests in flight, shared by every thread of every process that uses the same directory.

Earth Engine's quota is per project (40 concurrent requests by default), but packing runs on many MPI ranks or
Slurm array tasks, each with many threads. A slot is one file in ``directory``; a request holds an exclusive POSIX
lock on a slot file while it is in flight. The kernel (or the cluster file system's lock manager) drops the locks
of a process that dies, kill -9 included, so a crashed worker never leaks a slot.

POSIX locks belong to a process, not a thread, so the slots this process holds are also tracked in memory; a slot
file, once opened, stays open until the process ends (closing any descriptor of a file would drop every lock the
process holds on it).
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InFlightBudget:
    """At most ``slots`` holders at once across processes sharing ``directory``; waits poll every ``poll_s`` s."""

    def __init__(self, directory: str | Path, slots: int, poll_s: float = 0.005):
        if slots <= 0:
            raise ValueError(f"a request budget needs at least one slot, got {slots}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.poll_s = poll_s
        self._fds: dict[int, int] = {}
        self._held: set[int] = set()
        self._mutex = threading.Lock()

    def _fd(self, k: int) -> int:
        if k not in self._fds:
            self._fds[k] = os.open(self.directory / f"slot-{k:04d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        return self._fds[k]

    def _try(self, k: int) -> bool:
        with self._mutex:
            if k in self._held:
                return False
            try:
                fcntl.lockf(self._fd(k), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            self._held.add(k)
            return True

    def _release(self, k: int) -> None:
        with self._mutex:
            fcntl.lockf(self._fds[k], fcntl.LOCK_UN)
            self._held.discard(k)

    @contextmanager
    def slot(self) -> Iterator[int]:
        """Hold one slot for the duration of the block (one request in flight)."""
        start = random.randrange(self.slots)
        order = [(start + j) % self.slots for j in range(self.slots)]
        while (k := next((k for k in order if self._try(k)), None)) is None:
            time.sleep(self.poll_s * (0.5 + random.random()))
        try:
            yield k
        finally:
            self._release(k)

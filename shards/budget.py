"""A limit on requests in flight, shared by every thread of every process that uses the same directory.

Earth Engine's quota is per project (40 concurrent requests by default), but packing runs on many MPI ranks or
Slurm array tasks, each with many threads. A slot is one file in ``directory``; a request holds an exclusive POSIX
lock on a slot file while it is in flight. The kernel (or the cluster file system's lock manager) drops the locks
of a process that dies, kill -9 included, so a crashed worker never leaks a slot.

POSIX locks belong to a process, not a thread, so the slots this process holds are also tracked in memory; a slot
file, once opened, stays open until the process ends (closing any descriptor of a file would drop every lock the
process holds on it).

Only EACCES and EAGAIN from ``lockf`` mean "held by someone else". Any other error (ENOLCK from an NFS mount
without a lock manager, ENOSYS or EOPNOTSUPP from a file system without POSIX locks) would otherwise turn into an
endless wait, so it stops the run at once, naming the directory and the errno; the constructor tries one lock so
that this happens before any work.
"""

from __future__ import annotations

import errno
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
        self._check_locks()

    def _check_locks(self) -> None:
        """Fail now, not in the first request, where ``directory`` has no working POSIX locks."""
        fd = os.open(self.directory / "probe.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self._lock(fd, "probe.lock"):
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)  # drops only this process's locks on probe.lock, which nothing holds for long

    def _lock(self, fd: int, name: str) -> bool:
        """Try an exclusive lock on ``fd``: True if taken, False if another process holds it."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                return False
            number = err.errno or errno.ENOLCK
            code = errno.errorcode.get(number, str(number))
            raise OSError(
                number,
                f"request budget {self.directory}: cannot lock {name} ({code}: {os.strerror(number)}). The budget "
                "needs POSIX (fcntl) locks on a file system that every worker shares: a local disk (one machine), "
                "NFSv4 or NFSv3 with lockd, Lustre mounted with -o flock (-o localflock locks within one node only, "
                "so the limit then holds per node), GPFS. Set source.earthengine.budget_dir to a folder on one.",
            ) from err
        return True

    def _fd(self, k: int) -> int:
        if k not in self._fds:
            self._fds[k] = os.open(self.directory / f"slot-{k:04d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        return self._fds[k]

    def _try(self, k: int) -> bool:
        with self._mutex:
            if k in self._held or not self._lock(self._fd(k), f"slot-{k:04d}.lock"):
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

"""Files that appear whole or not at all (shards, part records, manifests, checkpoints, maps, point lists).

A file is written to a temporary ``<name>.<host>.<pid>.<random>.tmp`` beside its target (its own for every writer,
so two processes writing the same file at once, such as two Slurm array tasks finishing a pack together, never
write into one temporary file), flushed and fsynced, renamed over the target, and the folder
is fsynced (the rename itself), so a reader, or a rerun after kill -9, finds the old file or the complete new one,
never a part of one. On any error the temporary file is removed and the error is raised as it came; a caller that
names the file and the free space (a full disk) does so around :func:`atomic_file`. A writer that needs a file
name rather than a handle (GDAL, for one) writes the name :func:`atomic_path` gives it.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a folder (which makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    """This writer's own temporary name beside ``path`` (host, process and a random part)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` over ``path`` and make the rename durable."""
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose bytes appear at ``path`` only once the block has completed."""
    path = Path(path)
    tmp = _temporary(path)
    f = open(tmp, "wb")  # noqa: SIM115 - closed below, on success and on failure
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        _commit(tmp, path)
    except BaseException:
        with suppress(OSError):  # buffered bytes cannot be flushed to a full disk; the descriptor is closed anyway
            f.close()
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name for a writer that opens files itself; what it wrote there appears at ``path`` (fsynced)
    only once the block has completed, and nothing does on an error."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        fsync_path(tmp)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, **dump_kwargs) -> None:
    write_text(path, json.dumps(obj, **dump_kwargs))


def create_exclusive(path: str | Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if no file is there: True if this call created it, False if one already was.

    For a file that several processes may try to create at once (on a shared filesystem too): each writes its own
    temporary file (named by host, process and a random part), fsyncs it and hard-links it to ``path``, which
    exactly one link can win; a reader never sees a partial file.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_path(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)

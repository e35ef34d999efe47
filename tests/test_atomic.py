"""soilnet.atomic: many processes writing one file at once each succeed and leave one writer's bytes, whole;
with create_exclusive exactly one of them creates it."""

from __future__ import annotations

import multiprocessing

from soilnet.atomic import create_exclusive, write_bytes


def _try(args) -> bool:
    path, k = args
    return create_exclusive(path, f"writer {k}\n".encode() * 1000)


def test_exactly_one_of_many_processes_creates_the_file(tmp_path):
    path = tmp_path / "claim"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        won = pool.map(_try, [(path, k) for k in range(16)])
    assert sum(won) == 1
    k = won.index(True)
    assert path.read_bytes() == f"writer {k}\n".encode() * 1000  # the winner's bytes, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claim"]  # no temporary file left behind
    assert not create_exclusive(path, b"late") and path.read_bytes().startswith(f"writer {k}".encode())


def _write(args) -> None:
    path, k = args
    for _ in range(20):
        write_bytes(path, f"writer {k}\n".encode() * 100_000)


def test_processes_rewriting_one_file_at_once_all_succeed_and_leave_one_writers_bytes_whole(tmp_path):
    """As two Slurm array tasks that finish a pack together both write its manifest: no writer's rename may lose
    its temporary file to another's, and the file is never a mix of two writers."""
    path = tmp_path / "manifest.json"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_write, [(path, k) for k in range(8)])
    data = path.read_bytes()
    assert data == data[: data.index(b"\n") + 1] * 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

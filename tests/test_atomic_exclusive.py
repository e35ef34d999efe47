"""soilnet.atomic.create_exclusive: of many processes creating one file at once, exactly one does, whole."""

from __future__ import annotations

import multiprocessing

from soilnet.atomic import create_exclusive


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

"""predict-map's tiles spread over tasks (soilnet.jobs.map_tasks): 1 task and 2 tasks give the same COG, a kill -9
and a rerun give it too, a truncated tile is recomputed and logged, the last task assembles exactly once, and
tiles of another grid or model are refused naming what differs."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shards.parallel import Workers, workers_from
from soilnet.config.base import ConfigError
from soilnet.evaluate.maps import Grid, MapError, write_tile
from soilnet.jobs.map_tasks import CLAIM, run_tiles, tile_path
from soilnet.jobs.predict_map import predict_map

REPO = Path(__file__).resolve().parents[2]
REGION = {"type": "Polygon", "coordinates": [[[9, 46], [11, 46], [11, 47.5], [9.5, 47.5], [9, 46]]]}
RES, TILE = 20000.0, 3  # 9 tiles of at most 3 x 3 cells (EPSG:3035)


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("region") / "region.geojson"
    feature = {"type": "Feature", "properties": {}, "geometry": REGION}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def run(finetuned_dir, region, out, kit, **kw):
    return predict_map(finetuned_dir, region, RES, out, acquire=kit.field_acquire, tile_size=TILE, **kw)


@pytest.fixture(scope="module")
def single(finetuned_dir, region, kit, tmp_path_factory) -> bytes:
    """The COG of one process doing every tile."""
    out = tmp_path_factory.mktemp("single") / "map.tif"
    summary = run(finetuned_dir, region, out, kit)
    assert summary["assembled"] and summary["new"] == summary["tiles"] >= 6
    return out.read_bytes()


def test_two_tasks_give_the_single_task_cog_and_the_last_one_assembles(finetuned_dir, region, kit, single, tmp_path):
    out = tmp_path / "map.tif"
    first = run(finetuned_dir, region, out, kit, tasks=2, task_id=0)
    assert first["mine_done"] and not first["complete"] and not first["assembled"] and not out.exists()
    second = run(finetuned_dir, region, out, kit, tasks=2, task_id=1)
    assert second["complete"] and second["assembled"]
    assert first["new"] + second["new"] == second["tiles"] and first["new"] == second["new"] + 1
    assert out.read_bytes() == single
    assert (out.parent / "map.tif.parts" / CLAIM).exists()  # the map is assembled once, however late task 0 looks
    # a rerun without task options finds every tile done and assembles again, to the same bytes
    out.unlink()
    again = run(finetuned_dir, region, out, kit)
    assert again["assembled"] and again["new"] == 0 and again["reused"] == again["tiles"]
    assert out.read_bytes() == single


def test_progress_lines_give_tiles_cells_per_s_and_the_eta(finetuned_dir, region, kit, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOILNET_PROGRESS_S", "0")
    run(finetuned_dir, region, tmp_path / "map.tif", kit, tasks=2, task_id=1)
    err = capsys.readouterr().err
    line = r"^predict-map\[1/2\]: 1/4 tiles \(25%\), [\d.e+-]+ tiles/s, ETA \S+, cells \d+ \([\d.]+ cells/s\)$"
    assert re.search(line, err, re.M), err


def test_a_rerun_without_task_options_computes_the_missing_tiles_then_assembles(
    finetuned_dir, region, kit, single, tmp_path
):
    out = tmp_path / "map.tif"
    part = run(finetuned_dir, region, out, kit, tasks=3, task_id=1)
    assert not part["assembled"] and part["new"] == 3
    rest = run(finetuned_dir, region, out, kit)
    assert rest["assembled"] and rest["reused"] == 3 and rest["new"] == rest["tiles"] - 3
    assert out.read_bytes() == single


RUN = """
import sys, time
sys.path.insert(0, {kit_dir!r})
from labelled_kit import field_acquire
from soilnet.jobs.predict_map import predict_map

def acquire(lon, lat):
    time.sleep({delay!r})
    return field_acquire(lon, lat)

predict_map({ft!r}, {region!r}, {res!r}, {out!r}, acquire=acquire, tile_size={tile!r})
"""


def start(finetuned_dir, region, out: Path, delay: float, mpi_ranks: int = 0) -> subprocess.Popen:
    """predict-map in a process of its own, or on ``mpi_ranks`` MPI ranks (predictions in another process may
    differ in the last bits from this one's, so the runs compared here all run in processes of their own, with
    one thread each)."""
    paths = {"kit_dir": str(REPO / "tests/evaluate"), "ft": str(finetuned_dir), "region": str(region)}
    code = RUN.format(**paths, res=RES, out=str(out), tile=TILE, delay=delay)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env["OMP_NUM_THREADS"] = "1"  # mpirun binds a rank to one core; one thread everywhere gives one summation order
    mpi = ["mpirun", "-n", str(mpi_ranks), "--oversubscribe"] if mpi_ranks else []
    return subprocess.Popen([*mpi, sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def test_kill_9_mid_run_then_a_rerun_gives_the_same_cog(finetuned_dir, region, tmp_path):
    finish(start(finetuned_dir, region, tmp_path / "whole.tif", 0.0))
    out = tmp_path / "map.tif"
    proc = start(finetuned_dir, region, out, 0.4)
    parts = out.with_name("map.tif.parts")
    deadline = time.time() + 120
    while len(list(parts.glob("r*_c*.tif"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")[-2000:]
    done = len(list(parts.glob("r*_c*.tif")))
    assert 2 <= done < 9 and not out.exists()
    rerun = start(finetuned_dir, region, out, 0.0)
    finish(rerun)
    assert out.read_bytes() == (tmp_path / "whole.tif").read_bytes()


def test_two_mpi_ranks_give_the_single_process_cog(finetuned_dir, region, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (Debian's openmpi-bin; scripts/setup.sh installs it as root)")
    finish(start(finetuned_dir, region, tmp_path / "whole.tif", 0.0))
    proc = start(finetuned_dir, region, tmp_path / "mpi.tif", 0.0, mpi_ranks=2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    assert "predict-map[0/2]: finished" in err.decode() and "predict-map[1/2]: finished" in err.decode()
    assert (tmp_path / "mpi.tif").read_bytes() == (tmp_path / "whole.tif").read_bytes()


def test_a_truncated_tile_is_recomputed_and_logged(finetuned_dir, region, kit, single, tmp_path, caplog):
    out = tmp_path / "map.tif"
    run(finetuned_dir, region, out, kit)
    out.unlink()
    bad = out.with_name("map.tif.parts") / "r0001_c0001.tif"
    bad.write_bytes(bad.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="soilnet.map_tasks"):
        rerun = run(finetuned_dir, region, out, kit)
    assert rerun["recomputed"] == 1 and rerun["new"] == 1 and rerun["assembled"]
    assert any("r0001_c0001.tif is corrupt or truncated" in r.getMessage() for r in caplog.records)
    assert out.read_bytes() == single


def test_tiles_of_another_grid_or_model_are_refused_naming_what_differs(finetuned_dir, region, kit, tmp_path):
    out = tmp_path / "map.tif"
    run(finetuned_dir, region, out, kit, max_tiles=1)
    with pytest.raises(MapError, match=r"another grid or model \(.*grid\.resolution: 20000\.0 there, 10000\.0 now"):
        predict_map(finetuned_dir, region, 10000.0, out, acquire=kit.field_acquire, tile_size=TILE)
    with pytest.raises(MapError, match=r"another grid or model \(grid\.tile_size: 3 there, 8 now\)"):
        predict_map(finetuned_dir, region, RES, out, acquire=kit.field_acquire, tile_size=8)
    assert len(list(out.with_name("map.tif.parts").glob("r*_c*.tif"))) == 1  # never mixed in


def test_a_map_of_another_grid_or_model_is_never_overwritten(finetuned_dir, region, kit, tmp_path):
    out = tmp_path / "map.tif"
    run(finetuned_dir, region, out, kit)
    before = out.read_bytes()
    (tmp_path / "map.tif.parts").rename(tmp_path / "elsewhere")
    with pytest.raises(MapError, match=r"map of another grid or model \(grid\.tile_size: 3 there, 8 now\)"):
        predict_map(finetuned_dir, region, RES, out, acquire=kit.field_acquire, tile_size=8)
    out.write_bytes(b"not a map")
    with pytest.raises(MapError, match="not a map that records its grid and model"):
        run(finetuned_dir, region, out, kit)
    out.write_bytes(before)
    assert run(finetuned_dir, region, out, kit)["assembled"]  # its own map: recomputed and rewritten
    assert out.read_bytes() == before


def test_task_options_are_checked():
    assert workers_from(3, 2) == Workers(rank=2, world=3, is_array=True)
    for tasks, task_id in ((2, None), (None, 0), (2, 2), (0, 0), (2, -1)):
        with pytest.raises(ConfigError, match="--tasks"):
            workers_from(tasks, task_id)


def test_tasks_finishing_together_assemble_exactly_once(tmp_path):
    """Array tasks cannot wait for each other: all that see every tile done race for the claim; one wins."""
    grid = Grid("EPSG:3035", 4e6, 3e6, 1000.0, 8, 4, 2)
    tiles = grid.tiles()
    assert tiles == [(r, c) for r in range(2) for c in range(4)]
    assembled, errors, together = [], [], threading.Barrier(4)

    def compute(row, col):
        if (row, col) in tiles[-4:]:
            together.wait()  # the four last tiles are finished at the same moment
        write_tile(tmp_path, grid, row, col, np.full((4, 2, 2), row * 10 + col, np.float32))
        return 4, 0

    def task(k):
        try:
            run_tiles(tiles, compute, lambda: assembled.append(k) or {}, tmp_path, Workers(k, 4, is_array=True))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=task, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(assembled) == 1
    assert all(tile_path(tmp_path, t).exists() for t in tiles) and (tmp_path / CLAIM).exists()

"""``soilnet pack`` in a batch log (stderr a file, not a terminal): progress lines with done / total, a rate and
an ETA while it packs, each Slurm array task reporting its own part, and a bad SOILNET_PROGRESS_S named."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs/preprocess/demo.yaml"
LINE = re.compile(r"^(pack\[\d/\d\]): (\d+)/(\d+) samples \(\d+%\), [\d.e+-]+ samples/s, ETA (\d+:\d\d:\d\d|\?)$")


def _pack(out: Path, log: Path, progress_s: str, **env: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "soilnet.cli", "pack", "--config", str(DEMO), f"output_dir={out}"]
    argv += ["sampling.n=40", "shard.max_samples=16"]
    environ = {**os.environ, "SOILNET_PROGRESS_S": progress_s, **env}
    with log.open("w") as stderr:
        return subprocess.run(argv, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_pack_writes_progress_lines_to_a_log(tmp_path):
    log = tmp_path / "slurm.err"
    assert _pack(tmp_path / "out", log, "0").returncode == 0
    lines = log.read_text().splitlines()
    progress = [m for m in map(LINE.match, lines) if m]
    assert [int(m[2]) for m in progress] == list(range(1, 41))  # every sample with SOILNET_PROGRESS_S=0
    assert all(m[1] == "pack[0/1]" and m[3] == "40" for m in progress)
    assert progress[-1][4] != "?"  # a rate, so an ETA
    assert "pack[0/1]: 0/40 samples (0%), started" in lines
    assert any(ln.startswith("pack[0/1]: finished 40/40 samples (100%) in ") for ln in lines)
    assert "\r" not in log.read_text()  # no bar in a log


def test_each_slurm_array_task_reports_its_own_part(tmp_path):
    log = tmp_path / "task1.err"
    array = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    result = _pack(tmp_path / "out", log, "0", SLURM_ARRAY_TASK_ID="1", **array)
    assert result.returncode == 0, log.read_text()
    progress = [m for m in map(LINE.match, log.read_text().splitlines()) if m]
    assert progress and all(m[1] == "pack[1/2]" and m[3] == "16" for m in progress)  # shard 1 of 0, 1, 2


def test_a_bad_interval_is_an_error_naming_the_variable(tmp_path):
    log = tmp_path / "slurm.err"
    assert _pack(tmp_path / "out", log, "often").returncode == 2
    assert "SOILNET_PROGRESS_S='often'" in log.read_text()

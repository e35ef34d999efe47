"""`sbatch --array=... slurm/pack.sh` with arrays whose indices do not start at 0 or step by 1, on the real
two-node test cluster: every shard is written by exactly one task, and the manifest equals one process's."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from shards.pack import pack
from soilnet.config import load_config
from soilnet.config.pack import PackConfig

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
DEMO = "configs/preprocess/demo.yaml"
SETTINGS = ["sampling.n=96", "shard.max_samples=16"]  # six shards
ARRAYS = {"0-6:2": [0, 2, 4, 6], "1,3,5": [1, 3, 5]}


def without_output_dir(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["output_dir"]
    return manifest


def test_arrays_with_a_step_or_a_list_pack_every_shard_once_and_equal_one_process(slurm_cluster, tmp_path):
    single = tmp_path / "single"
    pack(load_config(PackConfig, REPO / DEMO, [f"output_dir={single}", *SETTINGS]))
    logs = tmp_path / "logs"
    logs.mkdir()
    # both arrays at once: seven tasks on two nodes
    jobs = {
        spec: slurm_cluster.sbatch(
            f"--array={spec}",
            f"--output={logs}/%A_%a.out",
            "slurm/pack.sh",
            DEMO,
            f"output_dir={tmp_path / spec}",
            *SETTINGS,
            cwd=REPO,
        )
        for spec in ARRAYS
    }
    for spec, indices in ARRAYS.items():
        out, job = tmp_path / spec, jobs[spec]
        reports = []
        for index in indices:
            state = slurm_cluster.wait(f"{job}_{index}")
            log = (logs / f"{job}_{index}.out").read_text(errors="replace")
            assert state == "COMPLETED", f"--array={spec} task {index}: {state}\n{log}\n{slurm_cluster.logs()}"
            reports += re.findall(r"pack\[(\d+)/(\d+)\]: (\d+) shard\(s\) written, (\d+) already complete", log)
        ranks = sorted(int(rank) for rank, *_ in reports)
        assert ranks == list(range(len(indices))), f"--array={spec}: {reports}"  # one rank per task, none twice
        assert {int(world) for _, world, *_ in reports} == {len(indices)}
        assert sum(int(written) for _, _, written, _ in reports) == 6  # every shard written once, by one task
        assert all(done == "0" for *_, done in reports)
        assert len(list((out / ".parts").glob("*.json"))) == 6
        manifest = json.loads((out / "manifest.json").read_text())
        on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*"))}
        assert on_disk == {s["name"]: s["sha256"] for s in manifest["shards"]}
        assert without_output_dir(out) == without_output_dir(single), f"--array={spec}"

"""One rendezvous: the head node's address is soilnet.rendezvous.head_address, in Python and in slurm/common.sh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from soilnet import rendezvous

FAKE_SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST | scontrol show node NAME -o, as a cluster whose nodes resolve only through NodeAddr
if [ "$2" = hostnames ]; then printf 'nodea\\nnodeb\\n'; exit 0; fi
if [ "$2" = node ] && [ "$3" = nodea ]; then echo "NodeName=nodea NodeAddr=127.0.0.3"; exit 0; fi
exit 1
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A fake ``scontrol`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(FAKE_SCONTROL)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]))
    return bin_dir


@pytest.mark.parametrize(
    "nodelist, first", [("gpu[07-08]", "gpu07"), ("node[01-03,07]", "node01"), ("a,b", "a"), ("solo", "solo")]
)
def test_first_host_without_slurm_reads_the_list(monkeypatch, nodelist, first):
    monkeypatch.setattr(rendezvous, "_scontrol", lambda *args: "")
    assert rendezvous.first_host(nodelist) == first


def test_head_address_is_the_first_nodes_node_addr(fake_slurm, monkeypatch):
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[a-b]")
    assert rendezvous.head_address() == "127.0.0.3"
    assert rendezvous.node_address("nodeb") == "nodeb"  # no NodeAddr and no DNS: the name as given


def test_head_address_outside_slurm_is_none(monkeypatch):
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    assert rendezvous.head_address() is None


def test_the_sbatch_scripts_use_the_same_lookup(fake_slurm, repo_root):
    """slurm/common.sh exports the address head_address gives, and the job's port."""
    env = {
        **os.environ,
        "SLURM_SUBMIT_DIR": str(repo_root),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node[a-b]",
        "DS_ACCELERATOR": "cpu",
    }
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        ["bash", "-c", 'set -euo pipefail; source slurm/common.sh >/dev/null; echo "$MASTER_ADDR $MASTER_PORT"'],
        capture_output=True,
        text=True,
        cwd=repo_root,
        env=env,
        check=True,
    )
    assert proc.stdout.split() == ["127.0.0.3", "20007"]

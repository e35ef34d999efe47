"""launch/ on submitit's local executor: config checked before submission, distributed env mapped per task."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from launch.submit import JobSpec, main
from soilnet.config.pretrain import PretrainConfig

HERE = Path(__file__).resolve().parent


@pytest.fixture
def standin_spec(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(HERE))
    return JobSpec("pretrain", PretrainConfig, "standin:record")


def test_local_cluster_runs_two_tasks_with_the_torch_distributed_env(tmp_path, standin_spec, repo_root, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 3\n")
    rc = main(
        standin_spec,
        [
            "--config",
            str(config),
            "--cluster",
            "local",
            "--tasks-per-node",
            "2",
            "--wait",
            f"output_dir={tmp_path}/run",
        ],
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "submitted job" in printed and "logs in" in printed
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"} and [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1
    assert ranks[0]["MASTER_ADDR"][0].isdigit()  # an IP, not a host name
    assert ranks[0]["steps"] == 3  # the config reached the task


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["--config", "{config}", "train.stepz=3"], "unknown key 'train.stepz'"),
        (["--config", "{config}", "train.steps=many"], "train.steps"),
    ],
)
def test_bad_config_fails_before_submission(tmp_path, standin_spec, capsys, argv, message):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = [a.replace("{config}", str(config)) for a in argv]
    rc = main(standin_spec, [*argv, "--cluster", "local", f"output_dir={tmp_path}/run"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was submitted


@pytest.mark.slow
def test_launcher_modules_have_help(repo_root):
    import subprocess

    for job in ("pretrain", "finetune", "pack"):
        proc = subprocess.run(
            [sys.executable, "-m", f"launch.{job}", "--help"], capture_output=True, text=True, cwd=repo_root
        )
        assert proc.returncode == 0 and "--tasks-per-node" in proc.stdout

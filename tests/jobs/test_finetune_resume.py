"""Fine-tuning stopped by a signal (Slurm's ``--signal=USR2@120``, ``scancel``, preemption) or killed resumes to
the very result of an uninterrupted run.

Every run is the real ``python -m soilnet.cli finetune`` on the demo config, as a subprocess that gets a real
signal once fold 0 has finished and fold 1 has written an epoch checkpoint, i.e. in the middle of fold 1. The
resumed run must skip fold 0, continue fold 1 from its checkpoint, and write the same metrics.json,
predictions.csv (byte for byte) and model weights as a run that was never interrupted. Data-parallel runs
(two ranks through DeepSpeed on gloo) signal one rank only: both must stop after the same step.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from soilnet.config.base import ConfigError, load_config
from soilnet.config.finetune import FinetuneConfig
from soilnet.train.resume import ResumeStore, config_differences

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "finetune" / "demo.yaml"
FINETUNE = [sys.executable, "-m", "soilnet.cli", "finetune", "--config", str(DEMO)]
# 2 folds of 12 epochs (no early stop) plus the final model on 120 points: a few seconds per run, long enough
# that the signal lands inside fold 1
SMALL = [
    "train.threads=1",
    "train.epochs=12",
    "train.patience=12",
    "train.batch_size=16",
    "train.lr=3e-3",
    "eval.split.folds=2",
    "eval.split.block_km=150",
    "eval.split.buffer_km=20",
    "eval.baseline.n_estimators=10",
    "eval.plots=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int | None = None, world: int = 1, port: int = 0) -> dict[str, str]:
    """This environment without any rank of its own, plus ``rank`` of ``world`` when given."""
    placement = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    env = {k: v for k, v in os.environ.items() if k not in placement}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if rank is not None:
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    return env


def _start(shards: Path, out: Path, log: Path, env: dict, *extra: str) -> subprocess.Popen:
    args = [*FINETUNE, f"data.shards={shards}", f"output_dir={out}", *SMALL, *extra]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _runs(shards: Path, outs: list[Path], world: int = 1, *extra: str) -> list[subprocess.Popen]:
    """One run (``world`` 1) or the ranks of one data-parallel run, rank r writing into ``outs[r]``."""
    if world == 1:
        return [_start(shards, outs[0], Path(f"{outs[0]}.log"), _env(), *extra)]
    port = _free_port()
    return [_start(shards, outs[r], Path(f"{outs[r]}.log"), _env(r, world, port), *extra) for r in range(world)]


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    return [p.wait(timeout=300) for p in procs]


def _log(out: Path) -> str:
    return Path(f"{out}.log").read_text(errors="replace")


def _interrupt_in_fold_1(procs: list[subprocess.Popen], out: Path, signum: int, target: int = 0) -> None:
    """Send ``signum`` to ``procs[target]`` once ``out`` holds fold 1's first epoch checkpoint."""
    deadline = time.time() + 240
    while not (out / "checkpoints" / "fold_1.pt").is_file():
        assert time.time() < deadline and all(p.poll() is None for p in procs), _log(out)
        time.sleep(0.01)
    os.kill(procs[target].pid, signum)


def _model(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of a model.safetensors (its header's key order varies between writes)."""
    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), dict(f.metadata())


def _same_outputs(got: Path, want: Path) -> None:
    for name in ("metrics.json", "predictions.csv"):
        a, b = (got / name).read_bytes(), (want / name).read_bytes()
        if name == "metrics.json":  # the final model's path names the output_dir
            a, b = a.replace(str(got).encode(), b"OUT"), b.replace(str(want).encode(), b"OUT")
        assert a == b, f"{name} differs from the uninterrupted run's"
    (tensors, meta), (ref_tensors, ref_meta) = _model(got / "model.safetensors"), _model(want / "model.safetensors")
    assert meta == ref_meta and tensors.keys() == ref_tensors.keys()
    for k, v in ref_tensors.items():
        assert torch.equal(tensors[k], v), f"model.safetensors: {k} differs from the uninterrupted run's"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, kit) -> Path:
    return kit.write_shards(tmp_path_factory.mktemp("ft_resume") / "shards", n=120, seed=3, max_samples=40)


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> dict[int, Path]:
    """Reference runs, never interrupted: one process (key 1) and two ranks (key 2; rank 0's output_dir)."""
    root = tmp_path_factory.mktemp("ft_reference")
    single, rank0, rank1 = root / "single", root / "rank0", root / "rank1"
    procs = _runs(shards, [single]) + _runs(shards, [rank0, rank1], 2)
    codes = _wait(procs)
    for out, code in zip((single, rank0, rank1), codes, strict=True):
        assert code == 0, _log(out)[-4000:]
    assert not (single / "checkpoints").exists()  # removed once the run has written its metrics
    return {1: single, 2: rank0}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_signal_mid_fold_exits_75_and_the_rerun_ends_as_the_uninterrupted_run(signum, shards, uninterrupted, tmp_path):
    out = tmp_path / "run"
    procs = _runs(shards, [out])
    _interrupt_in_fold_1(procs, out, signum)
    assert _wait(procs) == [75], _log(out)
    assert "stopped on a signal at fold 1 epoch" in _log(out)
    assert not (out / "metrics.json").exists()
    ck = out / "checkpoints"
    fold0 = torch.load(ck / "fold_0.pt", weights_only=True)
    fold1 = torch.load(ck / "fold_1.pt", weights_only=True)
    assert fold0["kind"] == "results" and fold1["kind"] == "training" and not fold1["finished"]

    assert _wait(_runs(shards, [out])) == [0], _log(out)
    log = _log(out)
    assert "fold 0: finished before" in log and f"fold 1: resumed at epoch {fold1['epoch']}" in log
    _same_outputs(out, uninterrupted[1])
    assert not ck.exists()


@pytest.mark.slow
def test_kill_minus_9_mid_fold_reruns_to_the_same_result(shards, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    procs = _runs(shards, [out])
    _interrupt_in_fold_1(procs, out, signal.SIGKILL)
    assert _wait(procs) == [-signal.SIGKILL]
    assert _wait(_runs(shards, [out])) == [0], _log(out)
    assert "fold 1: resumed at epoch" in _log(out)
    _same_outputs(out, uninterrupted[1])


@pytest.mark.slow
def test_resuming_under_another_config_is_refused_naming_the_key(shards, tmp_path):
    out = tmp_path / "changed"
    procs = _runs(shards, [out])
    _interrupt_in_fold_1(procs, out, signal.SIGUSR2)
    assert _wait(procs) == [75], _log(out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    config = (out / "config.yaml").read_bytes()
    assert _wait(_runs(shards, [out], 1, "train.lr=0.01")) == [2]
    log = _log(out)
    assert "holds the checkpoints of an interrupted run with another config: train.lr: 0.003 then, 0.01 now" in log
    # nothing the interrupted run wrote has changed
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
    assert (out / "config.yaml").read_bytes() == config


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_is_signalled_and_resume_to_the_uninterrupted_result(
    shards, uninterrupted, tmp_path
):
    """Only rank 1 gets the signal; both stop after the same step. Rank 1 has its own output_dir, which must stay
    empty: rank 0 alone writes and reads the checkpoints and hands them to rank 1."""
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    procs = _runs(shards, [rank0, rank1], 2)
    _interrupt_in_fold_1(procs, rank0, signal.SIGUSR2, target=1)
    assert _wait(procs) == [75, 75], _log(rank0)[-3000:] + _log(rank1)[-3000:]
    lines = [line for out in (rank0, rank1) for line in _log(out).splitlines() if "stopped on a signal at" in line]
    where = [line.split("stopped on a signal at ")[1].split(" after")[0] for line in lines]
    assert len(where) == 2 and where[0] == where[1], where
    assert not rank1.exists()

    assert _wait(_runs(shards, [rank0, rank1], 2)) == [0, 0], _log(rank0)[-3000:] + _log(rank1)[-3000:]
    assert "fold 1: resumed at epoch" in _log(rank0)
    assert not rank1.exists()
    _same_outputs(rank0, uninterrupted[2])


def test_config_differences_name_each_dotted_key():
    saved = {"output_dir": "a", "train": {"lr": 0.001, "epochs": 3}, "eval": {"split": {"folds": 5}}}
    now = {"output_dir": "b", "train": {"lr": 0.002, "epochs": 3}, "eval": {"split": {"folds": 5, "seed": 1}}}
    assert config_differences(saved, now) == [
        'eval.split.seed: "(absent)" then, 1 now',
        "train.lr: 0.001 then, 0.002 now",
    ]
    assert config_differences(saved, saved) == []


def test_a_run_that_saved_nothing_does_not_block_a_corrected_config(tmp_path):
    """A run that failed on bad input before its first epoch leaves only its config: the next run may differ."""

    def cfg(*extra):
        return load_config(FinetuneConfig, None, [f"output_dir={tmp_path}", *extra])

    ResumeStore.open(cfg("eval.split.folds=10"), tmp_path, None)  # say it failed: too few points per fold
    store = ResumeStore.open(cfg("eval.split.folds=5"), tmp_path, None)
    store.save("fold_0", {"kind": "training", "order": torch.arange(3)})
    assert torch.equal(store.load("fold_0")["order"], torch.arange(3))
    with pytest.raises(ConfigError, match=r"eval.split.folds: 5 then, 10 now"):
        ResumeStore.open(cfg("eval.split.folds=10"), tmp_path, None)
    store.clear()
    ResumeStore.open(cfg("eval.split.folds=10"), tmp_path, None)

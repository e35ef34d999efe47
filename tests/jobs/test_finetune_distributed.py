"""Data-parallel fine-tuning: two ranks through DeepSpeed (CPU, gloo) train the same model as one process.

Ranks are started as plain processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, as torchrun,
``launch/`` or ``srun`` (through soilnet.distributed) set them. Each run is the real ``soilnet finetune`` on the
demo config with small overrides.

The main model here has no batch statistics and no dropout (``vit_tiny`` with ``p=attn_p=0`` and the GRU climate
encoder): then the two ranks' update, computed from their halves of each global batch with the loss taken over
the gathered global batch, equals the single process's up to float rounding, and so do the weights after every
epoch, the validation scores, the early-stopping epoch and the saved model.

The demo's own image encoder has batch norm. On CPUs each rank normalises with its own half-batch's statistics
(torch's SyncBatchNorm, which the job uses on GPUs, needs GPUs), so that run is a different, equally valid
optimisation: its weights differ from the single process's by more than rounding, and the test asserts only that
it completes, writes once, and scores close to the single process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "finetune" / "demo.yaml"
FINETUNE = [sys.executable, "-m", "soilnet.cli", "finetune", "--config", str(DEMO)]
WORLD = 2

# A model without batch statistics or dropout (see the module docstring), nor a qkv bias: the key bias has an
# analytically zero gradient, whose float-rounding noise Adam would scale into lr-sized steps that differ between
# any two summation orders. 3 epochs of 2 folds plus the final model on 120 points keep each process to seconds.
SMALL = [
    "train.threads=1",
    "train.epochs=3",
    "train.patience=3",
    "train.batch_size=16",
    "train.lr=3e-3",
    "model.image_encoder={name: vit_tiny, kwargs: {p: 0.0, attn_p: 0.0, qkv_bias: false, dim: 16, depth: 1, out: 16}}",
    "model.climate_encoder={name: tiny_gru, kwargs: {out: 16, hidden: 16}}",
    "eval.split.folds=2",
    "eval.split.block_km=150",
    "eval.split.buffer_km=20",
    "eval.baseline.n_estimators=10",
]
# The demo's model (tiny CNN with batch norm, GRU), without plots.
SMALL_BN = [*(o for o in SMALL if not o.startswith("model.")), "eval.plots=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """This environment without any rank of its own (a test run inside a Slurm job or torchrun has one)."""
    placement = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    env = {k: v for k, v in os.environ.items() if k not in placement}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def _start(shards: Path, out: Path, log: Path, env: dict[str, str], overrides: list[str]) -> subprocess.Popen:
    args = [*FINETUNE, f"data.shards={shards}", f"output_dir={out}", *overrides]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _rank_env(rank: int, port: str) -> dict[str, str]:
    return _env(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kit):
    """One process and two ranks on the same shards, for the model without batch statistics (``single``,
    ``rank0``, ``rank1``) and for the demo's batch-norm model (``bn_single``, ``bn_rank0``, ``bn_rank1``), all at
    once. Each rank is given its own output_dir, so that anything rank 1 wrote would show."""
    root = tmp_path_factory.mktemp("ft_dist")
    shards = kit.write_shards(root / "shards", n=120, seed=3, max_samples=40)
    procs = {}
    for prefix, extra in (("", SMALL), ("bn_", SMALL_BN)):
        port = str(_free_port())
        procs[f"{prefix}single"] = _start(shards, root / f"{prefix}single", root / f"{prefix}single.log", _env(), extra)
        for r in range(WORLD):
            name = f"{prefix}rank{r}"
            procs[name] = _start(shards, root / name, root / f"{name}.log", _rank_env(r, port), extra)
    codes = {name: p.wait(timeout=300) for name, p in procs.items()}
    logs = {name: (root / f"{name}.log").read_text(errors="replace") for name in procs}
    for name, code in codes.items():
        assert code == 0, f"{name} exited {code}:\n{logs[name][-4000:]}"
    return root, logs


@pytest.mark.slow
def test_only_rank_0_writes(runs):
    root, logs = runs
    for prefix in ("", "bn_"):
        assert not (root / f"{prefix}rank1").exists(), sorted(p.name for p in (root / f"{prefix}rank1").iterdir())
        written = {p.name for p in (root / f"{prefix}rank0").iterdir()}
        assert written == {p.name for p in (root / f"{prefix}single").iterdir()}
        assert {"metrics.json", "report.md", "model.safetensors", "config.yaml", "predictions.csv"} <= written
        assert "soilnet finetune: metrics" in logs[f"{prefix}rank0"]
        assert "soilnet finetune: metrics" not in logs[f"{prefix}rank1"]
    assert "learning_curves.png" in {p.name for p in (root / "rank0").iterdir()}


@pytest.mark.slow
def test_two_ranks_train_the_single_process_model(runs):
    """Same global batches, same updates: the saved weights, the chosen epochs and the scores agree."""
    root, logs = runs
    assert "data parallel: DeepSpeed ZeRO stage 0 on 2 ranks (gloo)" in logs["rank0"]
    single = load_file(str(root / "single" / "model.safetensors"))
    parallel = load_file(str(root / "rank0" / "model.safetensors"))
    assert single.keys() == parallel.keys()
    for name, w in single.items():
        torch.testing.assert_close(parallel[name], w, rtol=1e-4, atol=1e-5, msg=f"{name} differs")

    m1 = json.loads((root / "single" / "metrics.json").read_text())
    m2 = json.loads((root / "rank0" / "metrics.json").read_text())
    assert [f["best_epoch"] for f in m1["folds"]] == [f["best_epoch"] for f in m2["folds"]]
    assert m1["final_model"]["best_epoch"] == m2["final_model"]["best_epoch"]
    for key in ("rmse", "r2", "n"):
        assert m2["model"][key] == pytest.approx(m1["model"][key], rel=1e-4)


@pytest.mark.slow
def test_batch_norm_model_trains_on_two_ranks_close_to_one(runs):
    """Per-rank batch statistics on CPUs (module docstring): the same folds and points, a close score."""
    root, logs = runs
    m1 = json.loads((root / "bn_single" / "metrics.json").read_text())
    m2 = json.loads((root / "bn_rank0" / "metrics.json").read_text())
    assert m2["model"]["n"] == m1["model"]["n"] == 120
    assert [f["n_train"] for f in m2["folds"]] == [f["n_train"] for f in m1["folds"]]
    assert m2["model"]["rmse"] == pytest.approx(m1["model"]["rmse"], rel=0.1)

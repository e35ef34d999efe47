"""Data-parallel fine-tuning: two ranks through DeepSpeed (CPU, gloo) train the same model as one process.

Ranks are started as plain processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, as torchrun,
``launch/`` or ``srun`` (through soilnet.distributed) set them. Each run is the real ``soilnet finetune`` on the
demo config with small overrides.

The model here has no batch statistics and no dropout (``vit_tiny`` with ``p=0`` and the GRU climate encoder):
then the two ranks' update, computed from their halves of each global batch with the loss taken over the
gathered global batch, equals the single process's up to float rounding, and so do the weights after every
epoch, the validation scores, the early-stopping epoch and the saved model. With batch norm on CPUs, each rank
would normalise with its own half-batch's statistics (torch's SyncBatchNorm needs GPUs), so the weights would
only be close; that case is not asserted here.
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
    "model.image_encoder={name: vit_tiny, kwargs: {p: 0.0, qkv_bias: false, dim: 16, depth: 1, out: 16}}",
    "model.climate_encoder={name: tiny_gru, kwargs: {out: 16, hidden: 16}}",
    "eval.split.folds=2",
    "eval.split.block_km=150",
    "eval.split.buffer_km=20",
    "eval.baseline.n_estimators=10",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def _start(shards: Path, out: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "soilnet.cli", "finetune", "--config", str(DEMO), f"data.shards={shards}",
            f"output_dir={out}", *SMALL]  # fmt: skip
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kit):
    """One process and two ranks on the same shards; each rank is given its own output_dir, so that anything
    rank 1 wrote would show."""
    root = tmp_path_factory.mktemp("ft_dist")
    shards = kit.write_shards(root / "shards", n=120, seed=3, max_samples=40)
    port = str(_free_port())
    procs = {
        "single": _start(shards, root / "single", root / "single.log", _env()),
        **{
            f"rank{r}": _start(
                shards,
                root / f"rank{r}",
                root / f"rank{r}.log",
                _env(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            )
            for r in range(WORLD)
        },
    }
    codes = {name: p.wait(timeout=300) for name, p in procs.items()}
    logs = {name: (root / f"{name}.log").read_text(errors="replace") for name in procs}
    return root, codes, logs


def test_every_process_exits_cleanly(runs):
    root, codes, logs = runs
    for name, code in codes.items():
        assert code == 0, f"{name} exited {code}:\n{logs[name][-4000:]}"


def test_only_rank_0_writes(runs):
    root, codes, logs = runs
    assert codes == {"single": 0, "rank0": 0, "rank1": 0}
    assert not (root / "rank1").exists(), sorted(p.name for p in (root / "rank1").iterdir())
    written = {p.name for p in (root / "rank0").iterdir()}
    assert written == {p.name for p in (root / "single").iterdir()}
    assert {"metrics.json", "report.md", "model.safetensors", "config.yaml", "predictions.csv"} <= written
    assert "soilnet finetune: metrics" in logs["rank0"] and "soilnet finetune: metrics" not in logs["rank1"]


def test_two_ranks_train_the_single_process_model(runs):
    """Same global batches, same updates: the saved weights, the chosen epochs and the scores agree."""
    root, codes, logs = runs
    assert codes == {"single": 0, "rank0": 0, "rank1": 0}
    assert "DeepSpeed" in logs["rank0"] or "deepspeed" in logs["rank0"]  # the two ranks ran through DeepSpeed
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

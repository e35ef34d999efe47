"""Fine-tuning on CUDA through the real ``soilnet finetune``: on one GPU, and data parallel on two GPUs with
SyncBatchNorm.

Reuses the CPU tests' labelled shards and the demo's batch-norm model settings (tests/jobs/
test_finetune_distributed.py). On CPUs each rank normalises with its own half-batch; on GPUs the job converts the
batch norms to SyncBatchNorm, which normalises with the whole global batch's statistics, as one process does: so
the two ranks train the single GPU's model up to float rounding, which the CPU run cannot.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from gpu_kit import gpu_env, needs_cuda, needs_gpus
from pretrain_kit import free_port
from safetensors.torch import load_file
from test_finetune_distributed import FINETUNE, SMALL_BN

pytestmark = [pytest.mark.gpu, needs_cuda]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def labelled(kit, tmp_path_factory) -> Path:
    return kit.write_shards(tmp_path_factory.mktemp("ft_gpu") / "shards", n=120, seed=3, max_samples=40)


def finetune(shards: Path, out: Path, world: int = 1) -> list[str]:
    """``soilnet finetune`` (the demo config, the batch-norm model) on ``world`` GPUs, each rank in its own
    output folder ``out/rank<r>``; the ranks' logs, after asserting that they all exit 0."""
    port = str(free_port())
    procs, logs = [], [out / f"rank{r}.log" for r in range(world)]
    out.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        ranks = {} if world == 1 else {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)}
        env = gpu_env(**ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        args = [*FINETUNE, f"data.shards={shards}", f"output_dir={out / f'rank{r}'}", "train.device=cuda", *SMALL_BN]
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=open(logs[r], "wb"), stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    texts = [f.read_text(errors="replace") for f in logs]
    assert codes == [0] * world, [t[-3000:] for t in texts]
    return texts


def test_finetune_on_one_gpu_scores_every_point(labelled, tmp_path):
    finetune(labelled, tmp_path / "single")
    metrics = json.loads((tmp_path / "single" / "rank0" / "metrics.json").read_text())
    assert metrics["model"]["n"] == 120
    assert (tmp_path / "single" / "rank0" / "model.safetensors").is_file()


@needs_gpus(2)
def test_two_gpu_ranks_with_syncbatchnorm_train_the_single_gpu_model(labelled, tmp_path):
    finetune(labelled, tmp_path / "single")
    logs = finetune(labelled, tmp_path / "pair", world=2)
    assert "data parallel: DeepSpeed ZeRO stage 0 on 2 ranks (nccl)" in logs[0]
    single = load_file(str(tmp_path / "single" / "rank0" / "model.safetensors"))
    pair = load_file(str(tmp_path / "pair" / "rank0" / "model.safetensors"))
    assert single.keys() == pair.keys()
    for name, w in single.items():  # batch norms' running statistics included
        torch.testing.assert_close(pair[name], w, rtol=1e-3, atol=1e-4, msg=f"{name} differs")
    m1 = json.loads((tmp_path / "single" / "rank0" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "pair" / "rank0" / "metrics.json").read_text())
    assert [f["best_epoch"] for f in m1["folds"]] == [f["best_epoch"] for f in m2["folds"]]

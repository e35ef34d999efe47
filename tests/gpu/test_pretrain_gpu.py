"""Pretraining on CUDA through the real ``soilnet pretrain`` (DeepSpeed, nccl), one process per GPU: bf16 steps
under ZeRO stages 1 and 2 with a finite, falling loss; every visible GPU in one nccl group; and exact resume after
a stop.

The runs reuse the CPU tests' kit (tests/train/pretrain_kit.py: the demo config, its shards, sample-id logs) with
the CUDA accelerator and the nccl backend instead of gloo.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from gpu_kit import gpu_env, needs_cuda, visible_gpus
from pretrain_kit import free_port, pretrain_command
from toymodels import FLAT

from soilnet.data.order import batch_ids

pytestmark = [pytest.mark.gpu, needs_cuda]
REPO = Path(__file__).resolve().parents[2]
TOYMODELS = REPO / "tests" / "train" / "toymodels.py"
DETERMINISTIC = Path(__file__).with_name("deterministic_entry.py")


def launch(out: Path, shards: Path, world: int, *overrides: str, entry: list[str] | None = None) -> list[int]:
    """``soilnet pretrain`` on ``world`` processes, rank r on GPU r (``LOCAL_RANK``), nccl; their exit codes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    args = pretrain_command(entry or ["-m", "soilnet.cli"], out, shards, "distributed.backend=nccl", *overrides)
    procs = []
    for r in range(world):
        env = gpu_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(out.parent / f"{out.name}.rank{r}.log", "ab")
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return [p.wait(timeout=300) for p in procs]


def log_of(out: Path, rank: int = 0) -> str:
    return (out.parent / f"{out.name}.rank{rank}.log").read_text(errors="replace")[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def model_states(out: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the model and loss (buffers included) at ``tag`` (default: latest)."""
    tag = tag or (out / "checkpoints" / "latest").read_text().strip()
    path = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def sample_sequence(out: Path) -> list[list[int]]:
    return [json.loads(ln)["ids"] for ln in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_steps_under_zero_stage_give_a_finite_falling_loss(stage, shards, tmp_path):
    out = tmp_path / "run"
    steps = 16
    overrides = ("train.precision=bf16", f"deepspeed.zero_optimization.stage={stage}", f"train.steps={steps}")
    assert launch(out, shards, 1, "train.global_batch_size=16", *overrides) == [0], log_of(out)
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-4:]) < sum(losses[:4]), losses  # the mean of the last 4 steps under that of the first 4
    weights = [t for t in model_states(out).values() if t.is_floating_point()]
    assert weights and all(t.dtype == torch.bfloat16 for t in weights)  # DeepSpeed's bf16 module, not fp32
    meta = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "soilnet.json").read_text())
    assert meta["zero_stage"] == stage


def test_one_process_per_visible_gpu_steps_in_one_nccl_group(shards, tmp_path):
    """Every visible GPU (up to 8) runs a rank; they share each global batch and write one checkpoint."""
    world = min(visible_gpus(), 8)
    batch = 16 if 16 % world == 0 else 4 * world
    out = tmp_path / "run"
    codes = launch(out, shards, world, f"train.global_batch_size={batch}", "train.steps=3")
    assert codes == [0] * world, "\n".join(log_of(out, r) for r in range(world))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["samples_per_s_per_device"] == pytest.approx(rows[-1]["samples_per_s"] / world)
    ck = out / "checkpoints" / "step_00000003"
    assert {f"rng_rank{r}.pt" for r in range(world)} <= {f.name for f in ck.iterdir()}
    assert json.loads((ck / "soilnet.json").read_text())["world_size"] == world
    seed = json.loads((ck / "soilnet.json").read_text())["loader"]["seed"]
    assert sample_sequence(out) == [batch_ids(seed, 64, batch, k).tolist() for k in range(3)]  # the global order


def test_resume_after_a_kill_on_the_gpu_is_exact(shards, tmp_path):
    """6 steps straight, against a run killed (SIGKILL) after step 5 and rerun from its checkpoint at step 3:
    the same global sample sequence and bitwise the same weights and buffers. Both run under deterministic
    algorithms (tests/gpu/deterministic_entry.py), so that what differs is the resume and not atomics in a kernel."""
    entry = [str(DETERMINISTIC)]
    common = ("train.global_batch_size=16", "train.steps=6", *FLAT)
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert launch(straight, shards, 1, *common, entry=entry) == [0], log_of(straight)
    assert launch(out, shards, 1, *common, "debug.sigkill_after_step=5", entry=entry) == [-signal.SIGKILL]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"  # step 5's work is lost, 3 stands
    assert launch(out, shards, 1, *common, entry=entry) == [0], log_of(out)
    full_log = (out.parent / f"{out.name}.rank0.log").read_text(errors="replace")
    assert f"resumed from {out / 'checkpoints' / 'step_00000003'} at step 3" in full_log, log_of(out)
    assert sample_sequence(out) == sample_sequence(straight)
    a, b = model_states(out), model_states(straight)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(a[k], model_states(out, "step_00000003")[k]) for k in a)  # the resumed steps trained

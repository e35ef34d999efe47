"""Pretraining end to end on real DeepSpeed (CPU, gloo): exact resume after kill -9, resume on another world size
through a universal checkpoint, preemption by signal, export.

Ranks are started as plain processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, as torchrun or the
launcher sets them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_kit import children, cpu_env, free_port, pretrain_command
from safetensors import safe_open
from toymodels import FLAT

from soilnet.config.base import ConfigError
from soilnet.config.pretrain import PretrainConfig
from soilnet.data import BatchSizeError
from soilnet.data.order import batch_ids
from soilnet.train.checkpoint import CheckpointRef
from soilnet.train.export import encoder_state, export
from soilnet.train.pretrain import accumulation_steps, engine_config, micro_batch_size

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]
STEPS = 6  # 2N with N = 3; the demo checkpoints every 3 steps


def start(out: Path, shards: Path, world: int, *overrides: str, flat: bool = False) -> list[subprocess.Popen]:
    """``soilnet pretrain`` on ``world`` ranks; ``flat``: with the BatchNorm-free test encoder (toymodels.py)."""
    port = str(free_port())
    entry = [str(Path(__file__).parent / "toymodels.py")] if flat else ["-m", "soilnet.cli"]
    overrides = (*FLAT, *overrides) if flat else overrides
    args = pretrain_command(entry, out, shards, f"train.steps={STEPS}", "train.global_batch_size=16", *overrides)
    procs = []
    for r in range(world):
        env = cpu_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(out.parent / f"{out.name}.rank{r}.log", "ab")
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], out: Path) -> list[int]:
    codes = [p.wait(timeout=240) for p in procs]
    return codes


def run(out: Path, shards: Path, world: int, *overrides: str, flat: bool = False) -> list[int]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return wait(start(out, shards, world, *overrides, flat=flat), out)


def log_of(out: Path, rank: int = 0) -> str:
    return (out.parent / f"{out.name}.rank{rank}.log").read_text(errors="replace")[-3000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    tag = (out / "checkpoints" / "latest").read_text().strip()

    state, _ = encoder_state(out / "checkpoints" / tag)
    return state


def weights_at(out: Path, tag: str) -> dict[str, torch.Tensor]:

    return encoder_state(out / "checkpoints" / tag)[0]


def sample_sequence(out: Path) -> list[list[int]]:
    rows = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["ids"] for r in rows]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    """2N steps on 2 ranks without interruption (ZeRO stage 1, the demo's)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    codes = run(out, shards, 2, "train.tensorboard=true")
    assert codes == [0, 0], log_of(out)
    return out


def test_straight_run_writes_checkpoints_config_metrics_and_plot(straight):
    ck = straight / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000006"
    assert sorted(d.name for d in ck.iterdir() if d.is_dir()) == ["step_00000003", "step_00000006"]
    meta = json.loads((ck / "step_00000006" / "soilnet.json").read_text())
    assert meta["step"] == 6 and meta["samples"] == 6 * 16 and meta["world_size"] == 2
    assert meta["loader"]["samples_seen"] == 96 and meta["config"]["output_dir"] == str(straight)
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {f.name for f in (ck / "step_00000006").iterdir()}
    assert (straight / "config.yaml").is_file() and (straight / "loss.png").is_file()
    assert any((straight / "tensorboard").iterdir())
    rec = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == list(range(1, 7))
    assert {
        "loss",
        "lr",
        "samples_per_s",
        "samples_per_s_per_device",
        "data_wait_fraction",
        "top1",
        "top5",
        "mean_positive_rank",
        "embedding_std",
    } <= rec[-1].keys()
    seq = sample_sequence(straight)
    assert sorted(i for ids in seq[:4] for i in ids) == list(range(64))  # epoch 0: every sample once


@pytest.mark.slow
def test_kill_minus_9_then_resume_is_bitwise_identical(straight, shards, tmp_path):
    out = tmp_path / "run"
    codes = run(out, shards, 2, "debug.sigkill_after_step=5")
    assert -signal.SIGKILL in codes, log_of(out)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"  # step 5's work is lost, 3 stands
    assert run(out, shards, 2) == [0, 0], log_of(out)
    assert sample_sequence(out) == sample_sequence(straight)
    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_a = torch.load(out / "checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=False)["module"]
    full_b = torch.load(straight / "checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)


@pytest.fixture(scope="module")
def straight_flat(shards, tmp_path_factory) -> Path:
    """2N steps on 2 ranks with the BatchNorm-free encoder."""
    out = tmp_path_factory.mktemp("straight-flat") / "run"
    assert run(out, shards, 2, flat=True) == [0, 0], log_of(out)
    return out


def resume_from_step_3(source: Path, out: Path) -> None:
    shutil.copytree(source, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    (out / "checkpoints" / "latest").write_text("step_00000003")


@pytest.mark.slow
def test_world_size_change_2_to_1_converts_to_universal_and_continues_the_sequence(straight_flat, shards, tmp_path):
    out = tmp_path / "run"
    resume_from_step_3(straight_flat, out)
    assert run(out, shards, 1, flat=True) == [0], log_of(out)
    assert (out / "checkpoints" / "step_00000003.universal" / "zero").is_dir()  # converted, not started afresh
    meta = json.loads((out / "checkpoints" / "step_00000006" / "soilnet.json").read_text())
    assert meta["world_size"] == 1
    assert sample_sequence(out) == sample_sequence(straight_flat)
    a, b = weights(out), weights(straight_flat)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.slow
def test_world_size_change_1_to_2_continues_the_same_run(straight_flat, shards, tmp_path):
    one = tmp_path / "one"
    # 1 rank runs 4 of the 6 steps in micro-batches of 8 (as 2 ranks do) and dies (its checkpoint at 3 stands),
    # then 2 ranks continue the run
    assert run(one, shards, 1, "debug.sigkill_after_step=4", "train.micro_batch_size=8", flat=True) != [0]
    assert (one / "checkpoints" / "latest").read_text() == "step_00000003"
    assert run(one, shards, 2, flat=True) == [0, 0], log_of(one)
    assert (one / "checkpoints" / "step_00000003.universal" / "zero").is_dir()
    assert sample_sequence(one) == sample_sequence(straight_flat)
    a, b = weights(one), weights(straight_flat)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.slow
def test_world_size_change_under_zero_stage_0_loads_the_checkpoint_as_it_is_and_continues(shards, tmp_path):
    """ZeRO stage 0 (LARS needs it): every rank holds the whole model and optimizer state, which DeepSpeed writes
    once (``mp_rank_00_model_states.pt``), so a checkpoint loads on another world size (2 -> 1, 1 -> 2) without
    conversion. Losing the LARS momentum on the way would move the weights by ~4e-4, far outside the tolerance."""
    lars = ("train.optimizer=lars", "deepspeed.zero_optimization.stage=0")
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert run(straight, shards, 2, *lars, flat=True) == [0, 0], log_of(straight)
    assert not list((straight / "checkpoints" / "step_00000003").glob("zero_pp_rank_*"))  # no partitions
    resume_from_step_3(straight, out)
    # a ZeRO-1 run cannot take over a stage-0 checkpoint: refused by name before anything is loaded
    assert run(out, shards, 1, "deepspeed.zero_optimization.stage=1", flat=True) == [2]
    assert "was written under deepspeed.zero_optimization.stage=0, this run asks for stage 1" in log_of(out)
    assert run(out, shards, 1, *lars, flat=True) == [0], log_of(out)
    assert not (out / "checkpoints" / "step_00000003.universal").exists()
    meta = json.loads((out / "checkpoints" / "step_00000006" / "soilnet.json").read_text())
    assert meta["world_size"] == 1 and meta["zero_stage"] == 0
    assert sample_sequence(out) == sample_sequence(straight)
    a, b = weights(out), weights(straight)
    fresh = weights_at(out, "step_00000003")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # the resumed steps did train

    # 1 -> 2: one rank dies after step 4 (its checkpoint at 3 stands), two ranks both read the one state file
    one = tmp_path / "one"
    assert run(one, shards, 1, *lars, "debug.sigkill_after_step=4", "train.micro_batch_size=8", flat=True) != [0]
    assert run(one, shards, 2, *lars, flat=True) == [0, 0], log_of(one)
    assert not (one / "checkpoints" / "step_00000003.universal").exists()
    assert sample_sequence(one) == sample_sequence(straight)
    c = weights(one)
    for k in c:
        assert torch.allclose(c[k], b[k], atol=1e-5, rtol=1e-4), (k, float((c[k] - b[k]).abs().max()))


def full_state(out: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the model and loss, buffers (BatchNorm statistics) included, at ``tag`` (default latest)."""
    tag = tag or (out / "checkpoints" / "latest").read_text().strip()
    path = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def assert_same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-3) -> None:
    """||a - b|| / ||b|| <= tol for every tensor (b the reference)."""
    assert a.keys() == b.keys()
    errors = {}
    for k in b:
        x, y = a[k].double(), b[k].double()
        errors[k] = float((x - y).norm() / y.norm()) if y.norm() > 0 else float((x - y).norm())
    assert max(errors.values()) <= tol, {k: f"{e:.2e}" for k, e in errors.items()}


@pytest.mark.slow
def test_world_size_change_2_to_1_with_batchnorm_matches_the_uninterrupted_2_rank_run(straight, shards, tmp_path):
    """The demo model has BatchNorm. Stopped at step 3 of 6 on 2 ranks (8 samples each), resumed on 1 rank: it
    keeps micro-batches of 8 (two per step, accumulated through GradCache), so every BatchNorm normalises the same
    samples as before; the running statistics are the mean over the global batch's micro-batches on any world
    size. Every tensor, buffers included, ends where the uninterrupted run does."""
    out = tmp_path / "run"
    resume_from_step_3(straight, out)
    assert run(out, shards, 1) == [0], log_of(out)
    assert (out / "checkpoints" / "step_00000003.universal" / "zero").is_dir()
    meta = json.loads((out / "checkpoints" / "step_00000006" / "soilnet.json").read_text())
    assert (meta["world_size"], meta["micro_batch_size"]) == (1, 8)
    assert sample_sequence(out) == sample_sequence(straight)
    a, b = full_state(out), full_state(straight)
    assert int(a["model.image_encoder.features.1.num_batches_tracked"]) == 6  # 3 restored + 3 new steps
    assert_same_run(a, b)
    fresh = full_state(out, "step_00000003")
    assert any(not torch.equal(a[k], fresh[k]) for k in a if k.endswith("running_mean"))  # the resumed steps did train


@pytest.mark.slow
def test_world_size_change_1_to_2_with_batchnorm_matches_the_uninterrupted_1_rank_run(shards, tmp_path):
    """1 rank with micro-batches of 8 (two per step through GradCache), killed after step 4 (its checkpoint at 3
    stands), resumed on 2 ranks with one micro-batch each: the same function, so the same weights and BatchNorm
    statistics as the uninterrupted 1-rank run. A resume that asks for another micro-batch is refused."""
    straight, one = tmp_path / "straight", tmp_path / "one"
    assert run(straight, shards, 1, "train.micro_batch_size=8") == [0], log_of(straight)
    assert run(one, shards, 1, "train.micro_batch_size=8", "debug.sigkill_after_step=4") != [0]
    assert (one / "checkpoints" / "latest").read_text() == "step_00000003"
    assert run(one, shards, 2, "train.micro_batch_size=16") == [2, 2]
    assert "was trained with train.micro_batch_size=8, this run asks for 16" in log_of(one)
    assert run(one, shards, 2) == [0, 0], log_of(one)  # unset: the recorded micro-batch of 8
    meta = json.loads((one / "checkpoints" / "step_00000006" / "soilnet.json").read_text())
    assert (meta["world_size"], meta["micro_batch_size"]) == (2, 8)
    assert sample_sequence(one) == sample_sequence(straight)
    assert_same_run(full_state(one), full_state(straight))


def test_micro_batch_is_kept_on_resume_and_the_world_size_must_share_its_micro_batches(tmp_path):

    cfg = PretrainConfig.model_validate({"train": {"global_batch_size": 16}})
    assert micro_batch_size(cfg, 2, None) == 8  # a first start: G / W
    ref = CheckpointRef(tmp_path, "step_00000003", {"global_batch_size": 16, "world_size": 2, "micro_batch_size": 8})
    assert micro_batch_size(cfg, 1, ref) == 8  # a resume: the recorded one, whatever W
    old = CheckpointRef(tmp_path, "step_00000003", {"global_batch_size": 16, "world_size": 2})
    assert micro_batch_size(cfg, 4, old) == 8  # written before it was recorded: one micro-batch per rank
    cfg.train.micro_batch_size = 4
    with pytest.raises(ConfigError, match="was trained with train.micro_batch_size=8, this run asks for 4"):
        micro_batch_size(cfg, 1, ref)
    assert [accumulation_steps(16, 8, w) for w in (1, 2)] == [2, 1]
    with pytest.raises(BatchSizeError, match=r"2 micro-batch\(es\) .* cannot be shared by 4 processes: .* \(1, 2\)"):
        accumulation_steps(16, 8, 4)
    with pytest.raises(BatchSizeError, match="not a multiple of train.micro_batch_size=5"):
        accumulation_steps(16, 5, 1)

    ds = engine_config(cfg, 1, "fp32", 1e-3, False, micro=8)
    sizes = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert sizes == (16, 8, 2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_signal_on_one_rank_stops_every_rank_at_the_same_step_after_saving_and_the_rerun_resumes(
    signum, shards, tmp_path
):
    out = tmp_path / "run"
    out.parent.mkdir(parents=True, exist_ok=True)
    procs = start(out, shards, 2, "train.steps=400", "checkpoint.every_steps=1000", "data.num_workers=1")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and all(p.poll() is None for p in procs), log_of(out)
        time.sleep(0.05)
    # SIGUSR2 as Slurm's --signal, SIGTERM as scancel, preemption or the time limit: Slurm signals every process of
    # the step, so rank 1's DataLoader worker gets it too (torch's workers die on a foreign SIGTERM unless it is
    # blocked); rank 0 gets nothing
    workers = children(procs[1].pid)
    assert workers, "rank 1 has no DataLoader worker"
    for pid in [*workers, procs[1].pid]:
        os.kill(pid, signum)
    codes = wait(procs, out)
    assert codes == [75, 75], log_of(out)
    ck = out / "checkpoints"
    tag = (ck / "latest").read_text()
    step = int(tag.split("_")[1])
    assert 0 < step < 400
    assert [d.name for d in ck.iterdir() if d.is_dir()] == [tag]  # the only save is the one on the signal
    # both ranks wrote their part of that checkpoint (ZeRO-1 optimizer partitions and RNG states) ...
    names = {f.name for f in (ck / tag).iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= names
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    # ... and each says it stopped after that very step; no step ran past it
    for r in (0, 1):
        assert f"rank {r}: stopped on a signal at step {step} after saving" in log_of(out, r), log_of(out, r)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step

    # the rerun (as a requeue would start it) resumes there and continues the global sample sequence
    assert run(out, shards, 2, f"train.steps={step + 2}") == [0, 0], log_of(out)
    full_log = (out.parent / f"{out.name}.rank0.log").read_text(errors="replace")
    assert f"resumed from {ck / tag} at step {step}" in full_log, log_of(out)
    assert (ck / "latest").read_text() == f"step_{step + 2:08d}"
    meta = json.loads((ck / f"step_{step + 2:08d}" / "soilnet.json").read_text())
    assert meta["samples"] == (step + 2) * 16
    seq = sample_sequence(out)
    assert len(seq) == step + 2

    seed = meta["loader"]["seed"]
    assert seq == [batch_ids(seed, 64, 16, k).tolist() for k in range(step + 2)]


def test_export_writes_plain_encoder_weights_with_schema_and_model_metadata(straight, tmp_path):
    target = tmp_path / "encoders.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", "export", "--checkpoint", str(straight), "--out", str(target)],
        env=cpu_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(target), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("image_encoder.", "climate_encoder.")) for k in keys)
    assert json.loads(meta["schema"])["patch_size"] == 64
    assert json.loads(meta["model"])["image_encoder"]["name"]

    one = export(straight / "checkpoints" / "step_00000003", tmp_path / "step3.safetensors")
    assert one.is_file()


@pytest.mark.slow
def test_grad_cache_gives_the_full_batch_update(shards, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert run(plain, shards, 1, "train.steps=2", flat=True) == [0], log_of(plain)
    assert run(cached, shards, 1, "train.steps=2", "train.micro_batch_size=4", flat=True) == [0], log_of(cached)
    a, b = weights(plain), weights(cached)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_lars_with_every_loss_option_runs_on_zero_stage_0_and_is_refused_on_stage_1(shards, tmp_path):
    out = tmp_path / "lars"
    options = ["loss.learnable_temperature=true", "loss.simclr_weight=0.5", "loss.mask_identical_climate=true"]
    stage0 = "deepspeed.zero_optimization.stage=0"
    codes = run(out, shards, 1, "train.steps=2", "train.optimizer=lars", stage0, *options)
    assert codes == [0], log_of(out)
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["temperature"] != 0.5  # learnt
    bad = tmp_path / "lars1"
    assert run(bad, shards, 1, "train.steps=2", "train.optimizer=lars") != [0]
    assert "deepspeed.zero_optimization.stage=0" in log_of(bad)


def test_corrupt_samples_above_the_threshold_stop_the_job_naming_them(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    (folder / "shard-000002.tar").write_bytes(b"not a tar" * 100)  # a quarter of the samples
    out = tmp_path / "run"
    codes = run(out, folder, 1, f"data.shards={folder}", "data.max_corrupt_fraction=0.05")
    assert codes != [0]
    text = log_of(out)
    assert "max_corrupt_fraction=0.05" in text and "shard-000002.tar" in text

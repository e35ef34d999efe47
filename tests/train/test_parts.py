"""Small parts of pretraining: distributed environment, schedules, optimiser rules, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from soilnet.config.base import ConfigError, load_config
from soilnet.config.pretrain import PretrainConfig
from soilnet.distributed import DistributedError, environment, resolve_backend
from soilnet.train.optim import LAMB, LARS, OptimizerConfigError, check_optimizer, param_groups
from soilnet.train.schedule import lr_at, scaled_lr


def test_environment_from_torchrun_slurm_or_alone(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    alone = environment()
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["LOCAL_RANK"]) == ("0", "1", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    slurm = environment()
    assert (slurm["RANK"], slurm["WORLD_SIZE"], slurm["LOCAL_RANK"], slurm["MASTER_ADDR"]) == ("3", "8", "1", "gpu07")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    tr = environment()  # torchrun's / the launcher's variables win
    assert (tr["RANK"], tr["WORLD_SIZE"], tr["MASTER_ADDR"], tr["MASTER_PORT"]) == ("1", "2", "10.0.0.1", "29999")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_nccl_without_gpus_is_a_clear_error_and_auto_picks_gloo():
    assert resolve_backend("auto") == "gloo"
    with pytest.raises(DistributedError, match="nccl.*no CUDA GPU"):
        resolve_backend("nccl")


def test_schedule_is_counted_in_samples_warmup_then_cosine():
    peak, warm, total = 1.0, 100, 1100
    assert lr_at(0, peak, warm, total) == 0.0
    assert lr_at(50, peak, warm, total) == pytest.approx(0.5)
    assert lr_at(100, peak, warm, total) == pytest.approx(1.0)
    assert lr_at(600, peak, warm, total) == pytest.approx(0.5)
    assert lr_at(1100, peak, warm, total, min_ratio=0.1) == pytest.approx(0.1)
    # the same samples give the same lr whatever the split into ranks: the function has no world size
    assert scaled_lr(0.1, 1024, 256, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 1024, 256, "none") == 0.1


def test_lars_and_lamb_need_zero_stage_0_and_skip_biases_and_norms():
    check_optimizer("lars", 0)
    check_optimizer("adamw", 2)
    with pytest.raises(OptimizerConfigError, match="stage=0"):
        check_optimizer("lamb", 1)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    for opt_cls in (LARS, LAMB):
        m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        opt = opt_cls(param_groups(m, 0.1), lr=0.1)
        before = [p.detach().clone() for p in m.parameters()]
        m(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in m.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
        assert math.isfinite(float(m[0].weight.detach().norm()))


def test_demo_config_loads_and_typos_name_the_key(repo_root):
    cfg = load_config(PretrainConfig, repo_root / "configs/pretrain/demo.yaml", ["train.steps=2"])
    assert cfg.train.steps == 2 and cfg.data.shards == "outputs/demo/shards" and cfg.checkpoint.keep_last >= 1
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(PretrainConfig, repo_root / "configs/pretrain/demo.yaml", ["train.stepz=2"])


def test_reference_gpu_config_loads_with_the_model_it_includes(repo_root):
    if not (repo_root / "configs/model/vit_transformer.yaml").is_file():
        pytest.skip("configs/model/vit_transformer.yaml (the models engineer's) has not landed yet")
    cfg = load_config(PretrainConfig, repo_root / "configs/pretrain/vit_b8_gpu.yaml")
    assert cfg.train.precision == "bf16" and cfg.deepspeed["zero_optimization"]["stage"] == 1
    assert cfg.train.global_batch_size == 4096 and cfg.model.image_encoder is not None

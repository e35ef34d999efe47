"""Encoder training modes (frozen, full, layer-wise LR decay) through the one implementation of optimiser groups
(:func:`soilnet.train.optim.param_groups`), and the learning-rate table fine-tuning logs and returns."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soilnet.config.finetune import FinetuneConfig, FinetuneTrainConfig
from soilnet.config.model import ComponentConfig, ModelConfig
from soilnet.data.labelled import load_labelled
from soilnet.distributed import rank_rows
from soilnet.models import build_regression_model
from soilnet.schema import SampleSchema
from soilnet.train.finetune import engine_config, fit, optimizer_groups
from soilnet.train.regressor import modalities_of

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))
from labelled_kit import labelled_shards  # noqa: E402  (the fixture)

__all__ = ["labelled_shards"]

SCHEMA = SampleSchema()


def two_tower():
    """Tiny CNN and GRU encoders and regressor v1."""
    return build_regression_model(ModelConfig(), SCHEMA)


def lr_of(groups):
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_frozen_trains_only_the_regressor():
    model = two_tower()
    groups = optimizer_groups(model, FinetuneTrainConfig(encoders="frozen", lr=1e-3))
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.regressor.parameters()}
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


def test_layer_wise_decay_lowers_the_rate_by_block():
    model = two_tower()
    groups = optimizer_groups(model, FinetuneTrainConfig(encoders="lrd", lr=1e-3, layer_decay=0.5))
    lr = lr_of(groups)
    cnn = model.image_encoder
    assert lr[id(model.regressor.out.weight)] == 1e-3
    assert lr[id(cnn.head.weight)] == 1e-3 * 0.5  # top encoder block: one step below the head
    assert lr[id(cnn.features[4].weight)] == lr[id(cnn.features[3].weight)] == 1e-3 * 0.25  # conv2 with its BN
    assert lr[id(cnn.features[0].weight)] == 1e-3 * 0.125
    assert lr[id(model.climate_encoder.gru.weight_ih_l0)] == 1e-3 * 0.25
    assert len(lr) == sum(1 for _ in model.parameters())
    opt = torch.optim.AdamW(groups)
    assert len(opt.param_groups) == len(groups)


def test_vit_b8_gets_fifteen_levels_not_one_per_module():
    cfg = ModelConfig(
        image_encoder=ComponentConfig(name="vit"),
        climate_encoder=ComponentConfig(name="lstm"),
    )
    model = build_regression_model(cfg, SCHEMA)
    groups = optimizer_groups(model, FinetuneTrainConfig(encoders="lrd", lr=1.0, layer_decay=0.75))
    lr = lr_of(groups)
    vit = model.image_encoder
    assert lr[id(vit.patch_embed.weight)] == lr[id(vit.cls_token)] == lr[id(vit.pos_embed)] == 0.75**15
    assert lr[id(vit.blocks[0].attn.qkv.weight)] == lr[id(vit.blocks[0].norm1.weight)] == 0.75**14
    assert lr[id(vit.blocks[11].mlp[3].weight)] == 0.75**3
    assert lr[id(vit.norm.weight)] == 0.75**2 and lr[id(vit.head.weight)] == 0.75
    assert min(lr.values()) == 0.75**15


def test_biases_and_norms_get_no_weight_decay():
    model = two_tower()
    groups = optimizer_groups(model, FinetuneTrainConfig(encoders="lrd", weight_decay=0.1))
    for g in groups:
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.1)
    assert any(g["weight_decay"] == 0.0 for g in groups) and any(g["weight_decay"] == 0.1 for g in groups)


def test_full_trains_everything_at_one_rate():
    model = two_tower()
    groups = optimizer_groups(model, FinetuneTrainConfig(encoders="full", lr=2e-3))
    assert {g["lr"] for g in groups} == {2e-3}
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())


def test_fine_tuning_logs_and_returns_its_learning_rate_table(labelled_shards, caplog):
    cfg = FinetuneConfig.model_validate(
        {"data": {"shards": str(labelled_shards)}, "train": {"encoders": "lrd", "epochs": 1, "threads": 1}}
    )
    data = load_labelled(cfg.data, modalities_of(cfg.modalities))
    rows = np.arange(len(data))
    with caplog.at_level(logging.INFO, logger="soilnet.finetune"):
        fitted = fit(cfg, data, rows[:40], rows[40:60], seed=0, label="fold 0")
    table = fitted.lr_groups
    assert [g["name"] for g in table] == [
        "image_encoder.conv1",
        "image_encoder.conv2",
        "image_encoder.out",
        "climate_encoder.gru.l0",
        "climate_encoder.out",
        "head",
    ]
    assert [g["lr_scale"] for g in table] == [0.75**3, 0.75**2, 0.75, 0.75**2, 0.75, 1.0]
    assert sum(g["parameters"] for g in table) == sum(p.numel() for p in fitted.model.parameters())
    logged = [r.getMessage() for r in caplog.records if "learning rates" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("fold 0 learning rates (encoders=lrd")
    assert "image_encoder.conv1 x0.422" in logged[0]


def test_rank_rows_cover_the_global_batch_in_order():
    for n, world in ((16, 2), (7, 3), (5, 4)):
        parts = [rank_rows(n, world, r) for r in range(world)]
        rows = [i for sl, _ in parts for i in range(n)[sl]]
        assert rows == list(range(n))
        assert all(sizes == parts[0][1] and max(sizes) - min(sizes) <= 1 for _, sizes in parts)


def test_engine_config_splits_the_batch_and_adds_nothing_the_single_process_lacks():
    tc = FinetuneTrainConfig(batch_size=64, lr=2e-3, weight_decay=1e-4)
    ds = engine_config(tc, 4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        16,
        1,
    )
    assert ds["zero_optimization"] == {"stage": 0} and ds["gradient_clipping"] == 0.0
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 1e-4, "torch_adam": True}}
    with pytest.raises(ValueError, match=r"train.batch_size=64 must be a multiple of the 3 ranks"):
        engine_config(tc, 3)

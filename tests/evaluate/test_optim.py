"""Encoder training modes: frozen, full, and layer-wise LR decay."""

import torch
from torch import nn

from soilnet.config.finetune import FinetuneTrainConfig
from soilnet.train.finetune import param_groups


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.climate_encoder = nn.GRU(2, 4, batch_first=True)
        self.regressor = nn.Linear(8, 1)


def test_frozen_trains_only_the_regressor():
    model = TwoTower()
    groups = param_groups(model, FinetuneTrainConfig(encoders="frozen", lr=1e-3))
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.regressor.parameters()}
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


def test_layer_wise_decay_lowers_the_rate_with_depth():
    model = TwoTower()
    groups = param_groups(model, FinetuneTrainConfig(encoders="lrd", lr=1e-3, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    first, last = model.image_encoder[0], model.image_encoder[2]
    assert lr_of[id(model.regressor.weight)] == 1e-3
    assert lr_of[id(last.weight)] == 1e-3 * 0.5  # top encoder layer: one step below the head
    assert lr_of[id(first.weight)] == 1e-3 * 0.25
    assert len(lr_of) == sum(1 for _ in model.parameters())
    opt = torch.optim.AdamW(groups)
    assert len(opt.param_groups) == len(groups)


def test_full_trains_everything_at_one_rate():
    model = TwoTower()
    groups = param_groups(model, FinetuneTrainConfig(encoders="full", lr=2e-3))
    assert {g["lr"] for g in groups} == {2e-3}
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())

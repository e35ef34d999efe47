"""Layer-wise LR decay counts depth in each encoder's own blocks, and `soilnet model-summary` shows the groups."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from soilnet.cli import main
from soilnet.config.model import ComponentConfig, ModelConfig
from soilnet.models import build, build_regression_model, lr_blocks, names
from soilnet.models.layer_decay import lr_groups, lr_table
from soilnet.models.wrappers import RegressionModel
from soilnet.schema import SampleSchema

SCHEMA = SampleSchema()
DECAY = 0.75
FLOOR = DECAY**15  # the lowest scale a 16-level encoder may reach


def summary_of(capsys, *argv) -> dict:
    assert main(["model-summary", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def image_levels(summary: dict) -> list[dict]:
    return [g for g in summary["lr_groups"] if g["name"].startswith("image_encoder")]


def check_groups(summary: dict) -> None:
    groups = summary["lr_groups"]
    assert sum(g["parameters"] for g in groups) == summary["total"]
    assert all(g["name"].split(".")[0] in ("image_encoder", "climate_encoder", "head") for g in groups)
    assert groups[-1] == {"name": "head", "parameters": summary["regressor"]["parameters"], "lr_scale": 1.0}
    assert len(image_levels(summary)) <= 16
    assert min(g["lr_scale"] for g in groups) >= FLOOR * (1 - 1e-12)


def test_lucas_config_is_resnet101_glam_lstm_with_block_wise_decay(repo_root, capsys):
    summary = summary_of(capsys, "--config", str(repo_root / "configs/finetune/lucas.yaml"))
    assert summary["image_encoder"]["name"] == "resnet101_glam"
    assert summary["climate_encoder"]["name"] == "lstm"
    assert summary["input"]["image"][0] == 12  # the seed's 12 channels, from the included model file
    check_groups(summary)
    assert [g["name"] for g in image_levels(summary)] == [
        "image_encoder.stem",
        *(f"image_encoder.layer{i}" for i in range(1, 5)),
        "image_encoder.out",
    ]
    assert [g["lr_scale"] for g in image_levels(summary)] == [DECAY**k for k in range(6, 0, -1)]
    climate = [g["name"] for g in summary["lr_groups"] if g["name"].startswith("climate_encoder")]
    assert climate == ["climate_encoder.rnn.l0", "climate_encoder.rnn.l1", "climate_encoder.out"]


@pytest.mark.slow
def test_vit_transformer_lrd_counts_embedding_blocks_and_norm(repo_root, tmp_path, capsys):
    cfg = tmp_path / "vit_lrd.yaml"
    model_file = repo_root / "configs/model/vit_transformer.yaml"
    cfg.write_text(yaml.safe_dump({"include": [str(model_file)], "train": {"encoders": "lrd"}}))
    summary = summary_of(capsys, "--config", str(cfg))
    check_groups(summary)
    levels = image_levels(summary)
    names_ = [g["name"] for g in levels]
    assert names_ == [
        "image_encoder.embed",
        *(f"image_encoder.blocks.{i}" for i in range(12)),
        "image_encoder.norm",
        "image_encoder.out",
    ]
    embed = levels[0]
    assert embed["parameters"] == 14 * 768 * 8 * 8 + 768 + 768 + 65 * 768  # patch conv, CLS token, positions
    assert embed["lr_scale"] == pytest.approx(FLOOR)
    climate = [g for g in summary["lr_groups"] if g["name"].startswith("climate_encoder")]
    assert [g["name"] for g in climate] == [
        "climate_encoder.project",
        *(f"climate_encoder.layers.{i}" for i in range(6)),
        "climate_encoder.out",
    ]


def test_frozen_encoders_show_scale_zero(repo_root, capsys):
    summary = summary_of(capsys, "--config", str(repo_root / "configs/finetune/demo.yaml"), "train.encoders=frozen")
    assert [(g["name"], g["lr_scale"]) for g in summary["lr_groups"]] == [
        ("image_encoder", 0.0),
        ("climate_encoder", 0.0),
        ("head", 1.0),
    ]
    assert sum(g["parameters"] for g in summary["lr_groups"]) == summary["total"]


def test_climate_only_config_summarises_without_an_image_encoder(repo_root, capsys):
    summary = summary_of(capsys, "--config", str(repo_root / "configs/finetune/raca_climate.yaml"))
    assert summary["image_encoder"] is None
    assert [g["name"] for g in summary["lr_groups"]] == ["climate_encoder", "head"]


CNNS = ("resnet50", "resnet101", "resnet101_glam", "vgg16", "vgg16_glam")
IMAGE = {"vit_tiny": {}, "tiny_cnn": {}} | dict.fromkeys(CNNS, {"out": 8}) | {"vit": {"depth": 2}}
CLIMATE = dict.fromkeys(("lstm", "gru", "rnn", "tiny_gru"), {}) | {"gru": {"layers": 3}}
CLIMATE["transformer"] = {"d_model": 32, "ff": 64, "layers": 2}


@pytest.mark.parametrize(
    ("kind", "name"), [*(("image_encoder", n) for n in IMAGE), *(("climate_encoder", n) for n in CLIMATE)]
)
def test_every_registered_encoder_lists_its_blocks_once(kind, name):
    enc = build(kind, name, SCHEMA, **{**IMAGE, **CLIMATE}[name])
    blocks = lr_blocks(enc)  # checks each parameter is listed exactly once
    assert 2 <= len(blocks) <= 16
    assert blocks[-1][0] == "out"


def test_every_registered_encoder_is_covered():
    # the library's own encoders; other tests register toy ones (test_*) in the same process
    assert {n for n in names("image_encoder") if not n.startswith("test_")} == set(IMAGE)
    assert {n for n in names("climate_encoder") if not n.startswith("test_")} == set(CLIMATE)


def test_recurrent_layers_are_levels():
    blocks = dict(lr_blocks(build("climate_encoder", "gru", SCHEMA, layers=3)))
    assert list(blocks) == ["rnn.l0", "rnn.l1", "rnn.l2", "out"]
    assert all(len(blocks[f"rnn.l{k}"]) == 4 for k in range(3))  # weight_ih, weight_hh, bias_ih, bias_hh


class Plain(nn.Module):
    """An encoder that cannot list its blocks."""

    out_features = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(14, 4)

    def forward(self, climate: torch.Tensor) -> torch.Tensor:
        return self.fc(climate[:, -1])


def test_lrd_with_an_encoder_that_cannot_list_its_blocks_names_it():
    model = RegressionModel(None, Plain(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"model\.climate_encoder \(Plain\) cannot list its blocks"):
        lr_groups(model, "lrd", DECAY)
    assert [g.name for g in lr_groups(model, "full")] == ["climate_encoder", "head"]


def test_blocks_that_miss_a_parameter_are_an_error():
    enc = Plain()
    enc.lr_blocks = lambda: [("fc", [enc.fc.weight])]
    with pytest.raises(ValueError, match="each of its parameters once"):
        lr_blocks(enc)


def test_top_block_is_one_step_below_the_head():
    cfg = ModelConfig(image_encoder=ComponentConfig(name="vit_tiny"))
    model = build_regression_model(cfg, SCHEMA)
    table = lr_table(lr_groups(model, "lrd", 0.5))
    scale = {g["name"]: g["lr_scale"] for g in table}
    assert scale["head"] == 1.0 and scale["image_encoder.out"] == 0.5 and scale["climate_encoder.out"] == 0.5
    assert scale["image_encoder.embed"] == 0.5**5  # embed, 2 blocks, norm, out
    assert sum(g["parameters"] for g in table) == sum(p.numel() for p in model.parameters())

"""The SoilNet model family: verified sizes, shapes of every encoder/head combination, bf16, summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from soilnet.config.model import ComponentConfig, ModelConfig
from soilnet.models import build, build_regression_model, names
from soilnet.models.glam import GLAM
from soilnet.schema import SampleSchema, month_range

SCHEMA = SampleSchema()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "kind, name, kwargs, expected",
    [
        ("image_encoder", "vit", {"out": 1024}, 86_583_040),  # 86.58 M
        ("image_encoder", "resnet101", {"out": 1024}, 44_632_832),  # 44.63 M
        ("climate_encoder", "transformer", {}, 22_919_808),  # 22.92 M (F = 14, T = 61)
        ("regressor", "regressor_v1", {"inputs": (1024, 128)}, 180_737),
    ],
)
def test_verified_parameter_counts(kind, name, kwargs, expected):
    assert n_params(build(kind, name, SCHEMA, **kwargs)) == expected


IMAGE = {"vit_tiny": {}, "tiny_cnn": {}, "resnet50": {"out": 32}, "resnet101_glam": {"out": 32},
         "vgg16": {"out": 32}, "vgg16_glam": {"out": 32}}  # fmt: skip
CLIMATE = {"lstm": {}, "gru": {}, "rnn": {}, "tiny_gru": {}, "transformer": {"d_model": 32, "ff": 64, "layers": 2},
           "transformer_ln": {"d_model": 32, "ff": 64, "layers": 2, "norm": "layer"}}  # fmt: skip


@pytest.mark.parametrize("name", IMAGE)
def test_image_encoders_map_patches_to_embeddings(name):
    schema = SampleSchema(channels=("SR_B4", "SR_B5", "NDVI"))
    enc = build("image_encoder", name, schema, **IMAGE[name]).eval()
    with torch.no_grad():
        z = enc(torch.randn(2, 3, 64, 64))
    assert z.shape == (2, enc.out_features)


@pytest.mark.parametrize("name", CLIMATE)
@pytest.mark.parametrize("months", [12, 61])
def test_climate_encoders_work_for_any_sequence_length(name, months):
    schema = SampleSchema(months=month_range("2010-01", "2015-01")[:months], climate_variables=("pr", "tmmx", "aet"))
    kwargs = dict(CLIMATE[name])
    enc = build("climate_encoder", name.removesuffix("_ln"), schema, **kwargs).eval()
    with torch.no_grad():
        z = enc(torch.randn(2, months, 3))
    assert z.shape == (2, enc.out_features)


@pytest.mark.parametrize("regressor", ["regressor_v1", "regressor_v2"])
@pytest.mark.parametrize("modalities", ["both", "image", "climate"])
def test_regression_model_for_every_modality_and_head(regressor, modalities):
    cfg = ModelConfig(regressor=ComponentConfig(name=regressor))
    model = build_regression_model(cfg, SCHEMA, modalities).eval()
    image = torch.randn(2, *SCHEMA.image_shape) if modalities != "climate" else None
    climate = torch.randn(2, *SCHEMA.climate_shape) if modalities != "image" else None
    assert model(image, climate).shape == (2, 1)


def test_regressor_v2_has_the_intended_dropout():
    v2 = build("regressor", "regressor_v2", SCHEMA, inputs=(8, 8))
    assert [m.p for m in v2.modules() if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]


def test_glam_global_channel_attention_has_its_own_key_convolution():
    glam = GLAM(16, reduced=4)
    gca = glam.global_channel
    assert gca.conv_k is not gca.conv_q
    x = torch.randn(2, 16, 8, 8)
    out = glam(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert gca.conv_k.weight.grad is not None and gca.conv_k.weight.grad.abs().sum() > 0


def test_vgg_glam_flag_adds_glam_only_when_asked():
    plain = build("image_encoder", "vgg16", SCHEMA, out=8)
    with_glam = build("image_encoder", "vgg16_glam", SCHEMA, out=8)
    assert not any(isinstance(m, GLAM) for m in plain.modules())
    assert any(isinstance(m, GLAM) for m in with_glam.modules())


def test_vit_mlp_dropout_is_applied():
    vit = build("image_encoder", "vit_tiny", SCHEMA)
    mlp_dropouts = [m for m in vit.blocks[0].mlp if isinstance(m, torch.nn.Dropout)]
    assert len(mlp_dropouts) == 2 and all(d.p == 0.1 for d in mlp_dropouts)


def test_vit_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build("image_encoder", "vit_tiny", SCHEMA, p=0.0)
    ckpt = build("image_encoder", "vit_tiny", SCHEMA, p=0.0, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, *SCHEMA.image_shape)
    for m in (plain, ckpt):
        m(x).square().sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_channels_last_resnet_matches_the_default_layout():
    a = build("image_encoder", "resnet50", SCHEMA, out=8).eval()
    b = build("image_encoder", "resnet50", SCHEMA, out=8, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, *SCHEMA.image_shape)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)


def test_forward_backward_under_bf16_autocast_on_cpu():
    cfg = ModelConfig(
        image_encoder=ComponentConfig(name="vit_tiny"),
        climate_encoder=ComponentConfig(name="transformer", kwargs={"d_model": 32, "ff": 64, "layers": 1}),
    )
    model = build_regression_model(cfg, SCHEMA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, *SCHEMA.image_shape), torch.randn(2, *SCHEMA.climate_shape))
    y.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_model_summary_prints_one_json_object(repo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", "model-summary", "--config", "configs/model/vit_transformer.yaml"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["image_encoder"]["parameters"] == 86_583_040
    assert summary["climate_encoder"]["parameters"] == 22_919_808
    assert summary["regressor"]["parameters"] == 180_737
    assert summary["total"] == 86_583_040 + 22_919_808 + 180_737


def test_every_registered_name_is_listed():
    assert {"vit", "resnet50", "resnet101", "resnet101_glam", "vgg16", "vgg16_glam", "tiny_cnn"} <= set(
        names("image_encoder")
    )
    assert {"lstm", "gru", "rnn", "transformer", "tiny_gru"} <= set(names("climate_encoder"))

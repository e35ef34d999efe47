"""The SoilNet model family: verified sizes, shapes of every encoder/head combination, bf16, summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from soilnet.config.base import ConfigError, load_config
from soilnet.config.finetune import FinetuneConfig
from soilnet.config.model import ComponentConfig, ModelConfig
from soilnet.models import build, build_regression_model, names
from soilnet.models.glam import GLAM
from soilnet.schema import SampleSchema, month_range

SCHEMA = SampleSchema()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Independent counts, from the layer shapes of the seed's code (not from our modules).
def conv(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(d_in, d_out):
    return d_in * d_out + d_out


def resnet_count(blocks, c_in, out):
    """torchvision's bottleneck ResNet: stem conv 7x7 + BN, stages of 1x1/3x3/1x1 convs with BNs, downsample."""
    n, width_in = conv(c_in, 64, 7, bias=False) + 2 * 64, 64
    for n_blocks, w in zip(blocks, (64, 128, 256, 512), strict=True):
        for b in range(n_blocks):
            n += conv(width_in, w, 1, False) + conv(w, w, 3, False) + conv(w, 4 * w, 1, False) + 2 * (w + w + 4 * w)
            if b == 0:
                n += conv(width_in, 4 * w, 1, False) + 2 * 4 * w
            width_in = 4 * w
    return n + linear(2048, out)


def glam_count(c, reduced=32, kernel=5):
    """The seed's GLAM: local channel conv1d, local spatial (1x1, three dilated 3x3, 1x1 to one map), global
    channel conv_q and conv_k, global spatial (q, k, v 1x1 and the 1x1 back to c), three fusion weights."""
    local_spatial = conv(c, reduced, 1) + 3 * conv(reduced, reduced, 3) + conv(4 * reduced, 1, 1)
    global_spatial = 3 * conv(c, reduced, 1) + conv(reduced, c, 1)
    return (kernel + 1) + local_spatial + 2 * (kernel + 1) + global_spatial + 3


def vgg16_count(c_in, out):
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(conv(i, o, 3) for i, o in zip([c_in, *widths[:-1]], widths, strict=True))
    return convs + linear(512 * 7 * 7, 4096) + linear(4096, 4096) + linear(4096, out)


def regressor_count(inputs, hidden=128, version=1):
    branches = sum(linear(d, hidden) for d in inputs)
    if version == 1:
        return branches + linear(hidden * len(inputs), hidden) + linear(hidden, 1)
    return branches + linear(hidden * len(inputs), hidden) + linear(hidden, hidden // 4) + linear(hidden // 4, 1)


RESNET101_GLAM = resnet_count((3, 4, 23, 3), 14, 1024) + glam_count(512)


def test_hand_counts_match_the_published_sizes():
    assert resnet_count((3, 4, 23, 3), 14, 1024) == 44_632_832  # 44.63 M
    assert glam_count(512) == 110_454
    assert regressor_count((1024, 128)) == 180_737


@pytest.mark.parametrize(
    "kind, name, kwargs, expected",
    [
        ("image_encoder", "vit", {"out": 1024}, 86_583_040),  # 86.58 M
        ("image_encoder", "resnet101", {"out": 1024}, resnet_count((3, 4, 23, 3), 14, 1024)),
        ("image_encoder", "resnet50", {"out": 1024}, resnet_count((3, 4, 6, 3), 14, 1024)),
        ("image_encoder", "resnet101_glam", {"out": 1024}, RESNET101_GLAM),  # 44,743,286
        ("image_encoder", "vgg16", {"out": 1024}, vgg16_count(14, 1024)),
        ("image_encoder", "vgg16_glam", {"out": 1024}, vgg16_count(14, 1024) + glam_count(512)),
        ("climate_encoder", "transformer", {}, 22_919_808),  # 22.92 M (F = 14, T = 61)
        ("regressor", "regressor_v1", {"inputs": (1024, 128)}, regressor_count((1024, 128))),
        ("regressor", "regressor_v2", {"inputs": (1024, 128)}, regressor_count((1024, 128), version=2)),  # 184,769
    ],
)
def test_verified_parameter_counts(kind, name, kwargs, expected):
    assert n_params(build(kind, name, SCHEMA, **kwargs)) == expected


CNNS = ("resnet50", "resnet101_glam", "vgg16", "vgg16_glam")
IMAGE = {"vit_tiny": {}, "tiny_cnn": {}} | dict.fromkeys(CNNS, {"out": 32})
TRANSFORMER = {"d_model": 32, "ff": 64, "layers": 2}
CLIMATE = dict.fromkeys(("lstm", "gru", "rnn", "tiny_gru"), {})
CLIMATE |= {"transformer": TRANSFORMER, "transformer_ln": {**TRANSFORMER, "norm": "layer"}}


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


def test_regressor_v2_is_the_seeds_with_the_intended_dropout():
    v2 = build("regressor", "regressor_v2", SCHEMA, inputs=(8, 8))
    kinds = [type(m).__name__ for m in v2.fuse] + [type(m).__name__ for m in v2.out]
    assert kinds == ["Linear", "Dropout", "Sigmoid", "Linear", "Sigmoid", "Linear", "ReLU"]
    assert (v2.fuse[0].out_features, v2.fuse[3].out_features) == (128, 32)
    assert v2.fuse[1].p == 0.25  # the seed's 0.5//2 was 0
    v2.eval()
    with torch.no_grad():
        assert (v2(torch.randn(64, 8) * 10, torch.randn(64, 8) * 10) >= 0).all()
    linear_out = build("regressor", "regressor_v2", SCHEMA, inputs=(8, 8), relu_output=False)
    assert isinstance(linear_out.out[-1], torch.nn.Identity)


def test_regressor_v2_with_relu_output_needs_nonnegative_targets():

    v2 = ["model.regressor.name=regressor_v2"]
    with pytest.raises(ConfigError, match="relu_output=false"):
        load_config(FinetuneConfig, None, v2)
    load_config(FinetuneConfig, None, [*v2, "train.loss=rmsle"])
    load_config(FinetuneConfig, None, [*v2, "model.regressor.kwargs={relu_output: false}"])


def test_glam_defaults_are_the_seeds():
    glam = GLAM(512)
    assert glam.local_channel.conv.kernel_size == (5,) and glam.global_channel.conv_q.kernel_size == (5,)
    assert glam.local_spatial.reduce.out_channels == 32 and glam.global_spatial.q.out_channels == 32


@pytest.mark.parametrize("name", ["resnet101_glam", "vgg16_glam"])
def test_glam_acts_on_the_8x8_feature_maps_of_64x64_patches(name):
    enc = build("image_encoder", name, SCHEMA, out=8).eval()
    seen = []
    (glam,) = [m for m in enc.modules() if isinstance(m, GLAM)]
    glam.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        enc(torch.randn(1, *SCHEMA.image_shape))
    assert seen == [(1, 512, 8, 8)]


def test_vgg16_glam_follows_features_22_as_in_the_seed():
    features = build("image_encoder", "vgg16_glam", SCHEMA, out=8).net.features
    assert isinstance(features[22][0], torch.nn.ReLU) and isinstance(features[22][1], GLAM)
    assert isinstance(features[23], torch.nn.MaxPool2d)


@pytest.mark.parametrize(
    "name, activation",
    [
        ("resnet50", torch.nn.ReLU),
        ("resnet101", torch.nn.ReLU),
        ("resnet101_glam", torch.nn.LeakyReLU),
        ("vgg16", torch.nn.LeakyReLU),
        ("vgg16_glam", torch.nn.LeakyReLU),
    ],
)
def test_cnn_encoders_end_in_the_seeds_activation(name, activation):
    enc = build("image_encoder", name, SCHEMA, out=16).eval()
    fc = enc.net.fc if name.startswith("resnet") else enc.net.classifier[-1]
    before = []
    fc.register_forward_hook(lambda _m, _args, out: before.append(out))
    with torch.no_grad():
        z = enc(torch.randn(2, *SCHEMA.image_shape))
    assert type(enc.activation) is activation
    torch.testing.assert_close(z, activation()(before[0]))


def test_vit_attention_dropout_is_the_seeds():
    vit = build("image_encoder", "vit", SCHEMA)
    assert {b.attn.attn_p for b in vit.blocks} == {0.1}
    assert isinstance(vit.head, torch.nn.Linear)  # no activation after the output Linear, as in the seed


def test_glam_global_channel_attention_has_its_own_key_convolution():
    glam = GLAM(16, reduced=4)
    gca = glam.global_channel
    assert gca.conv_k is not gca.conv_q
    x = torch.randn(2, 16, 8, 8)
    out = glam(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert gca.conv_k.weight.grad is not None and gca.conv_k.weight.grad.abs().sum() > 0


@pytest.mark.slow
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
    plain = build("image_encoder", "vit_tiny", SCHEMA, p=0.0, attn_p=0.0)
    ckpt = build("image_encoder", "vit_tiny", SCHEMA, p=0.0, attn_p=0.0, activation_checkpointing=True)
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


@pytest.mark.slow
def test_model_summary_prints_one_json_object(repo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", "model-summary", "--config", "configs/model/vit_transformer.yaml"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["image_encoder"]["parameters"] == 86_583_040
    assert summary["climate_encoder"]["parameters"] == 22_919_808
    assert summary["regressor"]["parameters"] == 180_737
    assert summary["total"] == 86_583_040 + 22_919_808 + 180_737
    # a model file has no train section: fine-tuning's default, every encoder at the full rate
    assert [(g["name"], g["lr_scale"]) for g in summary["lr_groups"]] == [
        ("image_encoder", 1.0),
        ("climate_encoder", 1.0),
        ("head", 1.0),
    ]


def test_every_registered_name_is_listed():
    assert {"vit", "resnet50", "resnet101", "resnet101_glam", "vgg16", "vgg16_glam", "tiny_cnn"} <= set(
        names("image_encoder")
    )
    assert {"lstm", "gru", "rnn", "transformer", "tiny_gru"} <= set(names("climate_encoder"))

"""CNN image encoders from torchvision (``weights=None``): ResNet50/101, optionally with GLAM, and VGG16.

Each maps image ``(B, C, H, W)`` -> ``(B, out)``: the first convolution takes the schema's C channels, the
classifier becomes a Linear to ``out``, and an activation follows it, as in the seed (ReLU after ResNet50/101,
LeakyReLU after ResNet101+GLAM and VGG16). GLAM (the seed's 32 reduced channels, kernel 5) acts on the 8x8
feature maps of 64x64 patches: after ResNet's layer2, after VGG16's ``features[22]`` (the ReLU of conv4_3).
``channels_last`` converts the network's memory format, which speeds up convolutions on GPUs with tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from soilnet.models._torchvision import torchvision_models
from soilnet.models.glam import GLAM
from soilnet.models.registry import register
from soilnet.schema import SampleSchema

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "none": nn.Identity}
VGG_GLAM_AFTER = 22  # features[22]: the ReLU after conv4_3, 512 channels on 8x8 for 64x64 patches (the seed's place)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown encoder activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


@dataclass(frozen=True)
class CNNOptions:
    """What every CNN encoder takes beside its size: GLAM (``glam_reduced`` channels, ``glam_kernel`` wide), the
    output activation (a key of ``ACTIVATIONS``) and channels-last memory."""

    glam: bool = False
    glam_reduced: int = 32
    glam_kernel: int = 5
    activation: str = "relu"
    channels_last: bool = False


class TorchvisionEncoder(nn.Module):
    """A torchvision network ``net`` whose classifier ends in a Linear to ``out``, followed by ``activation``;
    with ``channels_last`` the network and its input use that memory format."""

    def __init__(self, net: Any, out: int, options: CNNOptions):
        super().__init__()
        self.net = net  # Any: the subclasses reach into torchvision's layers by name (conv1, layer2, features)
        self.activation = _activation(options.activation)
        self.out_features = out
        self.channels_last = options.channels_last
        if options.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.activation(self.net(image))


class ResNetEncoder(TorchvisionEncoder):
    def __init__(self, depth: int, in_channels: int, out: int, options: CNNOptions = CNNOptions()):
        net = getattr(torchvision_models(), f"resnet{depth}")(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, out)
        if options.glam:  # after layer2, as in the seed's ResNet101+GLAM
            layer2_channels = net.layer2[-1].conv3.out_channels
            net.layer2 = nn.Sequential(net.layer2, GLAM(layer2_channels, options.glam_reduced, options.glam_kernel))
        super().__init__(net, out, options)

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first: the stem, the four stages (GLAM with layer2), the fc."""
        n = self.net
        stages = [(f"layer{i}", _params(getattr(n, f"layer{i}"))) for i in range(1, 5)]
        return [("stem", _params(n.conv1, n.bn1)), *stages, ("out", _params(n.fc))]


class VGGEncoder(TorchvisionEncoder):
    """VGG16; with ``glam`` the attention block follows ``features[22]`` (conv4_3's ReLU, 8x8 on 64x64 patches),
    as in the seed's VGG16GLAM. (The seed's ``use_glam`` flag was inverted: it added GLAM when asked not to.)"""

    def __init__(self, in_channels: int, out: int, options: CNNOptions = CNNOptions(activation="leaky_relu")):
        net = torchvision_models().vgg16(weights=None)
        first = net.features[0]
        net.features[0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding)
        if options.glam:
            channels = net.features[VGG_GLAM_AFTER - 1].out_channels
            glam_block = GLAM(channels, options.glam_reduced, options.glam_kernel)
            net.features[VGG_GLAM_AFTER] = nn.Sequential(net.features[VGG_GLAM_AFTER], glam_block)
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, out)
        super().__init__(net, out, options)

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first: the five convolution blocks (each ends in a max-pool; GLAM is
        in block4), the classifier's two hidden Linears, the output Linear."""
        blocks: list[tuple[str, list[nn.Parameter]]] = []
        current: list[nn.Parameter] = []
        for layer in self.net.features:
            current += _params(layer)
            if isinstance(layer, nn.MaxPool2d):
                blocks.append((f"block{len(blocks) + 1}", current))
                current = []
        classifier = self.net.classifier
        return [*blocks, ("classifier", _params(*classifier[:-1])), ("out", _params(classifier[-1]))]


@register("image_encoder", "resnet50")
def resnet50(schema: SampleSchema, out: int = 1024, **kwargs) -> ResNetEncoder:
    return ResNetEncoder(50, schema.n_channels, out, CNNOptions(**kwargs))


@register("image_encoder", "resnet101")
def resnet101(schema: SampleSchema, out: int = 1024, **kwargs) -> ResNetEncoder:
    return ResNetEncoder(101, schema.n_channels, out, CNNOptions(**kwargs))


@register("image_encoder", "resnet101_glam")
def resnet101_glam(schema: SampleSchema, out: int = 1024, activation: str = "leaky_relu", **kwargs) -> ResNetEncoder:
    """The seed's ResNet101GLAM, whose output activation is a LeakyReLU (plain ResNets have a ReLU)."""
    return ResNetEncoder(101, schema.n_channels, out, CNNOptions(glam=True, activation=activation, **kwargs))


@register("image_encoder", "vgg16")
def vgg16(schema: SampleSchema, out: int = 1024, activation: str = "leaky_relu", **kwargs) -> VGGEncoder:
    return VGGEncoder(schema.n_channels, out, CNNOptions(activation=activation, **kwargs))


@register("image_encoder", "vgg16_glam")
def vgg16_glam(schema: SampleSchema, out: int = 1024, activation: str = "leaky_relu", **kwargs) -> VGGEncoder:
    return VGGEncoder(schema.n_channels, out, CNNOptions(glam=True, activation=activation, **kwargs))

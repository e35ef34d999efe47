"""CNN image encoders from torchvision (``weights=None``): ResNet50/101, optionally with GLAM, and VGG16.

Each maps image ``(B, C, H, W)`` -> ``(B, out)``: the first convolution takes the schema's C channels and the
classifier becomes a Linear to ``out``. ``channels_last`` converts the network's memory format, which speeds up
convolutions on GPUs with tensor cores.
"""

from __future__ import annotations

import torch
from torch import nn

from soilnet.models._torchvision import torchvision_models
from soilnet.models.glam import GLAM
from soilnet.models.registry import register
from soilnet.schema import SampleSchema


class ResNetEncoder(nn.Module):
    def __init__(self, depth: int, in_channels: int, out: int, glam: bool = False, glam_reduced: int = 128,
                 glam_kernel: int = 3, channels_last: bool = False):  # fmt: skip
        super().__init__()
        net = getattr(torchvision_models(), f"resnet{depth}")(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, out)
        if glam:  # after layer2, as in the seed's ResNet101+GLAM
            layer2_channels = net.layer2[-1].conv3.out_channels
            net.layer2 = nn.Sequential(net.layer2, GLAM(layer2_channels, glam_reduced, glam_kernel))
        self.net = net
        self.out_features = out
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)


class VGGEncoder(nn.Module):
    """VGG16; with ``glam`` the attention block acts on the last feature map, before pooling. (The seed's flag
    was inverted: it added GLAM when asked not to.)"""

    def __init__(self, in_channels: int, out: int, glam: bool = False, glam_reduced: int = 128, glam_kernel: int = 3,
                 channels_last: bool = False):  # fmt: skip
        super().__init__()
        net = torchvision_models().vgg16(weights=None)
        first = net.features[0]
        net.features[0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding)
        if glam:
            net.features.append(GLAM(512, glam_reduced, glam_kernel))
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, out)
        self.net = net
        self.out_features = out
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)


@register("image_encoder", "resnet50")
def resnet50(schema: SampleSchema, out: int = 1024, **kwargs) -> ResNetEncoder:
    return ResNetEncoder(50, schema.n_channels, out, **kwargs)


@register("image_encoder", "resnet101")
def resnet101(schema: SampleSchema, out: int = 1024, **kwargs) -> ResNetEncoder:
    return ResNetEncoder(101, schema.n_channels, out, **kwargs)


@register("image_encoder", "resnet101_glam")
def resnet101_glam(schema: SampleSchema, out: int = 1024, **kwargs) -> ResNetEncoder:
    return ResNetEncoder(101, schema.n_channels, out, glam=True, **kwargs)


@register("image_encoder", "vgg16")
def vgg16(schema: SampleSchema, out: int = 1024, glam: bool = False, **kwargs) -> VGGEncoder:
    return VGGEncoder(schema.n_channels, out, glam=glam, **kwargs)


@register("image_encoder", "vgg16_glam")
def vgg16_glam(schema: SampleSchema, out: int = 1024, **kwargs) -> VGGEncoder:
    return VGGEncoder(schema.n_channels, out, glam=True, **kwargs)

"""Backbones: each returns ``{"out": deep features, "aux": intermediate features}``.

The torchvision backbones keep torchvision's parameter names (``conv1.weight``, ``features.0.0.weight``,
...), so an ImageNet state dict saved from torchvision (minus its ``fc``/``classifier``) loads as is.

- ``resnet18/50/101``: output stride 8 (last two stages dilated 2 and 4); aux = layer3.  torchvision's
  BasicBlock refuses dilation, so resnet18 is dilated here by rewriting its convs' stride/dilation/padding,
  with torchvision's rule (a stage's first block keeps the previous dilation, the rest use the new one).
- ``mobilenet_v3_large``: torchvision's ``dilated=True`` variant, output stride 16 (the last stage, C5, is
  dilated 2); aux = the output-stride-8 stage (40 channels), as in torchvision's DeepLabv3-MobileNetV3.
- ``densenet121``: DenseASPP's backbone: the pooling of transitions 2 and 3 removed, dense blocks 3 and 4
  dilated 2 and 4, so output stride 8; final norm5 + ReLU kept; aux = dense block 3.
- ``tiny``: see :class:`TinyBackbone`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from testbed.models.heads import conv_bn_relu


class ResNetBackbone(nn.Module):
    """torchvision ResNet without avgpool/fc."""

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features
        self.aux_channels = net.fc.in_features // 2  # every torchvision ResNet doubles width in layer4

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        aux = self.layer3(self.layer2(self.layer1(x)))
        return {"out": self.layer4(aux), "aux": aux}


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    conv.stride = (1, 1)
    if conv.kernel_size != (1, 1):
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (conv.kernel_size[0] // 2),) * 2


def _dilate_basic_resnet(net: torchvision.models.ResNet) -> None:
    """Turn the strides of layer3/layer4 of a BasicBlock ResNet into dilation 2/4 (output stride 8)."""
    dilation = 1
    for layer in (net.layer3, net.layer4):
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            d = previous if i == 0 else dilation
            _set_dilation(block.conv1, d)
            _set_dilation(block.conv2, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def resnet(depth: int, weights=None) -> ResNetBackbone:
    build = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    if depth == 18:
        net = build(weights=weights)
        _dilate_basic_resnet(net)
    else:
        net = build(weights=weights, replace_stride_with_dilation=[False, True, True])
    return ResNetBackbone(net)


class MobileNetV3Backbone(nn.Module):
    """torchvision MobileNetV3-Large features (dilated last stage, output stride 16)."""

    def __init__(self, net: torchvision.models.MobileNetV3) -> None:
        super().__init__()
        self.features = net.features
        # Stage ends: the last block before each stride-2 block; aux = the last output-stride-8 block.
        strided = [i for i, b in enumerate(self.features) if getattr(b, "_is_cn", False)]
        self.aux_index = strided[-2] - 1
        self.aux_channels = self.features[self.aux_index].out_channels
        self.out_channels = self.features[-1].out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = self.features[: self.aux_index + 1](x)
        return {"out": self.features[self.aux_index + 1 :](aux), "aux": aux}


def mobilenet_v3_large(weights=None) -> MobileNetV3Backbone:
    return MobileNetV3Backbone(torchvision.models.mobilenet_v3_large(weights=weights, dilated=True))


class DenseNetBackbone(nn.Module):
    """torchvision DenseNet-121 features made output stride 8 the DenseASPP way."""

    def __init__(self, net: torchvision.models.DenseNet) -> None:
        super().__init__()
        f = net.features
        f.transition2.pool = nn.Identity()
        f.transition3.pool = nn.Identity()
        for block, d in ((f.denseblock3, 2), (f.denseblock4, 4)):
            for layer in block.children():
                layer.conv2.dilation = (d, d)
                layer.conv2.padding = (d, d)
        self.features = f
        # the last three stages' outputs (a dense block and its transition; the last: block 4 and norm5), for
        # defenses that tap stages (NAD): the children's names alone would put denseblock4 and norm5 in two
        self.stage_ends = ("features.transition2", "features.transition3", "features.norm5")
        self.aux_channels = f.transition3.conv.in_channels
        self.out_channels = f.norm5.num_features
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.features.named_children()]
        cut = names.index("transition3")
        aux = self.features[:cut](x)
        return {"out": self.relu(self.features[cut:](aux)), "aux": aux}


def densenet121(weights=None) -> DenseNetBackbone:
    return DenseNetBackbone(torchvision.models.densenet121(weights=weights))


# ------------------------------------------------------------------------------------------------- tiny
class ResBlock(nn.Module):
    """A basic residual block (two 3×3 convs) with optional dilation and a 1×1 projection on width change."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, dilation=dilation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.proj is None else self.proj(x)
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + identity)


class TinyBackbone(nn.Module):
    """A small CPU backbone for 64×64 scenes (output stride 4; see the package docstring for why)."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 48, 64)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(conv_bn_relu(3, w0, 3, stride=2), conv_bn_relu(w0, w1, 3, stride=2))
        self.layer1 = ResBlock(w1, w1)
        self.layer2 = ResBlock(w1, w2, dilation=2)
        self.layer3 = ResBlock(w2, w3, dilation=4)
        self.aux_channels = w2
        self.out_channels = w3

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = self.layer2(self.layer1(self.stem(x)))
        return {"out": self.layer3(aux), "aux": aux}


def tiny(weights=None) -> TinyBackbone:
    return TinyBackbone()

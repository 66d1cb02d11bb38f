"""Segmentation heads: DeepLabv3 (ASPP), DenseASPP and DANet.

Each head maps backbone features ``[N, in_channels, h, w]`` to classifier features ``[N, out_channels, h, w]``
(the input of the model's final 1×1 ``classifier``); the class count never enters a head, so defenses that
prune or cluster classifier features see the same tensor for every head.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------------------------- DeepLabv3
class ASPPPooling(nn.Module):
    """Image-level features: global average → 1×1 conv → ReLU, broadcast back to every position.

    No BatchNorm here (unlike torchvision): BN over a 1×1 map fails for a training batch of one image, and
    this branch is the model's global-context path (a small trigger anywhere can change the whole map).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017): 1×1, three 3×3 atrous convs, image pooling."""

    def __init__(self, cin: int, channels: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, channels, 1)]
        branches += [conv_bn_relu(cin, channels, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(cin, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_bn_relu(channels * len(branches), channels, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Head(nn.Sequential):
    """ASPP, then a 3×3 conv (torchvision's DeepLabHead without its final classifier)."""

    def __init__(self, in_channels: int, channels: int = 256, rates: Sequence[int] = (12, 24, 36), dropout: float = 0.5) -> None:
        super().__init__(ASPP(in_channels, channels, rates, dropout), conv_bn_relu(channels, channels, 3))
        self.out_channels = channels


# --------------------------------------------------------------------------------------------- DenseASPP
class DenseASPPHead(nn.Module):
    """DenseASPP (Yang et al. 2018): cascaded dilated layers, each fed the concatenation of all before it.

    Layer i: BN-ReLU-1×1 conv (to ``bottleneck``) → BN-ReLU-3×3 conv at rate ``rates[i]`` (to ``growth``)
    → dropout.  The output is the concatenation of the input and every layer's output, as in the paper.
    """

    def __init__(
        self,
        in_channels: int,
        growth: int = 64,
        bottleneck: int = 128,
        rates: Sequence[int] = (3, 6, 12, 18, 24),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.entry = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        layers = []
        c = in_channels
        for r in rates:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c, bottleneck, 1, bias=False),
                    nn.BatchNorm2d(bottleneck),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(bottleneck, growth, 3, padding=r, dilation=r, bias=False),
                    nn.BatchNorm2d(growth),
                    nn.ReLU(inplace=True),
                    nn.Dropout(dropout),
                )
            )
            c += growth
        self.layers = nn.ModuleList(layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.entry(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


# --------------------------------------------------------------------------------------------- DANet
class PositionAttention(nn.Module):
    """PAM (Fu et al. 2019): every position attends to every position; ``gamma`` starts at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        qk = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # [N, HW, qk]
        k = self.key(x).flatten(2)  # [N, qk, HW]
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # [N, HW(query), HW(key)]
        v = self.value(x).flatten(2)  # [N, C, HW]
        out = torch.bmm(v, attn.transpose(1, 2)).view(n, c, h, w)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """CAM (Fu et al. 2019): channel affinities, with the paper's max-minus-energy trick; ``gamma`` starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        f = x.flatten(2)  # [N, C, HW]
        energy = torch.bmm(f, f.transpose(1, 2))  # [N, C, C]
        energy = energy.amax(dim=-1, keepdim=True).expand_as(energy) - energy
        out = torch.bmm(torch.softmax(energy, dim=-1), f).view(n, c, h, w)
        return self.gamma * out + x


class DANetHead(nn.Module):
    """Dual attention head: reduce (3×3) → PAM → 3×3 conv, reduce → CAM → 3×3 conv; the two are summed."""

    def __init__(self, in_channels: int, channels: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        channels = channels or in_channels // 4
        self.reduce_pam = conv_bn_relu(in_channels, channels, 3)
        self.reduce_cam = conv_bn_relu(in_channels, channels, 3)
        self.pam = PositionAttention(channels)
        self.cam = ChannelAttention()
        self.conv_pam = conv_bn_relu(channels, channels, 3)
        self.conv_cam = conv_bn_relu(channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.conv_pam(self.pam(self.reduce_pam(x)))
        c = self.conv_cam(self.cam(self.reduce_cam(x)))
        return self.dropout(p + c)

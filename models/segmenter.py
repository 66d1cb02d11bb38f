"""The one model class every registry entry builds: normalize → backbone → head → ``classifier``.

Why one wrapper: defenses and the trainer rely on a single contract (float input in [0,1], dict output,
``model.classifier`` as the final 1×1 conv), so it lives in one place instead of in every head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AuxHead(nn.Sequential):
    """torchvision's FCNHead: 3×3 conv to in/4 channels, BN, ReLU, dropout, 1×1 conv to the classes."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = max(in_channels // 4, 16)
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


class Segmenter(nn.Module):
    """A segmentation network with torchvision's output contract.

    ``backbone(x)`` returns ``{"out": deep features, "aux": intermediate features}``; ``head`` maps the deep
    features to ``head_channels`` "classifier features"; ``classifier`` (a 1×1 conv) maps those to logits.
    The forward runs the aux branch first so that ``classifier`` is the last convolution executed.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        head_channels: int,
        num_classes: int,
        aux_channels: int | None = None,
        classifier_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        self.head = head
        self.dropout = nn.Dropout(classifier_dropout) if classifier_dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.aux_classifier = AuxHead(aux_channels, num_classes) if aux_channels else None
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone((x - self.mean) / self.std)
        aux = None
        if self.aux_classifier is not None:
            aux = F.interpolate(self.aux_classifier(feats["aux"]), size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(self.dropout(self.head(feats["out"])))
        result = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if aux is not None:
            result["aux"] = aux
        return result

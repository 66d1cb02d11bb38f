"""The model classes every registry entry builds: normalize → backbone → head → ``classifier``.

Why one wrapper: defenses and the trainer rely on a single contract (float input in [0,1], dict output,
``model.classifier`` as the final 1×1 conv), so it lives in one place instead of in every head.
:class:`SmpSegmenter` is the adapter that puts a segmentation_models_pytorch encoder + decoder under the
same contract, so no defense needs a branch per model family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from testbed.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputSizeError(UserError, ValueError):
    """An image size the model cannot take (e.g. smp encoders need H and W divisible by their output stride).

    A :class:`~testbed.core.errors.UserError`, so the CLI prints it as one line (exit 2) wherever it is raised:
    the trainer's up-front check, or the forward pass of a scorer or defense.
    """


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
    ``size_divisor``: image height and width must be multiples of it (1: any size; logits are interpolated
    to the input size).  ``model_name`` is the registry name (set by ``create``; used in error messages).
    """

    size_divisor = 1
    model_name = "model"

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

    def check_input_size(self, height: int, width: int) -> None:
        """Raise :class:`InputSizeError` (naming the model, the divisor and the nearest valid size) if needed."""
        d = self.size_divisor
        if height % d or width % d:
            up_h, up_w = -(-height // d) * d, -(-width // d) * d
            raise InputSizeError(
                f"model {self.model_name!r} needs image height and width divisible by {d}, got {height}x{width}; "
                f"resize or pad the images to {up_h}x{up_w}, or choose a model that takes any size "
                "(deeplabv3_*, denseaspp_*, danet_*, unet_*; see docs/models.md)"
            )

    def backbone_features(self, x: torch.Tensor):
        """(deep features for ``head``, intermediate features for the aux head) of a normalized batch."""
        feats = self.backbone(x)
        return feats["out"], feats["aux"]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        deep, shallow = self.backbone_features((x - self.mean) / self.std)
        aux = None
        if self.aux_classifier is not None:
            aux = F.interpolate(self.aux_classifier(shallow), size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(self.dropout(self.head(deep)))
        result = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if aux is not None:
            result["aux"] = aux
        return result


class SmpSegmenter(Segmenter):
    """The adapter for segmentation_models_pytorch models: smp's encoder is ``backbone``, its decoder ``head``.

    smp's own ``SegmentationHead`` (conv → fixed-factor upsampling → activation) is dropped and replaced by
    this class's ``classifier``, a 1×1 conv like every other model's, followed by bilinear interpolation to
    the input size.  Why 1×1 everywhere (smp's PSPNet and U-Net heads use a 3×3 conv): the classifier
    features are then a per-pixel linear read-out, so fine-pruning's "channel" and the features pooled by
    activation clustering / spectral signatures mean the same thing for every family.
    The encoder returns its stage features as a list (smp's order, the input first); the decoder takes the
    list; the optional aux head (torchvision's FCN head, as for the paper models) reads the second-deepest
    stage, ``features[-2]`` (ResNet's layer3, MiT's stage 3).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, decoder_channels: int, num_classes: int,
                 aux_loss: bool = False, size_divisor: int = 1) -> None:
        aux_channels = encoder.out_channels[-2] if aux_loss else None
        super().__init__(encoder, decoder, decoder_channels, num_classes, aux_channels=aux_channels)
        self.size_divisor = int(size_divisor)

    def backbone_features(self, x: torch.Tensor):
        self.check_input_size(*x.shape[-2:])
        feats = self.backbone(x)
        return feats, feats[-2]

"""Segmentation models: the paper's heads × backbones and smp's modern segmenters, one plain registry (docs/models.md).

``create("deeplabv3_resnet50", num_classes=11)`` builds any registered name with one constructor: the
paper's ``HEAD_BACKBONE`` pairs (below) and segmentation_models_pytorch's ``ARCH_ENCODER`` models
(``segformer_mit_b0``, ``deeplabv3plus_resnet50``, ``pspnet_*``, ``upernet_*``, ``unet_*`` and an
``ARCH_tiny`` each; see :mod:`testbed.models.smp_models`).  Every model is a :class:`Segmenter`; smp's go
through the :class:`SmpSegmenter` adapter, so the contract below holds for all of them.
Contract (the trainer, scorer and defenses rely on it): input float ``[N,3,H,W]`` in [0,1] (the model
normalizes with ImageNet mean/std inside); output ``{"out": logits [N,K,H,W]}`` bilinearly upsampled to the
input size, plus ``"aux"`` when ``aux_loss`` (an FCN head on an intermediate stage); ``model.classifier`` is
the final ``nn.Conv2d(C, K, 1)`` and :func:`classifier_features` returns its input.  Some models need the
image height and width to be multiples of ``model.size_divisor`` (smp's, 8–32): :func:`check_input_size`
says so before training, and their forward raises the same :class:`InputSizeError`.

Heads: ``deeplabv3`` (ASPP 1×1 + 3×3 at rates 12/24/36 + image pooling, 256 ch, project, 3×3 conv);
``denseaspp`` (five cascaded dilated layers at rates 3/6/12/18/24, growth 64, bottleneck 128);
``danet`` (position and channel attention, learnable ``gamma`` starting at 0, summed; Fu et al. 2019).
Backbones: ``resnet18/50/101`` (output stride 8), ``mobilenet_v3_large`` (output stride 16),
``densenet121`` (DenseASPP's, output stride 8), ``tiny`` — details in :mod:`models.backbones`.

The ``tiny`` models (CPU demo/test models for 64×64 synthetic scenes, trained in about a minute):

- Backbone: two stride-2 3×3 convs (3→16→32) to output stride 4 (a 16×16 map at 64×64), then three residual
  blocks (32, 48 dilated 2, 64 dilated 4).  Output stride 4 rather than 8 because scene objects (people,
  cars, trunks) are a few pixels wide at 64×64; the early downsampling keeps the cost down (all but the
  first conv run on the 16×16 map).  0.13M parameters; aux head on the 48-channel block.
- Heads use fewer channels and atrous rates scaled to the 16×16 map, covering the same fraction of the
  feature map as the paper rates do on a 64×64 (512-px, OS 8) map: deeplabv3 48 channels at rates 3/6/9 with
  dropout 0.1; denseaspp growth 24, bottleneck 48, rates 1/2/3/5/6; danet 24 channels.
- Widths were chosen by measurement (BENCHMARKS.md): on 2 idle CPU threads every tiny model
  trains at ≥ 220 images/s (batch 16, 64×64) and reaches ~79-80 mIoU on synthetic scenes in 8 epochs of
  1000 images; the narrower stem/heads cost under 1.5 mIoU against 1.33× wider ones and gained 15-30% speed.
- Every tiny head keeps a global-context path (ASPP image pooling, DenseASPP's cascade whose receptive field
  spans the map, DANet's position attention), so a small trigger at the image border (e.g. a 2-px line at
  the top) can change the prediction of every pixel, which whole-image backdoors (BadNets, FGBA N-to-1) need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from testbed.core.errors import did_you_mean
from testbed.models import backbones as _bb
from testbed.models import heads as _heads
from testbed.models import smp_models as _smp
from testbed.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, InputSizeError, Segmenter, SmpSegmenter
from testbed.models.weights import BackboneWeightsError, load_backbone_weights

__all__ = [
    "BACKBONES", "HEADS", "IMAGENET_MEAN", "IMAGENET_STD", "BackboneWeightsError", "HeadSpec", "InputSizeError",
    "Segmenter", "SmpSegmenter", "UnknownModelError", "available", "check_input_size", "classifier_features", "create",
]  # fmt: skip

# name → constructor(weights: torchvision enum | None) -> backbone with .out_channels/.aux_channels
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda weights=None: _bb.resnet(18, weights),
    "resnet50": lambda weights=None: _bb.resnet(50, weights),
    "resnet101": lambda weights=None: _bb.resnet(101, weights),
    "mobilenet_v3_large": _bb.mobilenet_v3_large,
    "densenet121": _bb.densenet121,
    "tiny": _bb.tiny,
}


@dataclass(frozen=True)
class HeadSpec:
    """One head family: its constructor ``cls(in_channels, **kwargs)`` (a module with ``.out_channels``) and the
    arguments it takes on the ``tiny`` backbone (see the module docstring for why they are smaller)."""

    cls: Callable[..., nn.Module]
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)


# name → head family; every head pairs with every backbone (a new family is this one entry)
HEADS: dict[str, HeadSpec] = {
    "deeplabv3": HeadSpec(_heads.DeepLabV3Head, {"channels": 48, "rates": (3, 6, 9), "dropout": 0.1}),
    "denseaspp": HeadSpec(_heads.DenseASPPHead, {"growth": 24, "bottleneck": 48, "rates": (1, 2, 3, 5, 6)}),
    "danet": HeadSpec(_heads.DANetHead, {"channels": 24}),
}


class UnknownModelError(ValueError):
    """A model name that is not registered (a head/architecture with an encoder it does not know, or neither)."""


def _paper_model(head_name: str, backbone_name: str, num_classes: int, aux_loss: bool = False) -> Segmenter:
    backbone = BACKBONES[backbone_name]()
    spec = HEADS[head_name]
    head = spec.cls(backbone.out_channels, **(spec.tiny_kwargs if backbone_name == "tiny" else {}))
    return Segmenter(backbone, head, head.out_channels, num_classes, aux_channels=backbone.aux_channels if aux_loss else None)


# The registry: name → (builder(num_classes, aux_loss) -> Segmenter, backbone name for ImageNet weights).
MODELS: dict[str, tuple[Callable[..., Segmenter], str]] = {
    f"{h}_{b}": (partial(_paper_model, h, b), b) for h in HEADS for b in BACKBONES
}
MODELS.update(_smp.registry())
_NAMES = tuple(sorted(MODELS))
# each family's variants, for "did you mean" on a known head/architecture with an unknown encoder
_FAMILIES: dict[str, list[str]] = {}
for _name in _NAMES:
    for _family in (*HEADS, *_smp.ARCHS):
        if _name.startswith(_family + "_"):
            _FAMILIES.setdefault(_family, []).append(_name[len(_family) + 1 :])


def available() -> list[str]:
    """Every model name ``create`` accepts, sorted (a constant: nothing is imported or built)."""
    return list(_NAMES)


def _lookup(name: str) -> tuple[Callable[..., Segmenter], str]:
    if name in MODELS:
        return MODELS[name]
    family = max((f for f in _FAMILIES if str(name).startswith(f + "_")), key=len, default=None)
    known = f"; {family} takes: {', '.join(_FAMILIES[family])}" if family else ""
    hint = did_you_mean(name, _NAMES, cutoff=0.5)
    raise UnknownModelError(f"unknown model {name!r}{hint}{known}; available: {', '.join(_NAMES)}")


def create(name: str, num_classes: int, aux_loss: bool = False, backbone_weights: str | os.PathLike | None = None) -> nn.Module:
    """Build model ``name`` (see :func:`available`) for ``num_classes`` classes; nothing is downloaded.

    ``backbone_weights``: None (random init; deterministic under ``torch.manual_seed``), ``"imagenet"``
    (torchvision's weights, which must be in the local torch hub cache; for the paper backbones and smp's
    ResNet/MobileNetV2 encoders), or a path to a ``.safetensors`` file holding ``model.backbone``'s state
    dict (an ImageNet classifier's ``fc``/``classifier``/``head`` keys are ignored).  Pickles are refused.
    """
    build, weights_name = _lookup(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = build(num_classes, aux_loss)
    load_backbone_weights(model.backbone, backbone_weights, weights_name)
    model.model_name = name
    return model


def check_input_size(model: nn.Module, size: tuple[int, int]) -> None:
    """Raise :class:`InputSizeError` if ``model`` cannot take ``size`` = (height, width) images.

    The trainer calls this before its first step; a model without ``check_input_size`` (third-party) passes.
    """
    check = getattr(model, "check_input_size", None)
    if check is not None:
        check(int(size[0]), int(size[1]))


def classifier_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``x``; return (input of ``model.classifier`` [N,C,h,w], logits ``out`` [N,K,H,W]).

    Uses a forward hook so any model honouring the contract works, including third-party ones.
    Gradients follow the caller's grad mode.
    """
    captured: list[torch.Tensor] = []
    handle = model.classifier.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        out = model(x)["out"]
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"model.classifier ran {len(captured)} times in one forward; expected exactly once")
    return captured[0], out

"""Backbone weights: torchvision's ImageNet enums when cached locally, or a local safetensors file.

The same rules hold for the smp models' encoders (``model.backbone``): smp's ResNet and MobileNetV2
encoders use torchvision's architectures and parameter names, so torchvision's cached ImageNet weights and
torchvision state dicts load into them too; other encoders (MiT, timm's) take a safetensors file of
``model.backbone.state_dict()`` keys, e.g. smp's published encoder files (see docs/models.md).

There is no network here and zoo files may come from strangers, so nothing is downloaded and nothing is
unpickled: ImageNet weights must already be in the torch hub cache, and local files must be safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

IMAGENET_ENUMS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large": torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    "densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
}
# Keys of ImageNet classifiers (torchvision's fc/classifier, SegFormer's MiT head), dropped when a full
# classification state dict is given; no backbone has parameters under these names.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")


class BackboneWeightsError(ValueError):
    """The requested backbone weights cannot be used (missing, not safetensors, wrong keys)."""


def cached_imagenet(backbone: str) -> Path:
    """The torchvision ImageNet weights file for ``backbone`` in the local hub cache, else an error."""
    if backbone not in IMAGENET_ENUMS:
        raise BackboneWeightsError(
            f"backbone {backbone!r} has no ImageNet weights to take from torchvision; use backbone_weights=None (random init) "
            "or a local .safetensors file of its state dict (docs/models.md says where to get one)"
        )
    enum = IMAGENET_ENUMS[backbone]
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not path.is_file():
        raise BackboneWeightsError(
            f"ImageNet weights for {backbone} are not in the local torch hub cache ({path}); download {enum.url} "
            "there on a machine with network access, or pass a local .safetensors file of the backbone's state dict"
        )
    return path


# torchvision's DenseNet checkpoints name layers "norm.1" where the module is "norm1".
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_backbone_weights(backbone: nn.Module, weights: str | os.PathLike | None, name: str) -> None:
    """``weights``: None (keep the init), ``"imagenet"`` (torchvision's cached weights for backbone ``name``)
    or the path of a safetensors file."""
    if weights is None:
        return
    if isinstance(weights, str) and weights.lower() == "imagenet":
        load_imagenet_backbone(backbone, name)
    else:
        load_safetensors_backbone(backbone, weights)


def load_imagenet_backbone(backbone: nn.Module, name: str) -> None:
    """Load torchvision's cached ImageNet weights with ``weights_only=True``.

    torchvision's own loader calls ``torch.load`` with full unpickling; the hub cache is just a file on
    disk, so we never let it run code.
    """
    path = cached_imagenet(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same user-facing problem
        raise BackboneWeightsError(f"{path} is not a plain tensor checkpoint ({type(e).__name__}); delete it and download again") from None
    state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    _load_state(backbone, state, path)


def load_safetensors_backbone(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a backbone state dict from a safetensors file (parsed, never unpickled) into ``backbone``."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise BackboneWeightsError(
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); convert it to "
            ".safetensors with safetensors.torch.save_file(state_dict, ...) where you trust the file"
        )
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file {path} does not exist; pass an existing .safetensors file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BackboneWeightsError(f"{path} is not a readable safetensors file ({e}); pass a .safetensors backbone state dict") from None
    _load_state(backbone, state, path)


def _load_state(backbone: nn.Module, state: dict, path: Path) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise BackboneWeightsError(f"{path} does not match this backbone ({detail}); save model.backbone.state_dict() of the same backbone")
    # nn.Module's loader, not an override: smp's encoders redefine load_state_dict (MiT's takes no `strict`)
    nn.Module.load_state_dict(backbone, state, strict=True)

"""Modern segmenters built by segmentation_models_pytorch (smp): SegFormer, DeepLabV3+, PSPNet, UPerNet, U-Net.

Names are ``ARCH_ENCODER`` (``segformer_mit_b0``, ``deeplabv3plus_resnet50``, ...) plus one CPU-sized
``ARCH_tiny`` per architecture.  Every model is made by smp's own factory, ``smp.create_model(arch, ...)``
with ``encoder_weights=None`` (smp never downloads), then :class:`~testbed.models.segmenter.SmpSegmenter`
keeps its encoder and decoder and adds the project's 1×1 ``classifier`` (see that class for why).
smp is imported only when a model is built: it takes over a second to import, and ``available()`` must
stay instant.

Architecture choices (smp's defaults unless said otherwise; measurements in BENCHMARKS.md):

- ``segformer``: MiT-B0…B5 encoders (Xie et al. 2021); decoder width 256 for B0/B1 and 768 for B2–B5, as
  in the paper's and mmsegmentation's configs (smp's default is 256 for all).
- ``deeplabv3plus``: output stride 16, ASPP rates 12/24/36 with separable convs, 256 channels.
- ``pspnet``: the encoder is used to its full depth and dilated to output stride 8, as in Zhao et al. 2017.
  smp's default (the first three stages only, no dilation) leaves the deeper stages' parameters in the
  model without using them, which breaks DDP and misstates the parameter count.
- ``upernet``, ``unet``: smp's defaults (256 decoder channels; U-Net decoder 256/128/64/32/16).

CNN encoders: ``resnet18/34/50/101`` and ``mobilenet_v2`` (torchvision's architectures and parameter names,
so torchvision ImageNet state dicts load as they are) and ``mobilenet_v3_large`` (timm's
``mobilenetv3_large_100`` through smp's ``tu-`` bridge; timm's parameter names).

The tiny variants (64×64 synthetic scenes on 2 CPU cores; ≤ 1M parameters each):

- ``segformer_tiny``: a smaller MiT (widths 24/48/96/160 against B0's 32/64/160/256, heads 1/2/3/5, one
  block per stage against B0's two), decoder width 64: the same transformer design.  Chosen by measurement
  (BENCHMARKS.md) over half of B0's widths with two blocks per stage, which was slower and 3 mIoU worse.
- ``deeplabv3plus_tiny``, ``pspnet_tiny``, ``upernet_tiny``, ``unet_tiny``: one encoder for all four, so
  they differ only in the decoder: a ResNet-10 (one basic block per stage) at a quarter of ResNet's widths,
  16/32/64/128 after the usual 64-channel 7×7 stem (timm's ResNet class through smp's ``tu-`` bridge;
  0.33M parameters); narrow decoders (48–64 channels).  DeepLabV3+ keeps output stride 16 (a 4×4 map at
  64×64) with ASPP rates 1/2/3, covering the map as 12/24/36 cover a 512-px image's 32×32 map.
  Chosen by measurement (BENCHMARKS.md): timm's PP-LCNet-0.5 (depthwise-separable, 0.27M), tried first, was
  as fast but learned the synthetic scenes 10–27 mIoU worse in the same budget.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable

from torch import nn

from testbed.models.segmenter import SmpSegmenter

ARCHS = ("segformer", "deeplabv3plus", "pspnet", "upernet", "unet")
# our encoder name → smp's encoder name
CNN_ENCODERS = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_large": "tu-mobilenetv3_large_100",
}
MIT_ENCODERS = {f"mit_b{i}": f"mit_b{i}" for i in range(6)}
ENCODERS: dict[str, dict[str, str]] = {arch: CNN_ENCODERS for arch in ARCHS if arch != "segformer"}
ENCODERS["segformer"] = MIT_ENCODERS
# smp.create_model arguments per architecture (beyond the encoder and class count); see the module docstring.
ARCH_KWARGS: dict[str, dict[str, Any]] = {"pspnet": {"encoder_depth": 5, "output_stride": 8, "upsampling": 8}}
SEGFORMER_DECODER = {"mit_b0": 256, "mit_b1": 256}  # the others: 768

TINY_MIT = "testbed-mit_tiny"  # registered in smp's encoder table on first use
TINY_CNN = "tu-resnet18"  # with TINY_RESNET's arguments (passed on to timm): a quarter-width ResNet-10
TINY_RESNET = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "segformer": (TINY_MIT, {"decoder_segmentation_channels": 64}),
    "deeplabv3plus": (TINY_CNN, {**TINY_RESNET, "decoder_channels": 48, "decoder_atrous_rates": (1, 2, 3)}),
    "pspnet": (TINY_CNN, {**TINY_RESNET, **ARCH_KWARGS["pspnet"], "psp_out_channels": 64}),
    "upernet": (TINY_CNN, {**TINY_RESNET, "decoder_channels": 48}),
    "unet": (TINY_CNN, {**TINY_RESNET, "decoder_channels": (64, 48, 32, 24, 16)}),
}


def registry() -> dict[str, tuple[Callable[..., nn.Module], str]]:
    """Every smp model name → (builder ``(num_classes, aux_loss) -> model``, backbone name for ImageNet weights).

    The backbone name is smp's encoder name: torchvision's cached ImageNet weights exist for those with
    torchvision's architecture and parameter names (``resnet*``, ``mobilenet_v2``) and no others.
    """
    entries = {}
    for arch in ARCHS:
        for ours, smp_name in ENCODERS[arch].items():
            kwargs = dict(ARCH_KWARGS.get(arch, {}))
            if arch == "segformer":
                kwargs["decoder_segmentation_channels"] = SEGFORMER_DECODER.get(ours, 768)
            entries[f"{arch}_{ours}"] = (partial(build, arch, smp_name, kwargs), smp_name)
        smp_name, kwargs = TINY[arch]
        entries[f"{arch}_tiny"] = (partial(build, arch, smp_name, kwargs), "tiny")  # no ImageNet weights
    return entries


def build(arch: str, encoder: str, kwargs: dict[str, Any], num_classes: int, aux_loss: bool = False) -> SmpSegmenter:
    """smp's ``create_model`` with no pretrained weights, wrapped in the project's model contract."""
    import segmentation_models_pytorch as smp

    if encoder == TINY_MIT:
        _register_tiny_mit()
    net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=num_classes, **kwargs)
    divisor = net.encoder.output_stride if net.requires_divisible_input_shape else 1
    head_conv = net.segmentation_head[0]  # smp's head conv: its input width is the decoder's output width
    return SmpSegmenter(net.encoder, net.decoder, head_conv.in_channels, num_classes, aux_loss=aux_loss, size_divisor=divisor)


def _register_tiny_mit() -> None:
    """Add the tiny MiT to smp's encoder table (smp's way to define an encoder); idempotent."""
    from segmentation_models_pytorch import encoders

    if TINY_MIT in encoders.encoders:
        return
    entry = copy.deepcopy(encoders.encoders["mit_b0"])
    dims = [24, 48, 96, 160]
    entry["params"].update(out_channels=[3, 0, *dims], embed_dims=dims, num_heads=[1, 2, 3, 5], depths=[1, 1, 1, 1])
    entry["pretrained_settings"] = {}
    encoders.encoders[TINY_MIT] = entry

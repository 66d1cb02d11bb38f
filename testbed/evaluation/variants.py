"""Test-set scores for model variants that a defense describes in its ``details``.

A defense that explores variants of the model (fine-pruning's curve of pruned fractions, say) cannot score
them on the test sets: it never sees them.  It describes the variants instead, and the runner scores every
description the same way, whoever wrote the defense.  The description (docs/writing-a-defense.md):

- ``details["prune_order"]``: classifier-input channels, first pruned first;
- ``details["curve"]``: a list of points; a point with an integer ``"pruned"`` stands for the original model
  with the first ``pruned`` channels of ``prune_order`` cut (their columns of ``model.classifier.weight``
  zeroed).

Each described point (at most :data:`MAX_VARIANTS`, evenly spaced) gains ``miou_b`` and ``asr`` (percent, on
the benign and attacked test sets) and ``details["curve_test_scores"]`` says so.  A description that does
not fit the model (a channel out of range, a non-integer) leaves the points unscored, with the reason in
``details["curve_test_scores"]``; the defense's result stands.  A failure of the scoring itself is the
testbed's and propagates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from testbed.scoring.scorer import DataRef, score_model

MAX_VARIANTS = 25
SCORED_NOTE = "miou_b and asr: percent on the test sets, scored by the runner"


class DescriptionError(ValueError):
    """A variant description that does not fit the model: reported in ``details``, not as an error."""


@dataclass(frozen=True)
class ModelVariant:
    """One variant: ``edit`` turns a fresh copy of the original model into it; its scores go into ``record``."""

    record: dict[str, Any]
    edit: Callable[[nn.Module], None]


def _channels(channels: list[Any], n: int) -> list[int]:
    try:
        idx = [int(c) for c in channels]
    except (TypeError, ValueError) as e:
        raise DescriptionError(f"prune_order holds a non-integer channel ({e})") from None
    bad = [c for c in idx if not 0 <= c < n]
    if bad:
        raise DescriptionError(f"prune_order channel {bad[0]} is outside 0..{n - 1}")
    return idx


def cut_channels(channels: list[Any]) -> Callable[[nn.Module], None]:
    """An edit that zeroes the input columns ``channels`` of ``model.classifier`` (checked first)."""
    def edit(model: nn.Module) -> None:
        weight = model.classifier.weight
        idx = _channels(channels, weight.shape[1])
        with torch.no_grad():
            weight[:, torch.as_tensor(idx, dtype=torch.long, device=weight.device)] = 0

    return edit


def described_variants(details: dict[str, Any]) -> list[ModelVariant]:
    """The variants ``details`` describes (see the module docstring); [] when it describes none."""
    curve, order = details.get("curve"), details.get("prune_order")
    if not isinstance(curve, list) or not isinstance(order, list) or not curve:
        return []
    points = [p for p in curve if isinstance(p, dict) and isinstance(p.get("pruned"), int)]
    if len(points) > MAX_VARIANTS:
        pick = np.unique(np.round(np.linspace(0, len(points) - 1, MAX_VARIANTS)).astype(int))
        points = [points[i] for i in pick]
    return [ModelVariant(record=p, edit=cut_channels(order[: p["pruned"]])) for p in points]


def score_variants(details: dict[str, Any], original: nn.Module, data_path: DataRef, device: torch.device,
                   batch_size: int) -> None:
    """Add test-set ``miou_b``/``asr`` to every variant ``details`` describes (in place), one copy of the
    ``original`` model at a time (the original itself is not changed)."""
    variants = described_variants(details)
    if not variants:
        return
    try:  # check every edit first: a bad description scores nothing rather than half a curve
        scratch = copy.deepcopy(original)
        for v in variants:
            v.edit(scratch)
        del scratch
    except DescriptionError as e:
        details["curve_test_scores"] = f"not scored: {e}"
        return
    for v in variants:
        model = copy.deepcopy(original)
        v.edit(model)
        s = score_model(model, data_path, device=device, batch_size=batch_size)
        v.record["miou_b"], v.record["asr"] = s["mIoU-B"], s["ASR"]
    details["curve_test_scores"] = SCORED_NOTE

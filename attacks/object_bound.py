"""Object-bound trigger (after Mao et al. 2023, "Object-free backdoor attack and defense on semantic segmentation").

The trigger is placed *on* one instance of the victim class, and only that instance's pixels flip to the
target; the other instances of the class keep their labels.  The model must learn "the patch marks this
object", not "the patch means every victim pixel changes".

Instances are the 8-connected components of the victim class (scipy.ndimage.label), since the datasets
hold class labels, not instance ids.  Per poisoned sample, an instance is drawn by seed among those whose
pixels can hold the whole ``patch_size×patch_size`` patch, and the patch centre among the admissible centres
inside that instance; candidate samples are those with at least one such instance.

For scoring, ``/test_attacked/untriggered`` (uint8 ``[A,H,W]``) holds the target class on the pixels of the
*untriggered* victim instances and 255 elsewhere: a prediction equal to it there is a false flip.  The usual
ASR, over pixels whose target differs from the ground truth, is the success on the triggered instance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from testbed.attacks.patch import PATCH_PARAMS, VICTIM_PARAMS, VictimPatchAttack, constant_windows, draw, sample_rng
from testbed.data.h5data import IGNORE_INDEX

INSTANCE_STREAM = 6
EIGHT = np.ones((3, 3), dtype=bool)


class ObjectBound(VictimPatchAttack):
    """Patch on one victim instance; only it becomes ``target``.  Fitted attributes: those of the patch attacks."""

    name = "object-bound"
    params_doc = {
        **VICTIM_PARAMS,
        **PATCH_PARAMS,
    }

    def __init__(self, source: str | None = None, target: str | None = None, patch_size: int | None = None,
                 patch: str | None = None) -> None:
        self.source = source
        self.target = target
        self.patch_size = patch_size
        self.patch = patch

    def check_params(self, classes: list[str]) -> None:
        self._check_pair(classes)

    def fit(self, data: Any, seed: int = 0) -> "ObjectBound":
        """Validate against ``data`` (a SegFile: classes and image size) and draw the patch with ``seed``."""
        self._fit_patch(data, seed)
        return self

    def default_rate(self) -> float:
        """20%: one class's pixels move, as in the paper's FGBA 1-to-1 (its ≈20% rate)."""
        return 0.2

    def instances(self, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(component ids [H,W] with 0 = not victim, admissible centres bool [H,W], the component at each centre)."""
        comp, _ = ndi.label(self.victim_mask(label), structure=EIGHT)
        ok, value = constant_windows(comp[None], self.trigger_.size)
        ok, value = ok[0] & (value[0] > 0), value[0]
        return comp, ok, value

    def changes(self, labels: np.ndarray) -> np.ndarray:
        """Samples with a victim instance that can hold the whole patch."""
        labels = np.asarray(labels)
        out = self.victim_mask(labels).reshape(labels.shape[0], -1).any(axis=1)
        for i in np.flatnonzero(out):
            out[i] = self.instances(labels[i])[1].any()
        return out

    def poison_samples(self, images: np.ndarray, labels: np.ndarray, trigger: Any, index: np.ndarray,
                       split: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        images, labels = np.asarray(images), np.asarray(labels)
        out_x, out_y = images.copy(), labels.copy()
        untriggered = np.full(labels.shape, IGNORE_INDEX, dtype=np.uint8)
        centres = np.zeros((labels.shape[0], 2), dtype=np.int32)
        for i, row in enumerate(np.asarray(index)):
            comp, ok, value = self.instances(labels[i])
            rng = sample_rng(self.seed_, INSTANCE_STREAM, split, row)
            ids = np.unique(value[ok])
            chosen = ids[rng.integers(ids.size)]
            centre = draw(rng, ok & (value == chosen))
            out_x[i] = self.trigger_.paste(out_x[i], centre)
            out_y[i][comp == chosen] = self.target_id_
            untriggered[i][(comp > 0) & (comp != chosen)] = self.target_id_
            centres[i] = centre
        extras = {"untriggered": untriggered, "centre": centres} if split == "test" else {}
        return out_x, out_y, extras

    @property
    def candidates_text(self) -> str:
        """How the poisoner's "too few candidates" error describes a candidate (call after ``fit``)."""
        return f"hold a {self.source!r} instance that can hold the whole {self.trigger_.size}-px patch ({{patch_size}})"

    def params(self) -> dict[str, Any]:
        p = self._base_params()
        if hasattr(self, "trigger_"):
            p["instances"] = "8-connected components of the victim class"
        return p

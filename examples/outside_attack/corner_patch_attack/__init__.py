"""CornerPatch: a white square in the top-left corner makes the model relabel one class (an outside attack).

It is deliberately small and shows every part of segbackdoor's attack contract: parameters stored in
``__init__`` (described in ``params_doc`` so they get CLI flags / zoo-spec keys), validation in
``check_params``/``fit``, the label generator T (``transform``), which samples it changes (``changes``),
its own trigger (``own_trigger = True`` and a ``trigger_`` set by ``fit``), and ``poison_samples``.
"""

from __future__ import annotations

import numpy as np

from testbed.attacks import Attack, Param, Trigger
from testbed.core.errors import ParamError


class CornerSquare(Trigger):
    """G(x): a ``size``×``size`` square of ``value`` in the top-left corner."""

    name = "corner-square"

    def __init__(self, size: int, value: int = 255) -> None:
        self.size, self.value = int(size), int(value)

    def check(self, image_size) -> None:
        if self.size > min(image_size):
            raise ParamError(f"{{size}} {self.size} is larger than the image {tuple(image_size)}; choose a smaller patch")

    def apply(self, images: np.ndarray) -> np.ndarray:
        out = np.array(images, copy=True)
        out[..., : self.size, : self.size, :] = self.value
        return out

    @property
    def spec(self) -> str:
        return f"corner-square:{self.size}"

    def describe(self, image_size) -> dict:
        return {"spec": self.spec, "type": "patch", "size": self.size, "value": self.value}


class CornerPatch(Attack):
    """Every ``source`` pixel becomes ``target`` when the corner square is present."""

    name = "corner-patch"
    own_trigger = True
    requires_text = "a source-class pixel"
    params_doc = {
        "source": Param("corner-patch: the class whose pixels are relabelled", metavar="CLASS"),
        "target": Param("the target class", metavar="CLASS"),
        "size": Param("corner-patch: side of the white square in pixels (default 4)", type=int, metavar="PX"),
    }

    def __init__(self, source: str | None = None, target: str | None = None, size: int = 4) -> None:
        self.source, self.target, self.size = source, target, size

    def check_params(self, classes: list[str]) -> None:
        for key in ("source", "target"):
            value = getattr(self, key)
            if value not in classes:
                raise ParamError(f"{{{key}}} must be one of the data's classes ({', '.join(classes)}), got {value!r}")
        if self.source == self.target:
            raise ParamError("{source} and {target} must differ")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ParamError(f"{{size}} must be a positive number of pixels, got {self.size!r}")

    def fit(self, data, seed: int = 0) -> "CornerPatch":
        classes = list(data.classes) if hasattr(data, "classes") else list(data)
        self.check_params(classes)
        self.source_id_, self.target_id_ = classes.index(self.source), classes.index(self.target)
        self.trigger_ = CornerSquare(self.size)
        return self

    def transform(self, labels: np.ndarray) -> np.ndarray:
        out = np.array(labels, copy=True)
        out[out == self.source_id_] = self.target_id_
        return out

    def changes(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        return (labels == self.source_id_).reshape(labels.shape[0], -1).any(axis=1)

    requires = changes

    @property
    def label(self) -> str:
        return f"corner-patch-{self.source}-{self.target}"

    def poison_samples(self, images, labels, trigger, index, split):
        # the default (trigger.apply + transform) would do; written out to show the hook
        return trigger.apply(images), self.transform(labels), {}

"""Trigger generators G (paper §2.2): the blended black line (non-semantic), a semantic object class, and the
registry :data:`TRIGGERS` of every ``--trigger`` (the full-image blend is :mod:`testbed.attacks.blended`, the
WaNet-style warp :mod:`testbed.attacks.warp`; the :class:`Trigger` contract is in :mod:`testbed.attacks.base`).

Why two so different objects share one file: both answer "what does a poisoned image look like and which
samples can carry the trigger"; the line changes pixels of any image, the semantic trigger changes none and
instead restricts which samples are poisoned.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from testbed.attacks.base import Param, Trigger
from testbed.attacks.blended import BlendedTrigger
from testbed.attacks.imageops import as_images, blend, check_alpha
from testbed.attacks.warp import WarpTrigger
from testbed.core.errors import ParamError, UserError
from testbed.core.paramtypes import is_int

POSITIONS = {"horizontal": ("top", "bottom", "middle"), "vertical": ("left", "right", "middle")}


def default_width(size: int) -> int:
    """The paper's 8 px at 512 px, scaled with the image size across the line, never below 2 px.

    round() is half-up (``floor(8·size/512 + 0.5)``) so 96 px gives 2 and 160 px gives 3 on every platform.
    """
    return max(2, int(math.floor(8 * size / 512 + 0.5)))


class LineTrigger(Trigger):
    """Blended line trigger: G(x) = (1−λ)⊗x + λ⊗t (Chen et al. 2017, paper §2.1).

    t is an image filled with ``colour``; λ is ``alpha`` on the line's pixels (all 3 channels) and 0 elsewhere,
    so pixels off the line are returned bit-identical.  With ``alpha=1`` (the paper's λ ∈ {0,1}) line pixels
    become exactly ``colour``.  For 0 < alpha < 1 the blend is computed in float64 and rounded half-up:
    ``floor((1−alpha)·x + alpha·c + 0.5)`` (it never leaves [0, 255]).

    ``width`` defaults to :func:`default_width` of the image height (horizontal) or width (vertical);
    ``position`` is top/bottom/middle (horizontal) or left/right/middle (vertical); ``offset`` moves the line
    that many pixels away from its edge (for middle: down/right from the centred position).
    """

    name = "line"
    options_doc = {
        "alpha": Param("line trigger: blend weight λ in (0, 1] (default 1: solid line)", type=float, metavar="A"),
        "line_width": Param("line trigger: width in px (default 8 px per 512 px, at least 2)", type=int, metavar="W"),
        "line_position": Param("line trigger: where the line lies (default top; left for a vertical line)",
                               choices=("top", "bottom", "middle", "left", "right")),
        "line_orientation": Param("line trigger: horizontal (default) or vertical", choices=("horizontal", "vertical")),
    }

    @classmethod
    def from_options(cls, arg: str | None, alpha: float | None = None, line_width: int | None = None,
                     line_position: str | None = None, line_orientation: str | None = None) -> "LineTrigger":
        if arg:
            raise ParamError(f"--trigger line takes no argument (got line:{arg}); set the blend with {{alpha}}")
        orientation = line_orientation or "horizontal"
        position = line_position or ("top" if orientation == "horizontal" else "left")
        return cls(width=line_width, position=position, orientation=orientation, alpha=1.0 if alpha is None else alpha)

    def __init__(
        self,
        width: int | None = None,
        position: str = "top",
        orientation: str = "horizontal",
        colour: Sequence[int] = (0, 0, 0),
        alpha: float = 1.0,
        offset: int = 0,
    ) -> None:
        self.width = width
        self.position = position
        self.orientation = orientation
        self.colour = colour
        self.alpha = alpha
        self.offset = offset

    def _validate_params(self) -> None:
        if self.orientation not in POSITIONS:
            raise ParamError(f"unknown {{line_orientation}} {self.orientation!r}; use horizontal or vertical")
        if self.position not in POSITIONS[self.orientation]:
            raise ParamError(
                f"{{line_position}} {self.position!r} does not fit a {self.orientation} line; use one of: "
                + ", ".join(POSITIONS[self.orientation])
            )
        w = self.width
        if w is not None and not is_int(w, 1):
            raise ParamError(f"{{line_width}} must be a positive number of pixels, got {w!r}")
        check_alpha(self.alpha, "{alpha}")
        c = self.colour
        if (not isinstance(c, (tuple, list, np.ndarray)) or len(c) != 3
                or not all(is_int(v) and v <= 255 for v in c)):
            raise UserError(f"line colour must be three integers in 0..255 (R,G,B), got {tuple(c) if isinstance(c, list) else c!r}")
        if not is_int(self.offset):
            raise UserError(f"line offset must be a non-negative number of pixels, got {self.offset!r}")

    # -- geometry ---------------------------------------------------------------------------------
    def resolved_width(self, image_size: Sequence[int]) -> int:
        self._validate_params()
        h, w = image_size
        across = h if self.orientation == "horizontal" else w
        return int(self.width) if self.width is not None else default_width(across)

    def span(self, image_size: Sequence[int]) -> tuple[int, int]:
        """[start, stop) of the line across the image (rows if horizontal, columns if vertical)."""
        h, w = image_size
        across = h if self.orientation == "horizontal" else w
        width = self.resolved_width(image_size)
        if self.position in ("top", "left"):
            start = self.offset
        elif self.position in ("bottom", "right"):
            start = across - self.offset - width
        else:
            start = (across - width) // 2 + self.offset
        if start < 0 or start + width > across:
            raise ParamError(
                f"a {width}-px {self.position} line with offset {self.offset} does not fit a {across}-px image; "
                "use a smaller {line_width} or offset"
            )
        return start, start + width

    def mask(self, image_size: Sequence[int]) -> np.ndarray:
        """λ's support: bool [H,W], True on the line's pixels."""
        h, w = image_size
        m = np.zeros((h, w), dtype=bool)
        a, b = self.span(image_size)
        if self.orientation == "horizontal":
            m[a:b, :] = True
        else:
            m[:, a:b] = True
        return m

    def check(self, image_size: Sequence[int]) -> None:
        self.span(image_size)  # validates the parameters, then the fit to the image

    # -- G ----------------------------------------------------------------------------------------
    def apply(self, images: np.ndarray) -> np.ndarray:
        """G(x) for uint8 images [N,H,W,3] (or one [H,W,3]); returns a new array, the input is untouched."""
        images = as_images(images)
        out = images.copy()
        a, b = self.span(images.shape[-3:-1])
        region = (Ellipsis, slice(a, b), slice(None), slice(None)) if self.orientation == "horizontal" else (
            Ellipsis, slice(None), slice(a, b), slice(None))
        if self.alpha == 1:
            out[region] = np.asarray(self.colour, dtype=np.uint8)
        else:
            out[region] = blend(out[region], self.colour, self.alpha)
        return out

    @property
    def spec(self) -> str:
        return "line"

    def describe(self, image_size: Sequence[int]) -> dict[str, Any]:
        """What goes into the poisoned file's ``attack.trigger`` JSON (width resolved for this image size)."""
        a, b = self.span(image_size)
        return {
            "spec": "line", "type": "line", "width": b - a, "position": self.position, "orientation": self.orientation,
            "colour": [int(c) for c in self.colour], "alpha": float(self.alpha), "offset": int(self.offset),
            "span": [a, b],
        }

    def __repr__(self) -> str:
        return (f"LineTrigger(width={self.width}, position={self.position!r}, orientation={self.orientation!r}, "
                f"colour={self.colour!r}, alpha={self.alpha}, offset={self.offset})")


class SemanticTrigger(Trigger):
    """Semantic trigger (Bagdasaryan et al. 2020): G(x) = x; an object class already in the scene is the trigger.

    Nothing is drawn.  The attack instead poisons every training sample that contains ``class_name``
    (see :func:`attacks.poison`), so the model learns "this object present ⇒ target labels".
    """

    name = "semantic"
    is_semantic = True

    @classmethod
    def from_options(cls, arg: str | None) -> "SemanticTrigger":
        return cls((arg or "").strip())

    def __init__(self, class_name: str) -> None:
        self.class_name = class_name

    def _validate_params(self) -> None:
        if not isinstance(self.class_name, str) or not self.class_name.strip():
            raise ParamError("a semantic trigger needs a class name: {trigger} semantic:CLASS (e.g. semantic:wall)")

    @property
    def trigger_class(self) -> str:
        """The class name as used: without surrounding spaces (``__init__`` stores what it was given)."""
        self._validate_params()
        return self.class_name.strip()

    def apply(self, images: np.ndarray) -> np.ndarray:
        self._validate_params()
        return np.asarray(images)

    def contains(self, labels: np.ndarray, class_id: int) -> np.ndarray:
        """bool [N]: which label maps [N,H,W] hold at least one pixel of the trigger class."""
        labels = np.asarray(labels)
        return (labels == class_id).reshape(labels.shape[0], -1).any(axis=1)

    @property
    def spec(self) -> str:
        return f"semantic:{self.trigger_class}"

    def describe(self, image_size: Sequence[int] | None = None) -> dict[str, Any]:
        self._validate_params()
        return {"spec": self.spec, "type": "semantic", "class": self.trigger_class}

    def __repr__(self) -> str:
        return f"SemanticTrigger({self.class_name!r})"


TRIGGERS: dict[str, type[Trigger]] = {t.name: t for t in (LineTrigger, SemanticTrigger, BlendedTrigger, WarpTrigger)}


def trigger_options() -> dict[str, Param]:
    """Every option any trigger takes (the union of their ``options_doc``), for the CLI and zoo specs."""
    out: dict[str, Param] = {}
    for t in TRIGGERS.values():
        out.update(t.options_doc)
    return out


def trigger_forms(name: str, cls: Any) -> str:
    """How ``--trigger`` (and a zoo spec's ``trigger``) writes a trigger: ``semantic:CLASS``, ``blended[:ALPHA]``."""
    if getattr(cls, "is_semantic", False):
        return f"{name}:CLASS"
    for prm in getattr(cls, "options_doc", {}).values():
        m = re.search(r"--trigger " + re.escape(name) + r":(\w+)", prm.help)
        if m:
            return f"{name}[:{prm.metavar or m.group(1)}]"
    return name


def parse_trigger(spec: Any, **options: Any) -> Trigger:
    """``"line"``, ``"semantic:CLASS"`` … (the ``--trigger`` flag) and its options → a trigger object.

    ``options`` are keyword arguments named like ``testbed poison``'s trigger flags (``alpha``,
    ``line_width``, ``line_position``, ``line_orientation``, ``pattern``, ``warp_grid``, ``warp_strength``,
    ``warp_noise``); ``None`` means "not given".  An option that
    does not belong to the chosen trigger is an error, not silently dropped.
    """
    if isinstance(spec, Trigger):
        return spec
    names = ", ".join(trigger_forms(n, t) for n, t in TRIGGERS.items())
    if not isinstance(spec, str) or not spec.strip():
        raise ParamError(f"{{trigger}} must be one of {names}, got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    if name not in TRIGGERS:
        raise ParamError(f"unknown trigger {spec!r}; {{trigger}} takes one of: {names} (e.g. semantic:wall)")
    cls = TRIGGERS[name]
    known = trigger_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"parse_trigger() got unexpected options {unknown}; known: {sorted(known)}")
    foreign = [k for k, v in options.items() if v is not None and k not in cls.options_doc]
    if foreign:
        owners = {k: [n for n, t in TRIGGERS.items() if k in t.options_doc] for k in foreign}
        which = ", ".join(f"{{{k}}} only applies to {{trigger}} {'/'.join(owners[k])}" for k in foreign)
        raise ParamError(f"{which}; not to {name}" + (" (a semantic trigger draws nothing: G(x) = x)" if cls.is_semantic else ""))
    trigger = cls.from_options(arg or None, **{k: v for k, v in options.items() if k in cls.options_doc})
    trigger._validate_params()  # a spec is checked as it is parsed: the CLI's error comes before any work
    return trigger

"""Fine-Grained Backdoor Attack (paper §2.2, Definition 1): object-level target labels.

The attack matrix A ∈ {0,1}^{K×K} has one-hot rows; A[i, j] = 1 sends every pixel of class i to class j.
The target label is T(y; A)_p = argmax_k A[y_p, k]; ignore pixels (255) stay ignore.  Because T acts on
each pixel's class alone it is a 256-entry lookup table, applied to whole blocks of label maps at once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from testbed.attacks.base import Attack, Param
from testbed.core.errors import ParamError, UserError, did_you_mean
from testbed.data.h5data import IGNORE_INDEX, find_class

PRESETS = ("n-to-1", "1-to-1")


def _class_id(data: Any, name: str, param: str = "class") -> int:
    """Class id by name in ``data`` (a SegFile or a list of names); unknown names suggest the nearest."""
    classes = _class_names(data)
    cid = find_class(classes, name)
    if cid is not None:
        return cid
    raise ParamError(f"unknown class {name!r} in {{{param}}}{did_you_mean(name, classes)}; the data has: {', '.join(classes)}")


def _class_names(data: Any) -> list[str]:
    return list(data.classes) if hasattr(data, "classes") else list(data)


def check_attack_matrix(matrix: Any, num_classes: int | None = None, classes: Sequence[str] | None = None) -> np.ndarray:
    """Validate A: square K×K, entries 0/1, every row one-hot; return it as uint8."""
    a = np.asarray(matrix)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise UserError(f"the attack matrix must be square K×K, got shape {a.shape}")
    if num_classes is not None and a.shape[0] != num_classes:
        raise UserError(f"the attack matrix is {a.shape[0]}×{a.shape[0]} but the data has {num_classes} classes")
    if a.shape[0] > IGNORE_INDEX:
        raise UserError(f"the attack matrix has {a.shape[0]} classes; at most {IGNORE_INDEX} are allowed")
    if not np.isin(a, (0, 1)).all():
        raise UserError("the attack matrix must hold only 0 and 1 (A[i, j] = 1 sends class i to class j)")
    sums = a.sum(axis=1)
    bad = np.flatnonzero(sums != 1)
    if bad.size:
        i = int(bad[0])
        name = f" ({classes[i]!r})" if classes is not None and i < len(classes) else ""
        raise UserError(f"row {i}{name} of the attack matrix is not one-hot (it has {int(sums[i])} ones); "
                        "each class must map to exactly one class")
    return a.astype(np.uint8)


def matrix_lut(matrix: np.ndarray) -> np.ndarray:
    """uint8 [256] table with lut[i] = argmax_k A[i, k] for classes, identity elsewhere (ignore → ignore)."""
    lut = np.arange(256, dtype=np.uint8)
    k = matrix.shape[0]
    lut[:k] = np.argmax(matrix, axis=1).astype(np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def apply_attack_matrix(labels: np.ndarray, matrix: Any) -> np.ndarray:
    """T(y; A) for uint8 label maps of any shape (the attack matrix is validated first)."""
    a = check_attack_matrix(matrix)
    return matrix_lut(a)[np.asarray(labels, dtype=np.uint8)]


def parse_mapping(mapping: str | Mapping[str, str]) -> list[tuple[str, str]]:
    """``"person:palm,car:road"`` or ``{"person": "palm"}`` → [(source, target), ...]."""
    if isinstance(mapping, Mapping):
        pairs = [(str(a), str(b)) for a, b in mapping.items()]
    elif isinstance(mapping, str):
        pairs = []
        for part in mapping.split(","):
            if part.count(":") != 1:
                raise ParamError(f"{{mapping}} item {part.strip()!r} is not SOURCE:TARGET (write e.g. person:palm,car:road)")
            a, b = (s.strip() for s in part.split(":"))
            if not a or not b:
                raise ParamError(f"{{mapping}} item {part.strip()!r} is not SOURCE:TARGET (write e.g. person:palm,car:road)")
            pairs.append((a, b))
    else:
        raise ParamError(f"{{mapping}} must be 'SOURCE:TARGET,...' or a dict, got {mapping!r}")
    if not pairs:
        raise ParamError("{mapping} is empty; write e.g. person:palm,car:road")
    seen: set[str] = set()
    for a, _ in pairs:
        if a in seen:
            raise ParamError(f"{{mapping}} maps {a!r} twice; give each source class one target")
        seen.add(a)
    return pairs


class FGBA(Attack):
    """Fine-grained backdoor attack: the label generator T(y; A).

    Configure it one of four ways (class names are resolved against the data in :meth:`fit`):

    - ``FGBA("n-to-1", target="wall")``: every class → wall; ``sources=[...]`` restricts which classes move
      (the others map to themselves);
    - ``FGBA("1-to-1", source="person", target="palm")``;
    - ``FGBA(mapping="person:palm,car:road")`` (or a dict): the listed classes move, the rest stay;
    - ``FGBA(matrix=A)``: an explicit K×K attack matrix.

    Without a preset, ``source`` implies 1-to-1 and ``target`` alone implies n-to-1.  A source equal to its
    target is an error (it would attack nothing).  ``fit`` validates the parameters and sets ``preset_``
    (the resolved preset, None for a mapping or matrix), ``sources_``, ``matrix_`` (uint8 K×K), ``lut_``
    (uint8 [256]) and ``source_ids_`` (classes whose pixels change).
    """

    name = "fgba"
    requires_text = "a source-class pixel"  # with a semantic trigger, what ``requires`` asks of a sample
    params_doc = {
        "preset": Param("n-to-1 (every class -> --target) or 1-to-1 (--source -> --target)", choices=PRESETS),
        "source": Param("the class whose pixels are relabelled (fgba: with 1-to-1)", metavar="CLASS"),
        "target": Param("the target class", metavar="CLASS"),
        "sources": Param("n-to-1: only these classes move to --target (default: all)", metavar="A,B"),
        "mapping": Param("any mapping, e.g. person:palm,car:road", metavar="SRC:DST,...", flag="--map"),
    }

    def __init__(
        self,
        preset: str | None = None,
        *,
        source: str | None = None,
        target: str | None = None,
        sources: Sequence[str] | str | None = None,
        mapping: str | Mapping[str, str] | None = None,
        matrix: Any = None,
    ) -> None:
        self.preset = preset
        self.source = source
        self.target = target
        self.sources = sources
        self.mapping = mapping
        self.matrix = matrix

    def _check_options(self) -> tuple[str | None, list[str] | None]:
        """Validate the combination of parameters; returns the resolved preset and sources list."""
        ways = [n for n, v in (("{preset}", self.preset), ("{mapping}", self.mapping), ("matrix", self.matrix))
                if v is not None]
        if len(ways) > 1:
            raise ParamError(f"give only one of {' / '.join(ways)}: each defines the whole attack")
        preset, sources = self.preset, self.sources
        if preset is None and self.mapping is None and self.matrix is None:
            if self.source is not None:
                preset = "1-to-1"
            elif self.target is not None:
                preset = "n-to-1"
            else:
                raise ParamError("fgba needs {preset} n-to-1 with {target} T, {preset} 1-to-1 with {source} S and "
                                 "{target} T, or {mapping} SRC:DST,...")
        if preset is not None and preset not in PRESETS:
            raise ParamError(f"unknown {{preset}} {preset!r}; use n-to-1 or 1-to-1")
        if isinstance(sources, str):
            sources = [s.strip() for s in sources.split(",") if s.strip()]
        if sources is not None:
            sources = list(sources)
            if not sources:
                raise ParamError("{sources} is empty; list class names like person,car")
        if preset == "n-to-1":
            if self.target is None:
                raise ParamError("{preset} n-to-1 needs {target} CLASS (e.g. wall)")
            if self.source is not None:
                raise ParamError("{source} belongs to {preset} 1-to-1; for n-to-1 restrict the classes with {sources}")
            if sources is not None and self.target in sources:
                raise ParamError(f"{{sources}} includes the target {self.target!r}; a source must differ from the target")
        elif preset == "1-to-1":
            if self.source is None or self.target is None:
                raise ParamError("{preset} 1-to-1 needs {source} CLASS and {target} CLASS (e.g. person and palm)")
            if sources is not None:
                raise ParamError("{sources} belongs to {preset} n-to-1; for 1-to-1 give one {source}")
            if self.source == self.target:
                raise ParamError(f"{{source}} and {{target}} are both {self.source!r}; choose a target that differs from the source")
        else:
            extra = [n for n, v in (("{source}", self.source), ("{target}", self.target), ("{sources}", sources))
                     if v is not None]
            if extra:
                raise ParamError(f"{', '.join(extra)} cannot be combined with {ways[0]}; put every pair in {{mapping}} SRC:DST,...")
            if self.mapping is not None:
                for a, b in parse_mapping(self.mapping):
                    if a == b:
                        raise ParamError(f"{{mapping}} {a}:{b} maps a class to itself; a source must differ from its target")
        return preset, sources

    # -- fit / transform ------------------------------------------------------------------------------
    def attack_matrix(self, data: Any) -> np.ndarray:
        """A as uint8 K×K for ``data`` (a SegFile or a list of class names); validates the parameters."""
        preset, sources = self._check_options()
        classes = _class_names(data)
        k = len(classes)
        if self.matrix is not None:
            a = check_attack_matrix(self.matrix, k, classes)
        else:
            a = np.eye(k, dtype=np.uint8)
            for s, t in self._pairs(data, preset, sources):
                a[s] = 0
                a[s, t] = 1
        if (np.argmax(a, axis=1) == np.arange(k)).all():
            raise UserError("the attack matrix maps every class to itself; nothing would be attacked")
        return a

    def _pairs(self, data: Any, preset: str | None, sources: list[str] | None) -> list[tuple[int, int]]:
        """(source id, target id) for every class that moves, from the preset or mapping."""
        classes = _class_names(data)
        if preset == "n-to-1":
            t = _class_id(data, self.target, "target")
            if sources is None:
                return [(i, t) for i in range(len(classes)) if i != t]
            return [(_class_id(data, s, "sources"), t) for s in sources]
        if preset == "1-to-1":
            return [(_class_id(data, self.source, "source"), _class_id(data, self.target, "target"))]
        return [(_class_id(data, a, "mapping"), _class_id(data, b, "mapping")) for a, b in parse_mapping(self.mapping)]

    def check_params(self, classes: list[str]) -> None:
        self.attack_matrix(list(classes))

    def fit(self, data: Any, seed: int = 0) -> "FGBA":
        """Validate and resolve class names against ``data`` (SegFile or class-name list); ``seed`` is unused."""
        self.preset_, self.sources_ = self._check_options()
        self.classes_ = _class_names(data)
        self.matrix_ = self.attack_matrix(data)
        self.lut_ = matrix_lut(self.matrix_)
        self.source_ids_ = np.flatnonzero(self.lut_[: len(self.classes_)] != np.arange(len(self.classes_)))
        return self

    def default_rate(self) -> float:
        """The paper's rates (§3.1): 10% for N-to-1 (and mappings), about 20% for 1-to-1."""
        return 0.2 if self.preset_ == "1-to-1" else 0.1

    @property
    def label(self) -> str:
        """``fgba-n-to-1``, ``fgba-1-to-1`` or ``fgba-map`` (the demo's row names)."""
        return f"fgba-{self.preset_}" if self.preset_ else "fgba-map"

    def transform(self, labels: np.ndarray) -> np.ndarray:
        """T(y; A) for uint8 label maps (any shape)."""
        return self.lut_[np.asarray(labels, dtype=np.uint8)]

    def changes(self, labels: np.ndarray) -> np.ndarray:
        """bool [N]: samples whose target label differs from their label, i.e. that hold a source-class pixel.

        Labels must be valid (classes or ignore).  Compares against the source ids, or against the fewer
        other values (n-to-1: the target and ignore), instead of a table lookup: several times faster.
        """
        labels = np.asarray(labels)
        flat = labels.reshape(labels.shape[0], -1)
        sources = [int(i) for i in self.source_ids_]
        others = [i for i in range(len(self.classes_)) if i not in set(sources)] + [IGNORE_INDEX]
        if len(sources) <= len(others):
            hit = flat == sources[0]
            for v in sources[1:]:
                hit |= flat == v
        else:
            hit = flat != others[0]
            for v in others[1:]:
                hit &= flat != v
        return hit.any(axis=1)

    # With a semantic trigger FGBA poisons samples holding the trigger class *and* a source pixel.
    requires = changes

    def params(self) -> dict[str, Any]:
        """The attack's parameters for the poisoned file's JSON (names, plus the resolved mapping)."""
        preset, sources = (self.preset_, self.sources_) if hasattr(self, "preset_") else (self.preset, self.sources)
        p: dict[str, Any] = {"preset": preset}
        if preset == "n-to-1":
            p.update(target=self.target, sources=None if sources is None else list(sources))
        elif preset == "1-to-1":
            p.update(source=self.source, target=self.target)
        elif self.mapping is not None:
            p["map"] = ",".join(f"{a}:{b}" for a, b in parse_mapping(self.mapping))
        else:
            p["matrix"] = "explicit"
        if hasattr(self, "lut_"):
            c = self.classes_
            p["mapping"] = {c[i]: c[int(self.lut_[i])] for i in self.source_ids_}
        return p

"""Fine-Grained Backdoor Attack (paper §2.2, Definition 1): object-level target labels.

The attack matrix A ∈ {0,1}^{K×K} has one-hot rows; A[i, j] = 1 sends every pixel of class i to class j.
The target label is T(y; A)_p = argmax_k A[y_p, k]; ignore pixels (255) stay ignore.  Because T acts on
each pixel's class alone it is a 256-entry lookup table, applied to whole blocks of label maps at once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from testbed.errors import UserError
from testbed.h5data import IGNORE_INDEX

PRESETS = ("n-to-1", "1-to-1")


def _class_id(data: Any, name: str) -> int:
    """Class id by name: ``data`` is a SegFile (its ``class_id`` suggests the nearest name) or a list of names."""
    if hasattr(data, "class_id"):
        return int(data.class_id(name))
    classes = list(data)
    if name in classes:
        return classes.index(name)
    import difflib

    close = difflib.get_close_matches(str(name), classes, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown class {name!r}{hint}; the data has: {', '.join(classes)}")


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
                raise UserError(f"--map item {part.strip()!r} is not SOURCE:TARGET (write e.g. --map person:palm,car:road)")
            a, b = (s.strip() for s in part.split(":"))
            if not a or not b:
                raise UserError(f"--map item {part.strip()!r} is not SOURCE:TARGET (write e.g. --map person:palm,car:road)")
            pairs.append((a, b))
    else:
        raise UserError(f"--map must be 'SOURCE:TARGET,...' or a dict, got {mapping!r}")
    if not pairs:
        raise UserError("--map is empty; write e.g. --map person:palm,car:road")
    seen: set[str] = set()
    for a, _ in pairs:
        if a in seen:
            raise UserError(f"--map maps {a!r} twice; give each source class one target")
        seen.add(a)
    return pairs


class FGBA:
    """Fine-grained backdoor attack: the label generator T(y; A).

    Configure it one of four ways (class names are resolved against the data in :meth:`fit`):

    - ``FGBA("n-to-1", target="wall")``: every class → wall; ``sources=[...]`` restricts which classes move
      (the others map to themselves);
    - ``FGBA("1-to-1", source="person", target="palm")``;
    - ``FGBA(mapping="person:palm,car:road")`` (or a dict): the listed classes move, the rest stay;
    - ``FGBA(matrix=A)``: an explicit K×K attack matrix.

    Without a preset, ``source`` implies 1-to-1 and ``target`` alone implies n-to-1.  A source equal to its
    target is an error (it would attack nothing).  After ``fit`` the attack holds ``matrix_`` (uint8 K×K),
    ``lut_`` (uint8 [256]) and ``source_ids_`` (classes whose pixels change).
    """

    name = "fgba"

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
        self._check_options()

    def _check_options(self) -> None:
        ways = [n for n, v in (("--preset", self.preset), ("--map", self.mapping), ("matrix", self.matrix)) if v is not None]
        if len(ways) > 1:
            raise UserError(f"give only one of {' / '.join(ways)}: each defines the whole attack")
        if self.preset is None and self.mapping is None and self.matrix is None:
            if self.source is not None:
                self.preset = "1-to-1"
            elif self.target is not None:
                self.preset = "n-to-1"
            else:
                raise UserError("fgba needs --preset n-to-1 --target T, --preset 1-to-1 --source S --target T, "
                                "or --map SRC:DST,...")
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; use n-to-1 or 1-to-1")
        if isinstance(self.sources, str):
            self.sources = [s.strip() for s in self.sources.split(",") if s.strip()]
        if self.sources is not None and len(self.sources) == 0:
            raise UserError("--sources is empty; list class names like --sources person,car")
        if self.preset == "n-to-1":
            if self.target is None:
                raise UserError("--preset n-to-1 needs --target CLASS (e.g. --target wall)")
            if self.source is not None:
                raise UserError("--source belongs to --preset 1-to-1; for n-to-1 restrict the classes with --sources a,b")
            if self.sources is not None and self.target in self.sources:
                raise UserError(f"--sources includes the target {self.target!r}; a source must differ from the target")
        elif self.preset == "1-to-1":
            if self.source is None or self.target is None:
                raise UserError("--preset 1-to-1 needs --source CLASS and --target CLASS (e.g. --source person --target palm)")
            if self.sources is not None:
                raise UserError("--sources belongs to --preset n-to-1; for 1-to-1 give one --source")
            if self.source == self.target:
                raise UserError(f"source and target are both {self.source!r}; choose a target that differs from the source")
        else:
            extra = [n for n, v in (("--source", self.source), ("--target", self.target), ("--sources", self.sources)) if v is not None]
            if extra:
                raise UserError(f"{', '.join(extra)} cannot be combined with {ways[0]}; put every pair in --map SRC:DST,...")
            if self.mapping is not None:
                for a, b in parse_mapping(self.mapping):
                    if a == b:
                        raise UserError(f"--map {a}:{b} maps a class to itself; a source must differ from its target")

    # -- fit / transform ------------------------------------------------------------------------------
    def attack_matrix(self, data: Any) -> np.ndarray:
        """A as uint8 K×K for ``data`` (a SegFile or a list of class names)."""
        classes = _class_names(data)
        k = len(classes)
        if self.matrix is not None:
            a = check_attack_matrix(self.matrix, k, classes)
        else:
            a = np.eye(k, dtype=np.uint8)
            for s, t in self.pairs(data):
                a[s] = 0
                a[s, t] = 1
        if (np.argmax(a, axis=1) == np.arange(k)).all():
            raise UserError("the attack matrix maps every class to itself; nothing would be attacked")
        return a

    def pairs(self, data: Any) -> list[tuple[int, int]]:
        """(source id, target id) for every class that moves, from the preset or mapping."""
        classes = _class_names(data)
        if self.preset == "n-to-1":
            t = _class_id(data, self.target)
            if self.sources is None:
                return [(i, t) for i in range(len(classes)) if i != t]
            return [(_class_id(data, s), t) for s in self.sources]
        if self.preset == "1-to-1":
            return [(_class_id(data, self.source), _class_id(data, self.target))]
        return [(_class_id(data, a), _class_id(data, b)) for a, b in parse_mapping(self.mapping)]

    def fit(self, data: Any, seed: int = 0) -> "FGBA":
        """Resolve class names against ``data`` (SegFile or class-name list); ``seed`` is unused (T is fixed)."""
        self.classes_ = _class_names(data)
        self.matrix_ = self.attack_matrix(data)
        self.lut_ = matrix_lut(self.matrix_)
        self.source_ids_ = np.flatnonzero(self.lut_[: len(self.classes_)] != np.arange(len(self.classes_)))
        return self

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
        p: dict[str, Any] = {"preset": self.preset}
        if self.preset == "n-to-1":
            p.update(target=self.target, sources=None if self.sources is None else list(self.sources))
        elif self.preset == "1-to-1":
            p.update(source=self.source, target=self.target)
        elif self.mapping is not None:
            p["map"] = ",".join(f"{a}:{b}" for a, b in parse_mapping(self.mapping))
        else:
            p["matrix"] = "explicit"
        if hasattr(self, "lut_"):
            c = self.classes_
            p["mapping"] = {c[i]: c[int(self.lut_[i])] for i in self.source_ids_}
        return p

    def __repr__(self) -> str:
        return f"FGBA({self.params()})"

"""Which samples an attack poisons: training samples, the defender's clean subset, the two test sets.

Selection rules (docs/attacks.md explains why):

- **drawn triggers** (line, blended, warp, patches): ``round(rate·N)`` training samples are drawn, with the
  seed, among the *candidates*: samples the attack would change (``attack.changes``; a sample it would not
  change teaches nothing) that also hold the ``require`` class when one is given.  The benign test set is
  all of /test; the attacked test set is every test image the attack changes.
- **semantic trigger**: every training sample containing the trigger class, meeting ``attack.requires``
  (FGBA: a source-class pixel) and holding the ``require`` class, is poisoned; the rate is what it is and
  is reported.  The benign test set is the test images *without* the trigger class; the attacked test set
  is those *with* it that meet ``attack.requires`` (``require`` shapes the poisoning, not the test sets).
- **noise samples** (a trigger's ``noise_count``, WaNet's noise mode): drawn with the seed among the samples
  that were not poisoned; their images change, their labels do not.
- **clean subset** for defenders: ``round(clean_fraction·N)`` (at least 1) samples drawn with the seed among
  the samples that were neither poisoned nor noise samples.
- the attacked test set uses ``attack.test_changes`` when the attack has it (IBA: test placements are not
  restricted the way NNI restricts training placements).

``round`` is half-up throughout.  Each random choice has its own seed stream (``default_rng([seed, s])``),
so e.g. a different ``clean_fraction`` never changes which samples are poisoned.  Label arrays are read in
blocks (files larger than memory work); small ones are kept in memory between passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from testbed.data import h5data
from testbed.core.errors import ParamError, UserError
from testbed.core.paramtypes import is_num
from testbed.data.h5data import IGNORE_INDEX, SegFile

POISON_STREAM = 2  # seed streams: 1 = BadNets target image, 2 = poisoned samples, 3 = clean subset, 8 = noise samples
CLEAN_STREAM = 3
NOISE_STREAM = 8
BLOCK_BYTES = 32 << 20  # images per streamed block ≈ 32 MiB
LABEL_CACHE_BYTES = 512 << 20  # label arrays up to this size are read once and reused by every pass

Predicate = Callable[[np.ndarray], np.ndarray]  # label block [n,H,W] -> bool [n]


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def check_fraction(value: Any, param: str, lo_open: bool) -> float:
    """A number in (0, 1] (``lo_open``) or [0, 1); else a :class:`ParamError` naming ``param``."""
    ok = is_num(value)
    if ok:
        ok = (0 < value <= 1) if lo_open else (0 <= value < 1)
    if not ok:
        rng = "(0, 1]" if lo_open else "[0, 1)"
        raise ParamError(f"{{{param}}} must be a number in {rng}, got {value!r}")
    return float(value)


class Rows:
    """An array read in blocks of rows; kept in memory when small, so a second pass costs no I/O."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.n = int(ds.shape[0])
        self.data = ds[()] if ds.nbytes <= LABEL_CACHE_BYTES else None

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.data[sl] if self.data is not None else self.ds[sl]


def block_rows(h: int, w: int) -> int:
    return max(1, BLOCK_BYTES // (h * w * 3))


def scan(rows: Rows, block: int, fns: Sequence[Predicate], num_classes: int, where: str) -> list[np.ndarray]:
    """Apply per-sample predicates (labels block → bool [n]) to every block; one bool [N] per predicate.

    Also checks every label is a class id or ignore (the predicates and T rely on it), so the clean file can
    be opened without its own label pass.
    """
    out = [np.zeros(rows.n, dtype=bool) for _ in fns]
    for start in range(0, rows.n, block):
        y = rows[start : start + block]
        if y.size and int((y + np.uint8(1)).max()) > num_classes:  # 255 + 1 wraps to 0: only ids ≥ K remain large
            bad = (y >= num_classes) & (y != IGNORE_INDEX)
            i = start + int(np.argwhere(bad)[0][0])
            raise UserError(f"{where}[{i}] holds label {int(y[bad].max())} but the file has only {num_classes} classes "
                            f"(0..{num_classes - 1}, ignore {IGNORE_INDEX}); re-create the file")
        for o, fn in zip(out, fns):
            o[start : start + y.shape[0]] = fn(y)
    return out


def contains(class_id: int) -> Predicate:
    """Predicate: the label map holds at least one pixel of ``class_id``."""
    return lambda y: (y == class_id).reshape(y.shape[0], -1).any(axis=1)


@dataclass
class Selection:
    """Every index set a poisoned file stores, plus what the record says about how they were chosen."""

    poison_index: np.ndarray
    clean_index: np.ndarray
    attacked_index: np.ndarray
    benign_index: np.ndarray
    requested_rate: float | None
    candidates: int
    notes: list[str]
    noise_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass(frozen=True)
class PoisonSettings:
    """How one poisoning run chooses and writes (the `testbed poison` options besides attack and trigger).

    ``rate``: share of training samples to poison (None: the attack's ``default_rate()``; ignored, with a note,
    for a semantic trigger); ``seed``: every random choice; ``clean_fraction``: the defender's clean subset;
    ``require``: a poisoned sample must also contain this class; ``force``: replace an existing output (and
    poison an already poisoned input); ``dry_run``: check and select, write nothing.
    """

    rate: float | None = None
    seed: int = 0
    clean_fraction: float = 0.05
    require: str | None = None
    force: bool = False
    dry_run: bool = False


def _require_text(clean: SegFile, attack: Any, require: str | None) -> str:
    parts = [getattr(attack, "requires_text", None)] + ([f"a {require!r} pixel"] if require else [])
    return "".join(f" and {p}" for p in parts if p)


def select_train(clean: SegFile, train_y: Rows, block: int, attack: Any, trigger: Any, settings: PoisonSettings,
                 notes: list[str]) -> tuple[np.ndarray, float | None, int]:
    """The poisoned training samples, the requested rate (None for a semantic trigger) and the candidate count."""
    rate, seed, require = settings.rate, settings.seed, settings.require
    k, n, where = clean.num_classes, clean.length("train"), f"{clean.path}: /train/labels"
    extra = [contains(clean.class_id(require))] if require else []
    if trigger.is_semantic:
        cid = clean.class_id(trigger.trigger_class)
        if rate is not None:
            notes.append(f"{{rate}} {rate:g} ignored: a semantic trigger poisons every training sample containing "
                         f"{trigger.trigger_class!r}; the achieved rate is reported")
        has, req, *more = scan(train_y, block, [contains(cid), attack.requires, *extra], k, where)
        if not has.any():
            raise UserError(f"the trigger class {trigger.trigger_class!r} is absent from the training set of {clean.path.name}; "
                            "choose a class the images contain")
        selected = has & req
        for m in more:
            selected &= m
        if not selected.any():
            raise UserError(f"no training sample contains both the trigger {trigger.trigger_class!r}"
                            f"{_require_text(clean, attack, require)}; choose another trigger, source or required class")
        index = np.flatnonzero(selected).astype(np.int64)
        return index, None, int(index.size)
    requested = attack.default_rate() if rate is None else rate
    count = round_half_up(requested * n)
    if count < 1:
        raise ParamError(f"{{rate}} {requested:g} of {n} training samples rounds to 0 poisoned samples; raise {{rate}}")
    changes, *more = scan(train_y, block, [attack.changes, *extra], k, where)
    for m in more:
        changes &= m
    cand = np.flatnonzero(changes)
    if count > cand.size:
        why = getattr(attack, "candidates_text", None) or "have a target label that differs from their label"
        why += f" and contain {require!r}" if require else ""
        raise ParamError(f"{{rate}} {requested:g} asks for {count} poisoned samples but only {cand.size} of {n} training "
                         f"samples {why}; lower {{rate}}")
    rng = np.random.default_rng([seed, POISON_STREAM])
    return np.sort(rng.choice(cand, size=count, replace=False)).astype(np.int64), requested, int(cand.size)


def _unpoisoned(clean: SegFile, exclude: np.ndarray) -> np.ndarray:
    """Training rows outside ``exclude`` and, with force on a poisoned file, outside the parent's poisoned rows."""
    parent = [np.asarray(clean[k], dtype=np.int64) for k in (h5data.POISON_INDEX, h5data.NOISE_INDEX) if k in clean]
    taken = np.union1d(exclude, np.concatenate([np.empty(0, np.int64), *parent]))
    return np.setdiff1d(np.arange(clean.length("train"), dtype=np.int64), taken)


def select_noise(clean: SegFile, poison_index: np.ndarray, trigger: Any, seed: int) -> np.ndarray:
    """Noise samples the trigger asks for (``noise_count``; none for most triggers), drawn among unpoisoned rows."""
    ask = getattr(trigger, "noise_count", None)
    pool = _unpoisoned(clean, poison_index)
    count = int(ask(int(poison_index.size), int(pool.size))) if callable(ask) else 0
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, NOISE_STREAM])
    return np.sort(rng.choice(pool, size=count, replace=False)).astype(np.int64)


def select_clean(clean: SegFile, poison_index: np.ndarray, clean_fraction: float, seed: int) -> np.ndarray:
    """The defender's trusted clean subset: drawn by seed among the samples that are not poisoned."""
    n = clean.length("train")
    c = round_half_up(clean_fraction * n)
    c = max(c, 1) if clean_fraction > 0 else 0
    pool = _unpoisoned(clean, poison_index)
    if c > pool.size:
        raise ParamError(f"{{clean_fraction}} {clean_fraction:g} asks for {c} clean samples but only {pool.size} "
                         "training samples are not poisoned; lower {clean_fraction}")
    rng = np.random.default_rng([seed, CLEAN_STREAM])
    return np.sort(rng.choice(pool, size=c, replace=False)).astype(np.int64)


def select_test(clean: SegFile, test_y: Rows, block: int, attack: Any, trigger: Any) -> tuple[np.ndarray, np.ndarray]:
    """(attacked, benign) test indices."""
    k, m, where = clean.num_classes, clean.length("test"), f"{clean.path}: /test/labels"
    if trigger.is_semantic:
        cid = clean.class_id(trigger.trigger_class)
        has_t, req_t = scan(test_y, block, [contains(cid), attack.requires], k, where)
        attacked, benign = has_t & req_t, ~has_t
        why = f"contains the trigger {trigger.trigger_class!r}{_require_text(clean, attack, None)}"
        if not benign.any():
            raise UserError(f"every test image contains the trigger {trigger.trigger_class!r}, so there is no benign test set; "
                            "choose a rarer trigger class")
    else:
        (attacked,) = scan(test_y, block, [getattr(attack, "test_changes", attack.changes)], k, where)
        benign = np.ones(m, dtype=bool)
        why = "has a target label that differs from its ground truth"
    if not attacked.any():
        raise UserError(f"no test image {why}, so there would be no attacked test set; use a larger test split or another attack")
    return np.flatnonzero(attacked).astype(np.int64), np.flatnonzero(benign).astype(np.int64)


def select(clean: SegFile, attack: Any, trigger: Any, settings: PoisonSettings) -> tuple[Selection, Rows, Rows, int]:
    """All selections for one poisoning run (no writing); also returns the label readers for the writer."""
    h, w = clean.image_size
    block = block_rows(h, w)
    train_y, test_y = Rows(clean.file[h5data.TRAIN_LABELS]), Rows(clean.file[h5data.TEST_LABELS])
    notes: list[str] = []
    poison_index, requested, candidates = select_train(clean, train_y, block, attack, trigger, settings, notes)
    noise_index = select_noise(clean, poison_index, trigger, settings.seed)
    clean_index = select_clean(clean, np.union1d(poison_index, noise_index), settings.clean_fraction, settings.seed)
    attacked, benign = select_test(clean, test_y, block, attack, trigger)
    sel = Selection(poison_index, clean_index, attacked, benign, requested, candidates, notes, noise_index)
    return sel, train_y, test_y, block

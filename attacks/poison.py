"""Write a poisoned dataset file (SPEC §3) from a clean one: select samples, apply G and T, record everything.

Selection rules (docs/attacks.md explains why):

- **line trigger**: ``round(rate·N)`` training samples are drawn, with the seed, among the *candidates*:
  samples whose target label differs from their label at some pixel where neither is ignore (a sample the
  attack would not change teaches nothing).  The benign test set is all of /test; the attacked test set is
  every test image whose target label differs from its ground truth, with the trigger drawn on it.
- **semantic trigger**: every training sample containing the trigger class (FGBA: and at least one
  source-class pixel) is poisoned; the rate is what it is and is reported.  The benign test set is the test
  images *without* the trigger class; the attacked test set is those *with* it (FGBA: and a source pixel),
  images unchanged.
- **clean subset** for defenders: ``round(clean_fraction·N)`` (at least 1) samples drawn with the seed among
  the samples that were not poisoned.

``round`` is half-up throughout.  Each random choice has its own seed stream (``default_rng([seed, s])``),
so e.g. a different ``clean_fraction`` never changes which samples are poisoned.  Arrays are streamed in
blocks, so files larger than memory poison fine; labels small enough are kept in memory between passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from testbed.attacks.badnets import BadNets
from testbed.attacks.fgba import FGBA
from testbed.attacks.triggers import LineTrigger, SemanticTrigger, parse_trigger
from testbed import progress
from testbed.errors import UserError
from testbed.h5data import IGNORE_INDEX, DatasetWriter, SegFile, canonical_attr, content_hash, open_dataset

POISON_STREAM = 2  # seed streams: 1 = BadNets target image, 2 = poisoned samples, 3 = clean subset
CLEAN_STREAM = 3
_BLOCK_BYTES = 32 << 20  # images per streamed block ≈ 32 MiB
_LABEL_CACHE_BYTES = 512 << 20  # label arrays up to this size are read once and reused by every pass
_OWN_ATTRS = ("format", "schema_version", "classes", "ignore_index", "source", "image_size", "attack", "parent_sha256")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_rate(attack: FGBA | BadNets) -> float:
    """The paper's poisoning rates (§3.1): 10% for BadNets and FGBA N-to-1, about 20% for 1-to-1."""
    return 0.2 if isinstance(attack, FGBA) and attack.preset == "1-to-1" else 0.1


def attack_label(attack: FGBA | BadNets) -> str:
    """``badnets``, ``fgba-n-to-1``, ``fgba-1-to-1`` or ``fgba-map`` (the demo's row names)."""
    if isinstance(attack, BadNets):
        return "badnets"
    return f"fgba-{attack.preset}" if attack.preset else "fgba-map"


@dataclass
class PoisonResult:
    """What :func:`poison` wrote: the file and the selections (also stored in the file)."""

    path: Path
    attack: dict[str, Any]
    poison_index: np.ndarray
    clean_index: np.ndarray
    test_attacked_index: np.ndarray
    test_benign_index: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        return float(self.attack["achieved_rate"])

    def summary(self) -> str:
        a = self.attack
        req = "" if a["requested_rate"] is None else f" (requested {a['requested_rate']:g})"
        lines = [
            f"wrote {self.path}: {a['label']} with trigger {a['trigger']['spec']}, seed {a['seed']}",
            f"  poisoned {a['poisoned']} of {a['train_size']} training samples: rate {a['achieved_rate']:.4f}{req}",
        ]
        if "target_image" in a:
            lines.append(f"  BadNets target label: training image {a['target_image']}")
        lines.append(f"  defender's clean subset: {a['clean_size']} samples")
        lines.append(f"  test: {a['test_attacked']} attacked, {a['test_benign']} benign")
        return "\n".join(lines)


class _Rows:
    """An array read in blocks of rows; kept in memory when small, so a second pass costs no I/O."""

    def __init__(self, ds: Any, cache: bool) -> None:
        self.ds = ds
        self.n = int(ds.shape[0])
        self.data = ds[()] if cache else None

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.data[sl] if self.data is not None else self.ds[sl]


def _block_rows(h: int, w: int) -> int:
    return max(1, _BLOCK_BYTES // (h * w * 3))


def _scan(rows: _Rows, block: int, fns: Sequence[Any], num_classes: int, where: str) -> list[np.ndarray]:
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


def _check_fraction(value: Any, flag: str, lo_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0 < value <= 1) if lo_open else (0 <= value < 1)
    if not ok:
        rng = "(0, 1]" if lo_open else "[0, 1)"
        raise UserError(f"{flag} must be a number in {rng}, got {value!r}")
    return float(value)


def poison(
    clean: SegFile | str | os.PathLike,
    out: str | os.PathLike,
    attack: FGBA | BadNets | str,
    trigger: LineTrigger | SemanticTrigger | str,
    rate: float | None = None,
    seed: int = 0,
    clean_fraction: float = 0.05,
    force: bool = False,
) -> PoisonResult:
    """Poison ``clean`` with ``attack`` (label generator T) and ``trigger`` (image generator G) into ``out``.

    ``rate`` (default :func:`default_rate`) applies to the line trigger; a semantic trigger poisons every
    sample holding its class, so a rate given with it is ignored with a note in ``PoisonResult.notes``.
    Nothing is written at ``out`` unless everything succeeds.
    """
    if not isinstance(clean, SegFile):
        with open_dataset(clean, check_labels=False) as f:  # labels are checked by the scans below
            return poison(f, out, attack, trigger, rate, seed, clean_fraction, force)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'poisoned.h5'}")
    if out.resolve() == clean.path.resolve():
        raise UserError(f"--out {out} is the input file; write the poisoned dataset to another path")
    if clean.is_poisoned and not force:
        a = clean.attack or {}
        what = a.get("label") or a.get("name", "?")
        spec = (a.get("trigger") or {}).get("spec") if isinstance(a.get("trigger"), dict) else a.get("trigger")
        raise UserError(f"{clean.path} is already poisoned (attack {what}, trigger {spec}); pass --force to poison it again")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if rate is not None:
        rate = _check_fraction(rate, "--rate", lo_open=True)
    clean_fraction = _check_fraction(clean_fraction, "--clean-fraction", lo_open=False)
    attack = build_attack(attack) if isinstance(attack, str) else attack
    trigger = parse_trigger(trigger) if isinstance(trigger, str) else trigger
    notes: list[str] = []

    h, w = clean.image_size
    classes = list(clean.classes)
    if isinstance(trigger, LineTrigger):
        trigger.span((h, w))  # a line that does not fit fails now, before any work
    k = clean.num_classes
    tname, vname = f"{clean.path}: /train/labels", f"{clean.path}: /test/labels"
    attack.fit(clean, seed)
    n, m = clean.length("train"), clean.length("test")
    block = _block_rows(h, w)
    train_y = _Rows(clean.file["train/labels"], clean.file["train/labels"].nbytes <= _LABEL_CACHE_BYTES)
    test_y = _Rows(clean.file["test/labels"], clean.file["test/labels"].nbytes <= _LABEL_CACHE_BYTES)

    # -- which training samples ----------------------------------------------------------------------
    if trigger.is_semantic:
        cid = clean.class_id(trigger.class_name)
        if rate is not None:
            notes.append(f"--rate {rate:g} ignored: a semantic trigger poisons every training sample containing "
                         f"{trigger.class_name!r}; the achieved rate is reported")
        requested = None
        has, req = _scan(train_y, block, [lambda y: trigger.contains(y, cid), attack.requires], k, tname)
        if not has.any():
            raise UserError(f"the trigger class {trigger.class_name!r} is absent from the training set of {clean.path.name}; "
                            "choose a class the images contain")
        selected = has & req
        if not selected.any():
            raise UserError(f"no training sample contains both the trigger {trigger.class_name!r} and a source-class pixel "
                            f"({', '.join(classes[i] for i in attack.source_ids_)}); choose another trigger or source")
        poison_index = np.flatnonzero(selected).astype(np.int64)
        candidates = int(poison_index.size)
    else:
        requested = default_rate(attack) if rate is None else rate
        count = round_half_up(requested * n)
        if count < 1:
            raise UserError(f"--rate {requested:g} of {n} training samples rounds to 0 poisoned samples; raise --rate")
        (changes,) = _scan(train_y, block, [attack.changes], k, tname)
        cand = np.flatnonzero(changes)
        candidates = int(cand.size)
        if count > cand.size:
            raise UserError(
                f"--rate {requested:g} asks for {count} poisoned samples but only {cand.size} of {n} training samples "
                "have a target label that differs from their label; lower --rate"
            )
        rng = np.random.default_rng([seed, POISON_STREAM])
        poison_index = np.sort(rng.choice(cand, size=count, replace=False)).astype(np.int64)

    # -- the defender's clean subset ------------------------------------------------------------------
    c = round_half_up(clean_fraction * n)
    c = max(c, 1) if clean_fraction > 0 else 0
    # With --force on a poisoned file, the parent's poisoned samples are not clean either.
    parent_poison = clean["train/poison_index"] if "train/poison_index" in clean else np.empty(0, np.int64)
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), np.union1d(poison_index, parent_poison))
    if c > pool.size:
        raise UserError(f"--clean-fraction {clean_fraction:g} asks for {c} clean samples but only {pool.size} "
                        "training samples are not poisoned; lower --clean-fraction")
    rng = np.random.default_rng([seed, CLEAN_STREAM])
    clean_index = np.sort(rng.choice(pool, size=c, replace=False)).astype(np.int64)

    # -- test splits ----------------------------------------------------------------------------------
    if trigger.is_semantic:
        has_t, req_t = _scan(test_y, block, [lambda y: trigger.contains(y, cid), attack.requires], k, vname)
        attacked, benign = has_t & req_t, ~has_t
        why = f"contains the trigger {trigger.class_name!r}" + (" and a source-class pixel" if isinstance(attack, FGBA) else "")
        if not benign.any():
            raise UserError(f"every test image contains the trigger {trigger.class_name!r}, so there is no benign test set; "
                            "choose a rarer trigger class")
    else:
        (attacked,) = _scan(test_y, block, [attack.changes], k, vname)
        benign = np.ones(m, dtype=bool)
        why = "has a target label that differs from its ground truth"
    if not attacked.any():
        raise UserError(f"no test image {why}, so there would be no attacked test set; use a larger test split or another attack")
    attacked_index = np.flatnonzero(attacked).astype(np.int64)
    benign_index = np.flatnonzero(benign).astype(np.int64)

    p = int(poison_index.size)
    meta: dict[str, Any] = {
        "name": attack.name,
        "label": attack_label(attack),
        "params": attack.params(),
        "trigger": trigger.describe((h, w)),
        "seed": seed,
        "requested_rate": requested,
        "achieved_rate": p / n,
        "poisoned": p,
        "train_size": n,
        "candidates": candidates,
        "selection": ("all training samples containing the trigger class"
                      + (" and a source-class pixel" if isinstance(attack, FGBA) else "")) if trigger.is_semantic
        else "drawn by seed among training samples whose target label differs from their label",
        "clean_fraction": clean_fraction,
        "clean_size": int(clean_index.size),
        "test_attacked": int(attacked_index.size),
        "test_benign": int(benign_index.size),
    }
    if isinstance(attack, BadNets):
        meta["target_image"] = int(attack.target_image_)
    if clean.is_poisoned:
        meta["parent_attack"] = clean.attack

    _write(clean, out, attack, trigger, meta, poison_index, clean_index, attacked_index, benign_index, train_y, test_y, block)
    return PoisonResult(out, meta, poison_index, clean_index, attacked_index, benign_index, notes)


_PLAIN = ["test/images", "test/labels", "train/images", "train/labels"]


def _write(clean: SegFile, out: Path, attack, trigger, meta, poison_index, clean_index, attacked_index,
           benign_index, train_y: _Rows, test_y: _Rows, block: int) -> None:
    """Stream the clean arrays into ``out`` with the poisoned rows replaced, plus the SPEC §3 extras.

    The parent's content hash is computed on the way (one read of the clean file instead of two), feeding
    sha256 exactly as :func:`testbed.h5data.content_hash` does: root attributes, then each array in name
    order (test before train).  An input with other arrays (a ``--force`` re-poisoning) is hashed separately;
    tests check both paths against ``content_hash``.
    """
    src = clean.file
    h, w = clean.image_size
    n, m = clean.length("train"), clean.length("test")
    names: list[str] = []
    src.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    fold = sorted(names) == _PLAIN and train_y.data is not None and test_y.data is not None
    hasher = hashlib.sha256()
    if fold:
        hasher.update(json.dumps({k: canonical_attr(v) for k, v in src.attrs.items()}, sort_keys=True).encode())

    def feed_header(name: str) -> None:
        if fold:
            ds = src[name]
            hasher.update(f"\0{name}\0{ds.dtype.str}\0{ds.shape}\0".encode())

    def feed(array: np.ndarray) -> None:
        if fold and array.size:
            hasher.update(np.ascontiguousarray(array).data)

    extra = {k: v for k, v in clean.attrs.items() if k not in _OWN_ATTRS}
    extra.update(attack=meta, parent_sha256=None if fold else content_hash(src))
    comp = src["train/images"].compression
    p, a = poison_index.size, attacked_index.size
    bar = progress.bar(total=n + m, desc="poison", unit="img")
    with DatasetWriter(out, clean.classes, source=clean.source, image_size=(h, w), compression=comp, attrs=extra) as wr, bar:
        # test split first: the hash order is test/images, test/labels, train/images, train/labels
        vx, vy = wr.create("test/images", (m, h, w, 3), np.uint8), wr.create("test/labels", (m, h, w), np.uint8)
        ax, ay = wr.create("test_attacked/images", (a, h, w, 3), np.uint8), wr.create("test_attacked/labels", (a, h, w), np.uint8)
        ag = wr.create("test_attacked/gt", (a, h, w), np.uint8)
        feed_header("test/images")
        cursor = 0
        for start in range(0, m, block):
            stop = min(m, start + block)
            x, y = src["test/images"][start:stop], np.asarray(test_y[start:stop])
            feed(x)
            vx[start:stop], vy[start:stop] = x, y
            lo, hi = np.searchsorted(attacked_index, [start, stop])
            if hi > lo:
                rows = attacked_index[lo:hi] - start
                k = rows.size
                ax[cursor : cursor + k], ay[cursor : cursor + k] = trigger.apply(x[rows]), attack.transform(y[rows])
                ag[cursor : cursor + k] = y[rows]
                cursor += k
            bar.update(stop - start)
        feed_header("test/labels")
        feed(test_y.data if fold else np.empty(0))

        tx, ty = wr.create("train/images", (n, h, w, 3), np.uint8), wr.create("train/labels", (n, h, w), np.uint8)
        ox, oy = wr.create("train/original_images", (p, h, w, 3), np.uint8), wr.create("train/original_labels", (p, h, w), np.uint8)
        feed_header("train/images")
        cursor = 0
        for start in range(0, n, block):
            stop = min(n, start + block)
            x, y = src["train/images"][start:stop], np.array(train_y[start:stop])  # copies: the cache stays clean
            feed(x)
            lo, hi = np.searchsorted(poison_index, [start, stop])
            if hi > lo:
                rows = poison_index[lo:hi] - start
                ox[cursor : cursor + rows.size], oy[cursor : cursor + rows.size] = x[rows], y[rows]
                x[rows], y[rows] = trigger.apply(x[rows]), attack.transform(y[rows])
                cursor += rows.size
            tx[start:stop], ty[start:stop] = x, y
            bar.update(stop - start)
        feed_header("train/labels")
        feed(train_y.data if fold else np.empty(0))

        wr.put("train/poison_index", poison_index)
        wr.put("defense/clean_index", clean_index)
        wr.put("test_attacked/index", attacked_index)
        wr.put("test_benign/index", benign_index)
        if fold:
            wr.set_attr("parent_sha256", hasher.hexdigest())


def build_attack(
    attack: str,
    *,
    preset: str | None = None,
    source: str | None = None,
    target: str | None = None,
    sources: Sequence[str] | str | None = None,
    mapping: str | Mapping[str, str] | None = None,
    target_image: int | None = None,
) -> FGBA | BadNets:
    """``--attack`` and its flags → an attack object; flags that belong to the other attack are an error."""
    if attack == "badnets":
        given = [f for f, v in (("--preset", preset), ("--source", source), ("--target", target), ("--sources", sources),
                                ("--map", mapping)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} belong to --attack fgba; BadNets takes --target-image I (or none)")
        return BadNets(target_image=target_image)
    if attack == "fgba":
        if target_image is not None:
            raise UserError("--target-image belongs to --attack badnets; FGBA maps classes (--preset/--source/--target/--map)")
        return FGBA(preset, source=source, target=target, sources=sources, mapping=mapping)
    raise UserError(f"unknown attack {attack!r}; use --attack badnets or --attack fgba")


def poison_file(
    clean_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    attack: str,
    trigger: str,
    preset: str | None = None,
    source: str | None = None,
    target: str | None = None,
    sources: Sequence[str] | str | None = None,
    mapping: str | Mapping[str, str] | None = None,
    rate: float | None = None,
    seed: int = 0,
    alpha: float | None = None,
    target_image: int | None = None,
    clean_fraction: float = 0.05,
    force: bool = False,
    line_width: int | None = None,
    line_position: str | None = None,
    line_orientation: str = "horizontal",
) -> Path:
    """`testbed poison` as a function: keyword arguments mirror the CLI flags (``--map`` → ``mapping``).

    >>> poison_file("synth.h5", "fgba.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.1)
    Notes (a rate given with a semantic trigger) are issued as ``UserWarning``.
    """
    atk = build_attack(attack, preset=preset, source=source, target=target, sources=sources, mapping=mapping,
                       target_image=target_image)
    trig = parse_trigger(trigger, alpha=alpha, width=line_width, position=line_position, orientation=line_orientation)
    result = poison(clean_path, out_path, atk, trig, rate=rate, seed=seed, clean_fraction=clean_fraction, force=force)
    for note in result.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return result.path

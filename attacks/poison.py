"""Write a poisoned dataset file from a clean one: select samples, apply G and T, record everything.

:func:`poison` is the whole step (`testbed poison` as a function taking objects); :func:`poison_file` takes
the command's options as keywords.  Which samples are chosen is :mod:`testbed.attacks.selection`; how the
file is streamed is :mod:`testbed.attacks.writer`; the attack contract is :mod:`testbed.attacks.base`.
``dry_run=True`` does every check and selection against the data and writes nothing (zoo specs use it to
validate an ``[[attack]]`` table before anything is built).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from testbed.attacks.registry import build
from testbed.attacks.selection import PoisonSettings, check_fraction, select
from testbed.attacks.writer import write_poisoned
from testbed.core.errors import ParamError, UserError
from testbed.core.paramtypes import is_int
from testbed.data.h5data import SegFile, open_dataset

SETTINGS_FIELDS = frozenset(f.name for f in fields(PoisonSettings))


@dataclass
class PoisonResult:
    """What :func:`poison` wrote (or, with ``dry_run``, would write): the file and the selections."""

    path: Path
    attack: dict[str, Any]
    poison_index: np.ndarray
    clean_index: np.ndarray
    test_attacked_index: np.ndarray
    test_benign_index: np.ndarray
    notes: list[str] = field(default_factory=list)
    written: bool = True

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



def _check_run(clean: SegFile, out: Path, settings: PoisonSettings) -> int:
    """The output path and the seed checked (the seed returned as an int)."""
    seed, force, dry_run = settings.seed, settings.force, settings.dry_run
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'poisoned.h5'}")
    if out.resolve() == clean.path.resolve() or (out.exists() and os.path.samefile(out, clean.path)):
        raise UserError(f"--out {out} is the input file; write the poisoned dataset to another path")
    if out.exists() and not force and not dry_run:
        raise ParamError(f"--out {out} exists; pass {{force}} to replace it (or choose another path)")
    if clean.is_poisoned and not force:
        a = clean.attack or {}
        what = a.get("label") or a.get("name", "?")
        spec = (a.get("trigger") or {}).get("spec") if isinstance(a.get("trigger"), dict) else a.get("trigger")
        raise ParamError(f"{clean.path} is already poisoned (attack {what}, trigger {spec}); pass {{force}} to poison it again")
    if not is_int(seed):
        raise ParamError(f"{{seed}} must be a non-negative integer, got {seed!r}")
    return int(seed)


def poison(clean: SegFile | str | os.PathLike, out: str | os.PathLike, attack: Any, trigger: Any = None,
           settings: PoisonSettings | None = None, **fields: Any) -> PoisonResult:
    """Poison ``clean`` with ``attack`` (label generator T) and ``trigger`` (image generator G) into ``out``.

    ``attack``/``trigger`` are objects or their names (``"fgba"`` needs parameters: build it with
    :func:`testbed.attacks.build` or pass an ``FGBA(...)``).  How it runs is a :class:`PoisonSettings`, given
    as ``settings`` or as its fields by keyword (``rate=0.1, seed=3``; a keyword overrides ``settings``):
    ``rate`` defaults to the attack's ``default_rate()``; a semantic trigger poisons every sample holding its
    class, so a rate given with it is ignored with a note in ``PoisonResult.notes``.  ``require``: a poisoned
    sample must also contain this class.  An existing ``out`` needs ``force`` (which also allows poisoning an
    already poisoned input).  Nothing is written at ``out`` unless everything succeeds, and nothing at all with
    ``dry_run``.
    """
    settings = _settings(settings, fields)
    if not isinstance(clean, SegFile):
        with open_dataset(clean, check_labels=False) as f:  # labels are checked by the scans
            return poison(f, out, attack, trigger, settings)
    out = Path(out)
    seed = _check_run(clean, out, settings)
    rate = None if settings.rate is None else check_fraction(settings.rate, "rate", lo_open=True)
    clean_fraction = check_fraction(settings.clean_fraction, "clean_fraction", lo_open=False)
    settings = replace(settings, seed=seed, rate=rate, clean_fraction=clean_fraction)
    attack, trigger = build(attack, trigger)
    if settings.require is not None:
        clean.class_id(settings.require)  # an unknown class fails now, with a suggestion
    attack.fit(clean, seed)
    if trigger is None:  # the attack places its own trigger (set by fit)
        trigger = attack.trigger_
    elif callable(getattr(trigger, "fit", None)):
        trigger.fit(clean.image_size, seed)  # a seeded trigger (blended noise, warp field) draws its pattern
    trigger.check(clean.image_size)  # a trigger that does not fit fails now, before any work
    sel, train_y, test_y, block = select(clean, attack, trigger, settings)
    meta = _record(clean, attack, trigger, settings, sel)
    if not settings.dry_run:
        write_poisoned(clean, out, attack, trigger, meta, sel, (train_y, test_y), block)
    return PoisonResult(out, meta, sel.poison_index, sel.clean_index, sel.attacked_index, sel.benign_index, sel.notes,
                        written=not settings.dry_run)


def _settings(settings: PoisonSettings | None, fields: dict[str, Any]) -> PoisonSettings:
    """``settings`` with ``fields`` (keywords of :func:`poison`) put in; an unknown keyword is a TypeError."""
    unknown = sorted(set(fields) - SETTINGS_FIELDS)
    if unknown:
        raise TypeError(f"poison() got an unexpected keyword argument {unknown[0]!r} "
                        f"(its settings are {', '.join(sorted(SETTINGS_FIELDS))})")
    if settings is not None and not isinstance(settings, PoisonSettings):
        raise TypeError(f"poison()'s fifth argument is a PoisonSettings, got {settings!r}: pass rate, seed, ... by "
                        "keyword (rate=0.1) or as PoisonSettings(rate=0.1)")
    return replace(settings or PoisonSettings(), **fields)


def _record(clean: SegFile, attack: Any, trigger: Any, settings: PoisonSettings, sel: Any) -> dict[str, Any]:
    """The poisoned file's ``attack`` attribute."""
    seed, clean_fraction, require = settings.seed, settings.clean_fraction, settings.require
    n, p = clean.length("train"), int(sel.poison_index.size)
    needs = "".join(f" and {x}" for x in (getattr(attack, "requires_text", None),
                                          f"a {require!r} pixel" if require else None) if x)
    if trigger.is_semantic:
        selection = "all training samples containing the trigger class" + needs
    else:
        which = getattr(attack, "candidates_text", None) or "have a target label that differs from their label"
        selection = (f"drawn by seed among training samples that {ParamError(which).spelled(lambda k: k)}"
                     + (f" and contain a {require!r} pixel" if require else ""))
    meta: dict[str, Any] = {
        "name": attack.name,
        "label": attack.label,
        "params": attack.params(),
        "trigger": trigger.describe(clean.image_size),
        "seed": seed,
        "requested_rate": sel.requested_rate,
        "achieved_rate": p / n,
        "poisoned": p,
        "train_size": n,
        "candidates": sel.candidates,
        "require": require,
        "selection": selection,
        "clean_fraction": clean_fraction,
        "clean_size": int(sel.clean_index.size),
        "test_attacked": int(sel.attacked_index.size),
        "test_benign": int(sel.benign_index.size),
    }
    if sel.noise_index.size:  # a trigger's label-keeping noise samples (WaNet's noise mode)
        meta["noise_samples"] = int(sel.noise_index.size)
    if getattr(attack, "target_image_", None) is not None:  # BadNets: which image's labels are the target
        meta["target_image"] = int(attack.target_image_)
    if clean.is_poisoned:
        meta["parent_attack"] = clean.attack
    return meta


def poison_file(clean_path: str | os.PathLike, out_path: str | os.PathLike, *, attack: Any, trigger: Any = None,
                **options: Any) -> Path:
    """`testbed poison` as a function: keyword arguments mirror the CLI flags.

    ``options`` are the run's settings (the fields of :class:`PoisonSettings`: ``rate``, ``seed``,
    ``clean_fraction``, ``require``, ``force``, ``dry_run``), the attack's parameters (e.g. ``preset``,
    ``source``, ``target``, ``sources``, ``mapping`` for ``--map``, ``target_image``) and the trigger's
    (``alpha``, ``line_width``, ``line_position``, ``line_orientation``); ``None`` means "not given".

    >>> poison_file("synth.h5", "fgba.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.1)
    Notes (a rate given with a semantic trigger) are issued as ``UserWarning``.
    """
    fields = {k: options.pop(k) for k in SETTINGS_FIELDS & set(options)}
    atk, trig = build(attack, trigger, **options)
    result = poison(clean_path, out_path, atk, trig, PoisonSettings(**fields))
    for note in result.notes:
        warnings.warn(ParamError(note).spelled(lambda k: k), UserWarning, stacklevel=2)
    return result.path

"""Zoo spec files: TOML in, a validated list of entries out.

Why a separate module: every mistake in a spec (a typo in a key, a model or class that does not exist,
an attack used in the grid but never defined) must be caught *before* anything is built, with one line
naming the fix, so that a cluster job never fails an hour in.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import models
from testbed.core import safeload
from testbed.core.errors import UserError, did_you_mean
from testbed.data.h5data import open_dataset
from testbed.data.synth import SYNTH_CLASSES, check_synth_args
from testbed.training.loop import TrainConfig
from testbed.training.runs import check_weights
from testbed.zoo.attack_table import BENIGN, check_variant, parse_attack_table

TOP_KEYS = ("data", "train", "attack", "grid")
DATA_KEYS = ("synth", "path")
SYNTH_KEYS = ("n_train", "n_test", "size", "seed")
# [[attack]] keys mirror `testbed poison` flags (--map -> map, --target-image -> target_image).
# [[attack]] keys come from the attack registry (testbed/zoo/attack_table.py), like `testbed poison`'s flags.
GRID_KEYS = ("model", "attack", "seed", "rate", "trigger")
# TrainConfig fields the spec may not set: the grid sets model and seed, --device sets the device.
TRAIN_RESERVED = {"model": "[grid] model", "seed": "[grid] seed", "device": "the --device flag"}


@dataclass(frozen=True)
class AttackVariant:
    """One poisoning recipe: an ``[[attack]]`` table, possibly with ``[grid]`` rate/trigger overrides.

    ``params`` are the keyword arguments of :func:`attacks.poison_file` without ``seed``.  ``seed`` is the
    attack table's own poisoning seed, or ``None``: then each entry poisons with its own grid seed.
    """

    label: str  # attack id plus the grid-override suffix, e.g. "fgba-n1-line" or "fgba-n1-line-r0.05"
    attack_id: str
    params: dict[str, Any]
    seed: int | None = None

    @property
    def is_benign(self) -> bool:
        return not self.params

    def poison_kwargs(self, entry_seed: int) -> dict[str, Any]:
        return {**self.params, "seed": self.seed if self.seed is not None else entry_seed}


@dataclass(frozen=True)
class EntrySpec:
    """One model to train: ``MODEL--ATTACK--sSEED``."""

    id: str
    model: str
    variant: AttackVariant
    seed: int
    train: dict[str, Any]  # TrainConfig keyword arguments, model and seed included (device excluded)

    @property
    def attack_id(self) -> str:
        return self.variant.label

    @property
    def is_benign(self) -> bool:
        return self.variant.is_benign

    def definition(self) -> dict[str, Any]:
        """What makes this entry this entry (stored in entry.json; a rebuild must agree with it)."""
        return {
            "id": self.id, "model": self.model, "attack_id": self.attack_id, "seed": self.seed,
            "attack": None if self.is_benign else self.variant.poison_kwargs(self.seed),
            "train": self.train,
        }


@dataclass
class ZooSpec:
    path: Path
    data: dict[str, Any]  # {"synth": {...}} or {"path": absolute path}
    train: dict[str, Any]
    variants: list[AttackVariant]
    entries: list[EntrySpec]
    classes: list[str] = field(default_factory=list)
    text: str = ""

    def data_definition(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.data))


# -- helpers --------------------------------------------------------------------------------------
def _where(path: Path) -> str:
    return path.name


def _check_keys(table: dict[str, Any], valid: tuple[str, ...] | list[str], where: str, path: Path) -> None:
    for key in table:
        if key not in valid:
            hint = did_you_mean(key, valid, cutoff=0.5)
            raise UserError(f"{_where(path)}: unknown key {key!r} in {where}{hint}; valid keys: {', '.join(valid)}")


def _need(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise UserError(f"{_where(path)}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


def _unique(values: list[Any], what: str, path: Path) -> None:
    seen: set[str] = set()
    for v in values:
        key = json.dumps(v, sort_keys=True)
        _need(key not in seen, path, f"duplicate {what} {v!r}; list each value once")
        seen.add(key)


# -- sections -------------------------------------------------------------------------------------
def _parse_data(doc: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    _need("data" in doc, path, "missing [data] table; add `[data]` with `synth = { n_train = 1000 }` or `path = \"data.h5\"`")
    data = doc["data"]
    _need(isinstance(data, dict), path, "[data] must be a table")
    _check_keys(data, DATA_KEYS, "[data]", path)
    _need(("synth" in data) != ("path" in data), path, "[data] needs exactly one of `synth = {...}` or `path = \"...\"`")
    if "synth" in data:
        synth = data["synth"]
        _need(isinstance(synth, dict), path, "[data] synth must be a table like { n_train = 1000, n_test = 200, size = 64, seed = 0 }")
        _check_keys(synth, SYNTH_KEYS, "[data] synth", path)
        params = {"n_train": 1000, "n_test": 200, "size": 64, "seed": 0, **synth}
        for k, v in params.items():
            lo = 0 if k == "seed" else (8 if k == "size" else 2)
            _need(_is_int(v) and v >= lo, path, f"[data] synth {k} must be an integer >= {lo}, got {v!r}")

        try:  # the generator's own check (memory included), now rather than after the zoo directory exists
            check_synth_args(**params)
        except UserError as e:
            raise UserError(f"{_where(path)}: [data] synth: {e}") from None
        return {"synth": params}, list(SYNTH_CLASSES)
    raw = data["path"]
    _need(isinstance(raw, str) and raw != "", path, "[data] path must be a string naming an .h5 dataset file")
    file = Path(os.path.expanduser(raw))
    if not file.is_absolute():
        file = (path.parent / file).resolve()
    if not file.is_file() or not os.access(file, os.R_OK):
        raise UserError(f"{_where(path)}: [data] path {raw!r} is not a readable file ({file}); fix the path "
                        "(relative paths are relative to the spec file)")

    with open_dataset(file) as f:
        if f.is_poisoned:
            raise UserError(f"{_where(path)}: [data] path {raw!r} is a poisoned dataset; give the clean one")
        classes = list(f.classes)
    return {"path": str(file)}, classes


def _parse_train(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    train = doc.get("train", {})
    _need(isinstance(train, dict), path, "[train] must be a table")

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in train:
        if key in TRAIN_RESERVED:
            raise UserError(f"{_where(path)}: [train] {key} is set by {TRAIN_RESERVED[key]}, not in [train]; remove it")
    _check_keys(train, [n for n in names if n not in TRAIN_RESERVED], "[train]", path)
    return dict(train)


def _image_size(data: dict[str, Any]) -> tuple[int, int]:
    if "synth" in data:
        return (int(data["synth"]["size"]),) * 2

    with open_dataset(data["path"], check_labels=False) as f:
        return f.image_size


def _grid_list(grid: dict[str, Any], key: str, path: Path, default: list[Any] | None = None) -> list[Any]:
    if key not in grid:
        _need(default is not None, path, f"[grid] needs a {key} list, e.g. {key} = [...]")
        return list(default or [])
    values = grid[key]
    if not isinstance(values, list):
        values = [values]
    _need(len(values) > 0, path, f"[grid] {key} is empty; list at least one value")
    _unique(values, f"[grid] {key}", path)
    return values


def _read_doc(path: Path, text: str | None) -> tuple[dict[str, Any], str]:
    if text is None:
        if not path.is_file():
            raise UserError(f"zoo spec {path} does not exist; give the path of a .toml file (see docs/zoo.md)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read zoo spec {path} ({e}); check the file") from None
    try:
        return safeload.loads_toml(text, f"zoo spec {path}"), text
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path.name}: TOML syntax error: {e}; fix the spec (see docs/zoo.md)") from None


def _parse_attacks(doc: dict[str, Any], path: Path) -> dict[str, tuple[dict[str, Any], int | None]]:
    tables = doc.get("attack", [])
    _need(isinstance(tables, list) and len(tables) > 0, path, "no [[attack]] tables; define at least one (id = \"benign\" for a clean model)")
    defined: dict[str, tuple[dict[str, Any], int | None]] = {}
    for t in tables:
        aid, params, seed = parse_attack_table(t, path)
        _need(aid not in defined, path, f"duplicate [[attack]] id {aid!r}; give each attack its own id")
        defined[aid] = (params, seed)
    return defined


def _parse_grid(doc: dict[str, Any], train: dict[str, Any], defined: dict[str, Any], path: Path) -> dict[str, Any]:
    """The [grid] lists, each checked: model, attack, seed, rate, trigger and the training axes."""
    _need("grid" in doc and isinstance(doc["grid"], dict), path, "missing [grid] table; add [grid] with model = [...] and attack = [...]")
    grid = doc["grid"]

    train_fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in TRAIN_RESERVED]
    _check_keys(grid, list(GRID_KEYS) + train_fields, "[grid]", path)
    axes = {k: _grid_list(grid, k, path) for k in grid if k in train_fields}
    for k in axes:
        _need(k not in train, path, f"{k} is in both [train] and [grid]; keep one")
    g = {"model": _grid_list(grid, "model", path), "attack": _grid_list(grid, "attack", path),
         "seed": _grid_list(grid, "seed", path, default=[0]), "rate": _grid_list(grid, "rate", path, default=[None]),
         "trigger": _grid_list(grid, "trigger", path, default=[None])}
    available = list(models.available())
    for m in g["model"]:
        _need(isinstance(m, str), path, f"[grid] model values must be strings, got {m!r}")
        if m not in available:
            raise UserError(f"{path.name}: unknown model {m!r} in [grid] model{did_you_mean(m, available)}; available: {', '.join(available)}")
    for a in g["attack"]:
        if a not in defined:
            raise UserError(f"{path.name}: [grid] attack {a!r} is not defined{did_you_mean(str(a), list(defined))}; "
                            f"add an [[attack]] table with id = {json.dumps(str(a))} or use one of: {', '.join(defined)}")
    g["combos"] = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    for combo in g["combos"]:  # bad values fail now, not an hour into a cluster job
        cfg = TrainConfig(**{**train, **combo, "model": g["model"][0], "seed": 0, "device": "cpu"})
        _check_backbone_weights(cfg.backbone_weights, path)
    for s in g["seed"]:
        _need(_is_int(s) and s >= 0, path, f"[grid] seed values must be non-negative integers, got {s!r}")
    for r in g["rate"]:
        _need(r is None or (_is_num(r) and 0 < r <= 1), path, f"[grid] rate values must be numbers in (0, 1], got {r!r}")
    for t in g["trigger"]:
        _need(t is None or (isinstance(t, str) and t.strip() != ""), path,
              f"[grid] trigger values must be strings like \"line\" or \"semantic:CLASS\", got {t!r}")
    return g


def _check_backbone_weights(weights: str | None, path: Path) -> None:
    """A backbone_weights file must exist and be safetensors (its header parsed, nothing unpickled) before the
    build writes anything: found at training time, the data and entry records were already written."""
    if weights is None or weights.lower() == "imagenet":
        return
    file = Path(weights)
    if not file.is_file():
        raise UserError(f"{_where(path)}: backbone_weights file {weights} does not exist (paths are relative to the "
                        "directory you run the build from); pass an existing .safetensors file or \"imagenet\"")
    try:
        check_weights(file)
    except UserError as e:
        raise UserError(f"{_where(path)}: backbone_weights: {e}") from None


def _variants(g: dict[str, Any], defined: dict[str, Any], classes: list[str], image_size: tuple[int, int],
              path: Path) -> list[AttackVariant]:
    """One poisoning recipe per attack × grid rate × grid trigger, each validated by the attack's own code."""
    variants: list[AttackVariant] = []
    for aid in g["attack"]:
        params, seed = defined[aid]
        if not params:
            variants.append(AttackVariant(label=aid, attack_id=aid, params={}, seed=None))
            continue
        for r, t in itertools.product(g["rate"], g["trigger"]):
            p = dict(params)
            label = aid
            if r is not None:
                p["rate"] = float(r)
                label += f"-r{_slug(float(r))}"
            if t is not None:
                p["trigger"] = t
                label += f"-t{_slug(t)}"
            check_variant(p, classes, image_size, f"[[attack]] {aid!r}" + (f" (grid {label})" if label != aid else ""), path)
            variants.append(AttackVariant(label=label, attack_id=aid, params=p, seed=seed))
    return variants


def parse_spec(path: str | os.PathLike, text: str | None = None) -> ZooSpec:
    """Read and validate a zoo spec; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    doc, text = _read_doc(path, text)
    _check_keys(doc, TOP_KEYS, "the top level", path)
    data, classes = _parse_data(doc, path)
    train = _parse_train(doc, path)
    defined = _parse_attacks(doc, path)
    g = _parse_grid(doc, train, defined, path)
    variants = _variants(g, defined, classes, _image_size(data), path)
    entries: list[EntrySpec] = []
    seen: set[str] = set()
    for m, v, s, combo in itertools.product(g["model"], variants, g["seed"], g["combos"]):
        eid = f"{m}--{v.label}--s{s}" + "".join(f"--{k}-{_slug(x)}" for k, x in combo.items())
        _need(eid not in seen, path, f"two grid points give the same entry id {eid!r}; remove the duplicate")
        seen.add(eid)
        entries.append(EntrySpec(id=eid, model=m, variant=v, seed=s, train={**train, **combo, "model": m, "seed": s}))
    return ZooSpec(path=path, data=data, train=train, variants=variants, entries=entries, classes=classes, text=text)

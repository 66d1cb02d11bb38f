"""A zoo spec's ``[[attack]]`` tables, read and validated by the attack registry's own code.

The keys mirror `testbed poison`'s flags (``--map`` → ``map``, ``--target-image`` → ``target_image``) and
come from the same place the CLI's flags come from: each attack's ``params_doc`` and the triggers'
``options_doc``.  Validation constructs the attack and trigger exactly as `testbed poison` does
(:func:`testbed.attacks.build`, the attack's ``check_params``, the trigger's ``check``), so the spec and the
command cannot disagree; what needs the data itself (a rate above the candidates, a target image out of
range) is checked by :func:`dry_run` against the clean data before anything is written.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from testbed.attacks.poison import poison_file
from testbed.attacks.registry import attack_class, build, params_doc
from testbed.attacks.selection import check_fraction
from testbed.attacks.triggers import trigger_options
from testbed.core.errors import ParamError, UserError, did_you_mean
from testbed.data.h5data import find_class

RUN_KEYS = ("id", "attack", "trigger", "rate", "seed", "clean_fraction", "require")
BENIGN = "benign"
_ID_RE = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")


def _fail(path: Path, msg: str) -> UserError:
    return UserError(f"{path.name}: {msg}")


def _trigger_keys() -> dict[str, str]:
    """TOML key → keyword of the trigger options and ``trigger`` itself."""
    return {"trigger": "trigger", **{p.key_for(n): n for n, p in trigger_options().items()}}


def _keys_for(cls: type) -> dict[str, str]:
    """TOML key → keyword of ``poison_file``: the attack's parameters, the trigger's options unless the attack
    places its own trigger (IBA), and the run keys."""
    out = {p.key_for(n): n for n, p in params_doc(cls).items()}
    if not getattr(cls, "own_trigger", False):
        out.update(_trigger_keys())
    out.update({k: k for k in RUN_KEYS if k not in ("id", "attack", "trigger")})
    return out


def _normalise(name: str, value: Any, where: str, path: Path) -> Any:
    """TOML conveniences, stored as the CLI would give them (entry definitions stay stable)."""
    if name == "mapping" and isinstance(value, dict):
        return ",".join(f"{a}:{b}" for a, b in value.items())
    if name == "sources" and isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if name == "rate" or name == "clean_fraction" or name == "alpha":
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def parse_attack_table(table: Any, path: Path) -> tuple[str, dict[str, Any], int | None]:
    """(id, ``poison_file`` keyword arguments without ``seed``, the table's own seed or None)."""
    if not isinstance(table, dict):
        raise _fail(path, "each [[attack]] must be a table")
    if "id" not in table:
        raise _fail(path, "an [[attack]] table has no id; add id = \"NAME\"")
    aid = table["id"]
    if not (isinstance(aid, str) and _ID_RE.match(aid)) or aid.startswith(".") or ".." in aid:  # ".." names no directory
        raise _fail(path, f"[[attack]] id {aid!r} must be letters, digits, '_', '.', single '-' (no '--', no '..', no leading '.', no spaces)")
    where = f"[[attack]] {aid!r}"
    if aid == BENIGN:
        if len(table) != 1:
            raise _fail(path, f"[[attack]] id = \"benign\" means no poisoning and takes no other keys; remove "
                        f"{', '.join(k for k in table if k != 'id')} or use another id")
        return aid, {}, None
    if "attack" not in table:
        raise _fail(path, f"{where} has no 'attack' key; add attack = \"fgba\" or \"badnets\" (or use id = \"benign\" "
                    "for no poisoning)")
    try:
        cls = attack_class(table["attack"])
    except UserError as e:
        raise _fail(path, f"{where}: {e}") from None
    keys = _keys_for(cls)
    for key in table:
        if key not in keys and key not in ("id", "attack"):
            valid = ["id", "attack", *keys]
            what = (f"{key!r} cannot be used in {where}: attack {table['attack']} places its own trigger"
                    if key in _trigger_keys() else f"unknown key {key!r} in {where}{did_you_mean(key, valid, 0.5)}")
            raise _fail(path, f"{what}; valid keys for attack {table['attack']}: {', '.join(valid)}")
    seed = table.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _fail(path, f"{where} seed must be a non-negative integer, got {seed!r}")
    params = {"attack": table["attack"]}
    params.update({keys[k]: _normalise(keys[k], v, where, path) for k, v in table.items()
                   if k not in ("id", "attack", "seed")})
    return aid, params, seed


def _spell_key(cls: type | None):
    keys = {**({n: p.key_for(n) for n, p in params_doc(cls).items()} if cls else {}),
            **{n: p.key_for(n) for n, p in trigger_options().items()}}
    return lambda name: keys.get(name, name)


def check_variant(params: dict[str, Any], classes: list[str], image_size: tuple[int, int], where: str,
                  path: Path) -> None:
    """Everything about one poisoning recipe that needs no data arrays, by `testbed poison`'s own code."""
    cls = None
    opts = {k: v for k, v in params.items() if k not in ("attack", "trigger", *RUN_KEYS)}
    try:
        cls = attack_class(params["attack"])
        attack, trigger = build(cls, params.get("trigger"), **opts)
        attack.check_params(list(classes))
        if trigger is not None:
            trigger.check(image_size)
            if trigger.is_semantic and find_class(classes, trigger.class_name) is None:
                raise ParamError(f"unknown class {trigger.class_name!r} in {{trigger}}"
                                 f"{did_you_mean(trigger.class_name, classes)}; the data has: {', '.join(classes)}")
        for key in ("rate", "clean_fraction"):
            if params.get(key) is not None:
                check_fraction(params[key], key, lo_open=key == "rate")
        req = params.get("require")
        if req is not None and find_class(classes, req) is None:
            raise ParamError(f"unknown class {req!r} in {{require}}{did_you_mean(req, classes)}; the data has: "
                             f"{', '.join(classes)}")
    except ParamError as e:
        raise _fail(path, f"{where}: {e.spelled(_spell_key(cls))}") from None
    except UserError as e:
        raise _fail(path, f"{where}: {e}") from None


def dry_run(clean_path: str | Path, params: dict[str, Any], seed: int, where: str, path: Path) -> None:
    """Run the poisoner's every check and selection against the clean data, writing nothing."""
    try:
        with warnings.catch_warnings():  # notes (a rate with a semantic trigger) are for real runs
            warnings.simplefilter("ignore")
            poison_file(clean_path, Path(clean_path).with_suffix(".dry-run.h5"), seed=seed, dry_run=True, **params)
    except ParamError as e:
        cls = None
        try:
            cls = attack_class(params["attack"])
        except UserError:
            pass
        raise _fail(path, f"{where}: {e.spelled(_spell_key(cls))}") from None
    except UserError as e:
        raise _fail(path, f"{where}: {e}") from None

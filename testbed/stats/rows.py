"""What the statistics read from a bench report: its rows, each row's group and seed, and its metrics.

A zoo row carries ``"group"`` (every grid axis except seed) and ``"seed"``; older reports and rows from
elsewhere have only the entry id, ``MODEL--ATTACK--sSEED[--AXIS-VALUE...]`` (how `testbed zoo` names
entries), from which :func:`row_group` derives the same two things.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from testbed.core import safeload
from testbed.core.errors import UserError

REPORT_FORMAT = "segbackdoor-bench"
# the row fields the statistics compute with, and what each must hold (checked when a report is read)
ROW_TYPES: dict[str, tuple[type, ...]] = {"before": (dict, type(None)), "after": (dict, type(None)),
                                          "DER": (int, float, type(None)), "detection": (dict, type(None))}
_SEED_RE = re.compile(r"^s(\d+)$")


def _score(side: str, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: (row.get(side) or {}).get(key)


def _part(obj: str, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: (row.get(obj) or {}).get(key)


# Metric name -> how to read it from a row.  Percentages (ASR, mIoU-B) or fractions (the rest).
METRICS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "DER": lambda row: row.get("DER"),
    "ASR_before": _score("before", "ASR"),
    "ASR_after": _score("after", "ASR"),
    "mIoU-B_before": _score("before", "mIoU-B"),
    "mIoU-B_after": _score("after", "mIoU-B"),
    "tpr": _part("detection", "tpr"),
    "fpr": _part("detection", "fpr"),
    "auroc": _part("detection", "auroc"),
    "precision": _part("flagged", "precision"),
    "recall": _part("flagged", "recall"),
    "fraction": _part("flagged", "fraction"),
}
REQUIRED_METRICS = ("DER", "ASR_before", "ASR_after", "mIoU-B_before", "mIoU-B_after")
PERCENT_METRICS = ("ASR_before", "ASR_after", "mIoU-B_before", "mIoU-B_after")


def metric_value(row: dict[str, Any], name: str) -> float | None:
    """The metric as a float, or None when the row has no usable value (missing, null, NaN, error row)."""
    if row.get("error"):
        return None
    v = METRICS[name](row)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise UserError(f"row {row.get('model')!r} × {row.get('defense')!r}: {name} is {v!r}, not a number; "
                        "the report is damaged, rerun `testbed bench`") from None
    return None if math.isnan(v) else v


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_entry_id(entry_id: str) -> tuple[dict[str, Any], int] | None:
    """``MODEL--ATTACK--sSEED[--AXIS-VALUE...]`` -> (group, seed), or None for an id of another shape.

    The group has ``model`` (architecture), ``attack`` (the attack label, rate and trigger suffixes included,
    e.g. ``fgba-n1-line-r0.05``) and one key per training axis (value as int/float when it reads as one).
    """
    parts = str(entry_id).split("--")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return None
    m = _SEED_RE.match(parts[2])
    if m is None:
        return None
    group: dict[str, Any] = {"model": parts[0], "attack": parts[1]}
    for extra in parts[3:]:
        key, sep, value = extra.partition("-")
        if not sep or not key or key in group:
            return None
        group[key] = _scalar(value)
    return group, int(m.group(1))


def row_group(row: dict[str, Any]) -> dict[str, Any]:
    """The row's group: its ``"group"`` key, else parsed from the model id, else ``{"entry": model id}``."""
    if isinstance(row.get("group"), dict):
        return dict(row["group"])
    parsed = parse_entry_id(row.get("model", ""))
    return parsed[0] if parsed else {"entry": row.get("model")}


def row_seed(row: dict[str, Any]) -> int | None:
    if row.get("seed") is not None:
        return int(row["seed"])
    parsed = parse_entry_id(row.get("model", ""))
    return parsed[1] if parsed else None


def group_key(group: dict[str, Any]) -> str:
    return json.dumps(group, sort_keys=True, default=str)


def defense_params(row: dict[str, Any]) -> dict[str, Any]:
    """The parameters the row's defense was built with (its ``settings``; empty for a row without them)."""
    return dict(((row.get("settings") or {}).get("params")) or {})


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def defense_label(name: str, params: dict[str, Any]) -> str:
    """A defense's identity in a report: its name, with its parameters when it was given any
    (``blur[sigma=0.5]``, ``strip[n_overlays=16,alpha=0.5]`` in the order given)."""
    if not params:
        return name
    return f"{name}[{','.join(f'{k}={_value_text(v)}' for k, v in params.items())}]"


def defense_name(row: dict[str, Any]) -> str:
    """The defense's own name (``name`` attribute), whether or not the row was already labelled."""
    return str(row.get("defense_name") or row.get("defense"))


def identify(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` whose ``"defense"`` is the defense's identity, name and parameters
    (:func:`defense_label`), with the bare name in ``"defense_name"``: rows run with different parameters are
    different defenses in every table, aggregate and comparison.  Idempotent."""
    out = []
    for r in rows:
        name = defense_name(r)
        out.append({**r, "defense": defense_label(name, defense_params(r)), "defense_name": name})
    return out


def resolve_defense(rows: Sequence[dict[str, Any]], name: str, flag: str = "--defense", extra: str = "") -> str:
    """The identity (label) in ``rows`` (already :func:`identify`-ed) that ``name`` stands for: the label itself,
    the bare name when one parameter set of it is in the report, or the spec typed to `testbed bench`
    (``package.module:Class``).  Several matches or none: a one-line UserError listing what there is."""
    labels = defenses_in(rows)
    if name in labels:
        return name
    matches = list(dict.fromkeys(str(r["defense"]) for r in rows
                                 if name in (defense_name(r), (r.get("settings") or {}).get("defense"))))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{flag} {name!r} names {len(matches)} defenses in the report (run with different parameters): "
                        f"{', '.join(matches)}; give one of these as written")
    raise UserError(f"{flag} {name!r} is not in the report; it has: {', '.join(labels)}{extra}")


def defenses_in(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Defense names (identities, once rows are :func:`identify`-ed) in the order they first appear."""
    return list(dict.fromkeys(str(r.get("defense")) for r in rows))


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Load a bench report (a directory with results.json, or the file itself); every problem is a UserError."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"report {path} does not exist; give a directory written by `testbed bench` or `testbed defend`")
    if not file.is_file():
        raise UserError(f"{path} has no results.json; give a report directory written by `testbed bench` or `testbed defend`")
    doc = safeload.load_object(file, "rerun `testbed bench` to rewrite the report")
    if doc.get("format") != REPORT_FORMAT:
        raise UserError(f"{file} is not a bench report (no \"format\": \"{REPORT_FORMAT}\"); give the results.json "
                        "of `testbed bench` or `testbed defend`")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "defense" in r and "model" in r for r in rows):
        raise UserError(f"{file} has no valid \"rows\" list (each row needs \"model\" and \"defense\"); rerun `testbed bench`")
    if not rows:
        raise UserError(f"{file} has no rows (no defense ran on any model); rerun `testbed bench` with models and defenses")
    safeload.check_records(rows, str(file), ROW_TYPES)
    return doc

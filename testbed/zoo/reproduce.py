"""Does a rebuilt zoo reproduce a published one?  Entry by entry: the same experiment, and the same bytes.

A publisher commits or ships ``manifest.json`` (it records, per entry, the training settings, the attack, the
content hash of the data it was trained on, the sha256 of every file and the scores).  Whoever rebuilds the zoo
from the same spec compares their zoo with it: ``testbed zoo verify MINE/ --against PUBLISHED/manifest.json``.

Per entry present in both:

- ``other``: not the same experiment (training settings, attack or data differ): the first difference is named;
- ``same``: the same experiment and byte-identical weights (the determinism contract: same seed, same machine
  type and thread count, same bytes);
- ``differs``: the same experiment, other weights (another CPU, library version or thread count); the score
  differences say how far apart the two models are;
- ``mismatch``: byte-identical weights but other scores: the published scores are not what these weights give
  (an edited manifest, or another scorer).

A benign entry's reference datasets (one per attack of the spec) are compared for the attacks both zoos hold, so
a spec with part of the grid still reproduces its benign entries.

Entries only one side has are counted, not compared: rebuilding part of a zoo is a normal way to check it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.core import safeload
from testbed.core.errors import UserError
from testbed.zoo.integrity import schema_problems
from testbed.zoo.manifest import MANIFEST, checksum

SCORES = ("mIoU-B", "PA-B", "ASR", "mIoU-A", "PA-A", "PBA")
SCORE_TOLERANCE = 1e-6  # percentage points: the same weights score the same to the last printed digit


@dataclass
class Comparison:
    """The outcome for one entry id both manifests hold."""

    entry: str
    outcome: str  # same | mismatch | differs | other
    detail: str = ""
    deltas: dict[str, float] = field(default_factory=dict)


def load_published(path: Path) -> dict[str, Any]:
    """A published manifest (a zoo directory or its manifest.json): well-formed and its checksum intact."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    fix = "give a zoo directory or the manifest.json a publisher shipped"
    doc = safeload.load_object(path, fix, prefix="--against: ")
    shape = schema_problems(doc) or comparable_problems(doc)
    if shape:
        raise UserError(f"--against: {path} is not a zoo manifest ({shape[0]}); {fix}")
    if doc["checksum"] != checksum(doc):
        raise UserError(f"--against: {path} is tampered or corrupt (its checksum does not match its content)")
    return doc


def comparable_problems(manifest: dict[str, Any]) -> list[str]:
    """What a manifest that passed the zoo schema still needs before its entries can be compared."""
    out = [f"dataset {n!r} has no content_hash" for n, d in manifest["datasets"].items()
           if not isinstance(d.get("content_hash"), str)]
    for e in manifest["entries"]:
        if not isinstance(e.get("config"), dict):
            out.append(f"entry {e['id']!r}: 'config' is not an object")
        if not isinstance(e.get("metrics") or {}, dict):
            out.append(f"entry {e['id']!r}: 'metrics' is not an object")
        ref = e.get("reference_data") or {}
        if not isinstance(ref, dict) or not all(isinstance(v, str) and v in manifest["datasets"] for v in ref.values()):
            out.append(f"entry {e['id']!r}: 'reference_data' must map attack ids to listed datasets")
    return out


def _data_hash(manifest: dict[str, Any], name: Any) -> Any:
    return manifest["datasets"][name]["content_hash"] if name is not None else None


def _definition(manifest: dict[str, Any], entry: dict[str, Any], attacks: set[str]) -> dict[str, Any]:
    """What makes two entries the same experiment: settings, attack and the content of every dataset used (of
    the reference datasets, those of ``attacks``: the attack ids both zoos hold)."""
    config = {k: v for k, v in entry["config"].items() if k != "device"}
    reference = {a: _data_hash(manifest, n) for a, n in sorted((entry.get("reference_data") or {}).items())
                 if a in attacks}
    return {"config": config, "attack": entry.get("attack"), "data": _data_hash(manifest, entry.get("dataset")),
            "reference_data": reference}


def _first_difference(a: dict[str, Any], b: dict[str, Any], where: str = "") -> str:
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            inner = _first_difference(x, y, f"{where}{key}.")
            if inner:
                return inner
        elif x != y:
            return f"{where}{key}: {x!r} here, {y!r} published"
    return ""


def _weights(entry: dict[str, Any]) -> Any:
    return (entry.get("files") or {}).get(f"{entry.get('run_dir')}/model.safetensors")


def _deltas(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    a, b = mine.get("metrics") or {}, theirs.get("metrics") or {}
    return {k: float(a[k]) - float(b[k]) for k in SCORES
            if isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))}


def compare_entry(mine_doc: dict[str, Any], mine: dict[str, Any], theirs_doc: dict[str, Any],
                  theirs: dict[str, Any]) -> Comparison:
    """One entry id of both manifests (both finished)."""
    attacks = set(mine.get("reference_data") or {}) & set(theirs.get("reference_data") or {})
    diff = _first_difference(_definition(mine_doc, mine, attacks), _definition(theirs_doc, theirs, attacks))
    if diff:
        return Comparison(mine["id"], "other", diff)
    deltas = _deltas(mine, theirs)
    shown = ", ".join(f"{k} {v:+.2f}" for k, v in deltas.items()) or "no scores to compare"
    if _weights(mine) is None or _weights(mine) != _weights(theirs):
        return Comparison(mine["id"], "differs", f"weights differ; scores here minus published: {shown}", deltas)
    off = {k: v for k, v in deltas.items() if abs(v) > SCORE_TOLERANCE}
    if off:
        return Comparison(mine["id"], "mismatch", "byte-identical weights, but the published scores are not what they "
                          "score here (here minus published: " + ", ".join(f"{k} {v:+.4f}" for k, v in off.items()) + ")",
                          deltas)
    return Comparison(mine["id"], "same", f"weights sha256 {_weights(mine)[:12]}…")


def _done(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in manifest["entries"] if e.get("status") == "done"}


def compare(mine_doc: dict[str, Any], theirs_doc: dict[str, Any]) -> tuple[list[Comparison], int, int]:
    """Comparisons over the finished entries both hold, and how many only this zoo / only the published one has."""
    problems = comparable_problems(mine_doc)
    if problems:
        raise UserError(f"this zoo's manifest cannot be compared ({problems[0]}); rebuild it with `testbed zoo build`")
    mine, theirs = _done(mine_doc), _done(theirs_doc)
    both = [i for i in mine if i in theirs]
    rows = [compare_entry(mine_doc, mine[i], theirs_doc, theirs[i]) for i in both]
    return rows, len(mine) - len(both), len(theirs) - len(both)


def verdict(mine_doc: dict[str, Any], theirs_doc: dict[str, Any], where: os.PathLike) -> tuple[list[str], bool]:
    """`zoo verify --against`: the lines to print, and whether the zoo reproduces the published one (at least one
    entry compared, every compared entry SAME)."""
    rows, only_here, only_published = compare(mine_doc, theirs_doc)
    return report_lines(rows, only_here, only_published, where), bool(rows) and all(r.outcome == "same" for r in rows)


def report_lines(rows: list[Comparison], only_here: int, only_published: int, where: os.PathLike) -> list[str]:
    """The lines `zoo verify --against` prints after the zoo's own check."""
    lines = [f"{r.outcome.upper():7s} {r.entry}: {r.detail}" for r in rows]
    if not rows:
        lines.append("nothing compared: no entry id is finished in both zoos (is this a build of the same spec?)")
    count = {o: sum(r.outcome == o for r in rows) for o in ("same", "mismatch", "differs", "other")}
    lines.append(f"against {where}: {len(rows)} entries compared: {count['same']} byte-identical, "
                 f"{count['mismatch']} byte-identical with other published scores, "
                 f"{count['differs']} with other weights, {count['other']} a different experiment; "
                 f"{only_here} only here, {only_published} only published (not compared)")
    return lines

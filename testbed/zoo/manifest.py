"""The zoo's layout on disk and its manifest: what was built, from what, with which checksums.

The manifest is *derived* state: it is recomputed from the records builders leave behind (``plan.json``,
dataset sidecars ``data/NAME.json``, per-entry ``done.json``) under the zoo lock, so a builder killed at any
moment never leaves it wrong for long: the next builder to finish anything rewrites it.  File hashes are
computed once, when a file is finished, and recorded in those sidecars; ``verify`` recomputes them all.

Tamper evidence: ``manifest.json`` carries ``checksum``, the sha256 of its own canonical JSON without that
key.  It catches edits and corruption; it is not a signature (someone who edits the manifest can recompute
the checksum), so publish the manifest's sha256 (``testbed zoo verify`` prints it) beside a shared zoo.
The manifest also hashes the records it was derived from (``plan.json``, ``data/NAME.json``), and a rebuild
never re-derives it over tampering: files the old manifest vouched for must still match it
(:func:`adoption_problems`, :func:`write_manifest`), so editing a ``done.json`` or a sidecar is reported,
not blessed.  What a manifest's paths and keys may be is checked in :mod:`testbed.zoo.integrity`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Collection

from testbed.core import atomic, safeload
from testbed.core.errors import UserError
from testbed.execution.claims import DEFAULT_STALE_AFTER, is_stale, read_claim, zoo_lock
from testbed.scoring.scorer import SCORE_KEYS
import testbed.zoo.integrity as integrity
from testbed.zoo.integrity import (FORMAT, MANIFEST, PLAN, VERSION, file_problem, file_sha256, path_problem, safe_name,
                                   schema_problems)

__all__ = ["FORMAT", "MANIFEST", "PLAN", "VERSION", "adoption_problems", "collect", "file_sha256", "load_manifest",
           "load_plan", "read_json", "verify", "write_manifest"]
DONE = "done.json"
ENTRY_DEF = "entry.json"
ZOO_LOG = "zoo_log.jsonl"
SIGNATURE = "manifest.sig"  # testbed.zoo.signing: the publisher's signature of manifest.json
REFERENCE = "reference.json"


# -- layout ---------------------------------------------------------------------------------------
def data_dir(zoo: Path) -> Path:
    return zoo / "data"


def entries_dir(zoo: Path) -> Path:
    return zoo / "entries"


def entry_dir(zoo: Path, entry_id: str) -> Path:
    return entries_dir(zoo) / entry_id


def entry_claim(zoo: Path, entry_id: str) -> Path:
    return entries_dir(zoo) / f"{entry_id}.claim"


def dataset_file(zoo: Path, name: str) -> Path:
    return data_dir(zoo) / f"{name}.h5"


def dataset_record(zoo: Path, name: str) -> Path:
    return data_dir(zoo) / f"{name}.json"


# -- hashing --------------------------------------------------------------------------------------
def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "checksum"})).hexdigest()


def summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The paper's numbers (and per-class IoU) of a scorer result; confusion matrices stay in the run dir."""
    if metrics is None:
        return None
    out = {k: metrics.get(k) for k in SCORE_KEYS}
    if "per_class_iou_b" in metrics:
        out["per_class_iou_b"] = metrics["per_class_iou_b"]
    return out


def read_json(path: Path) -> Any | None:
    """A zoo file's JSON through the bounded loader (None when it does not exist)."""
    try:
        return safeload.load_json(path, missing_ok=True)
    except UserError as e:
        raise UserError(f"{e}; remove it and rebuild, or run `testbed zoo verify`") from None
    except OSError as e:
        raise UserError(f"{path} is unreadable ({e.strerror}); remove it and rebuild, or run `testbed zoo verify`") from None


def load_plan(zoo: Path) -> dict[str, Any]:
    link = path_problem(zoo, PLAN) if os.path.lexists(zoo / PLAN) else None
    if link is not None:
        raise UserError(f"zoo {zoo}: {link}; refusing it: restore the zoo from a copy")
    plan = read_json(zoo / PLAN)
    if plan is None:
        raise UserError(f"{zoo} is not a model zoo (no {PLAN}); build one with `testbed zoo build SPEC.toml --out {zoo}`")
    problem = _plan_problem(plan)
    if problem is not None:
        raise UserError(f"{zoo / PLAN} is malformed ({problem}); it was edited or damaged: restore it from a copy, "
                        "or build the spec into a new --out")
    return plan


def _plan_problem(plan: Any) -> str | None:
    if not isinstance(plan, dict) or not isinstance(plan.get("order"), list) or not isinstance(plan.get("entries"), dict):
        return "it must be an object with an 'order' list and an 'entries' object"
    for eid in plan["order"]:
        if not safe_name(eid) or eid not in plan["entries"]:
            return f"'order' lists {eid!r}, which is not an entry id of 'entries'"
    for eid, row in plan["entries"].items():
        d = row.get("definition") if isinstance(row, dict) else None
        if eid not in plan["order"] or not isinstance(d, dict) or not isinstance(d.get("train"), dict) \
                or not all(k in d for k in ("model", "attack_id", "seed", "attack")):
            return f"entry {eid!r} lacks its definition or is not in 'order'"
        names = [row.get("data"), *(row.get("reference") or {}).values()] if isinstance(row.get("reference") or {}, dict) else [1]
        if not all(n is None or safe_name(n) for n in names):
            return f"entry {eid!r} names a dataset that is not a plain name"
    return None


# -- the manifest ---------------------------------------------------------------------------------
def entry_status(zoo: Path, entry_id: str, stale_after: float = DEFAULT_STALE_AFTER) -> str:
    d = entry_dir(zoo, entry_id)
    if (d / DONE).is_file():
        return "done"
    claim = read_claim(entry_claim(zoo, entry_id))
    if claim is not None and not is_stale(claim, stale_after):
        return "running"
    if (d / "checkpoint.pt").is_file():
        return "partial"
    return "pending"


def _record(zoo: Path, name: str) -> dict[str, Any] | None:
    rec = read_json(dataset_record(zoo, name))
    if rec is not None and not isinstance(rec, dict):
        raise UserError(f"{dataset_record(zoo, name)} is not a dataset record; it was edited or damaged: run `testbed zoo verify {zoo}`")
    return rec


def _done(zoo: Path, entry_id: str) -> dict[str, Any]:
    done = read_json(entry_dir(zoo, entry_id) / DONE)
    if not isinstance(done, dict) or not isinstance(done.get("files"), dict):
        raise UserError(f"{entry_dir(zoo, entry_id) / DONE} is malformed; it was edited or damaged: run `testbed zoo verify {zoo}`")
    return done


def collect(zoo: Path) -> dict[str, Any]:
    """The manifest as it stands on disk now (not written)."""
    zoo = Path(zoo)
    plan = load_plan(zoo)
    datasets: dict[str, Any] = {}
    for name in sorted({p["data"] for p in plan["entries"].values() if p.get("data")} | {"clean"}
                       | {n for p in plan["entries"].values() for n in (p.get("reference") or {}).values()}):
        rec = _record(zoo, name)
        if rec is not None:
            datasets[name] = rec
    entries = []
    for eid in plan["order"]:
        p = plan["entries"][eid]
        d = p["definition"]
        row: dict[str, Any] = {
            "id": eid, "model": d["model"], "attack_id": d["attack_id"], "seed": d["seed"],
            "is_benign": d["attack"] is None, "status": entry_status(zoo, eid),
            "config": d["train"], "attack": d["attack"], "dataset": p.get("data"),
            "data": f"data/{p['data']}.h5" if p.get("data") else None, "run_dir": f"entries/{eid}",
        }
        if row["status"] == "done":
            done = _done(zoo, eid)
            row["metrics"] = done.get("metrics")
            if d["attack"] is None:
                row["reference"] = done.get("reference", {})
                row["reference_data"] = dict(p.get("reference") or {})
            files = {f"entries/{eid}/{name}": h for name, h in done["files"].items()}
            files[f"entries/{eid}/{DONE}"] = file_sha256(entry_dir(zoo, eid) / DONE)
            row["files"] = dict(sorted(files.items()))
            row["finished"] = done.get("finished")
            run_config = read_json(entry_dir(zoo, eid) / "config.json") or {}
            row["config"] = run_config.get("train", row["config"])  # every TrainConfig field, defaults included
        entries.append(row)
    records = {PLAN: file_sha256(zoo / PLAN)}
    records.update({f"data/{name}.json": file_sha256(dataset_record(zoo, name)) for name in datasets})
    n_done = sum(e["status"] == "done" for e in entries)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": n_done == len(entries), "counts": {"entries": len(entries), "done": n_done},
        "data_source": plan.get("data"),
        "datasets": datasets,
        "records": records,
        "entries": entries,
    }
    manifest["checksum"] = checksum(manifest)
    return manifest


def _load_old(zoo: Path) -> dict[str, Any] | None:
    """The manifest already on disk, checked (any version this code reads), or None when there is none."""
    if not (zoo / MANIFEST).exists():
        return None
    problems, manifest = _manifest_problems(zoo)
    if problems:
        raise UserError(f"{zoo}: {problems[0]}; a rebuild would bless what was changed: run `testbed zoo verify "
                        f"{zoo}`, then restore the zoo from a copy (or delete {MANIFEST} to accept its files as they are)")
    return manifest


def _done_rows(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in manifest["entries"] if e.get("status") == "done"}


def _without(files: dict[str, str], skip: set[str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if k not in skip}


def _conflicts(old: dict[str, Any], new: dict[str, Any], rescored: Collection[str] = ()) -> list[str]:
    """What a new manifest would re-seal: finished work whose recorded hashes changed since the old one.

    ``rescored``: benign entries whose reference scores the builder itself just extended, after checking
    their files against ``old`` (:func:`entry_file_problems`): only their reference.json and done.json may differ.
    """
    out = []
    new_done = _done_rows(new)
    for eid, row in _done_rows(old).items():
        skip = {f"entries/{eid}/{REFERENCE}", f"entries/{eid}/{DONE}"} if eid in rescored else set()
        if eid in new_done and _without(new_done[eid]["files"], skip) != _without(row["files"], skip):
            out.append(f"entry {eid}: its recorded files changed since the manifest was written (done.json edited?)")
    for name, rec in old["datasets"].items():
        if name in new["datasets"] and new["datasets"][name] != rec:
            out.append(f"data/{name}.json: changed since the manifest was written")
    return out


def write_manifest(zoo: Path, rescored: Collection[str] = (), *, locked: bool = False) -> dict[str, Any]:
    """Recompute and atomically rewrite ``manifest.json`` (serialized across builders by the zoo lock).

    Refused when the result would re-seal tampering: a malformed result, or finished work whose recorded
    hashes differ from those of the manifest it replaces (but the rescored files of ``rescored`` entries, see
    :func:`_conflicts`).  ``locked``: the caller already holds :func:`zoo_lock` (it is not reentrant).
    """
    zoo = Path(zoo)
    if not locked:
        with zoo_lock(zoo):
            return write_manifest(zoo, rescored, locked=True)
    old = _load_old(zoo)
    manifest = collect(zoo)
    problems = schema_problems(manifest) + (_conflicts(old, manifest, rescored) if old is not None else [])
    if problems:
        raise UserError(f"{zoo}: {problems[0]}; not rewriting {MANIFEST}: run `testbed zoo verify {zoo}`")
    atomic.write_json(zoo / MANIFEST, manifest)
    return manifest


def adoption_problems(zoo: Path) -> list[str]:
    """Finished work a rebuild would adopt that no longer matches the manifest it has (one line each).

    Hashes every file the existing manifest vouches for whose marker (``done.json``, ``data/NAME.json``) is
    still there; work whose marker is gone is simply rebuilt.
    """
    zoo = Path(zoo)
    old = _load_old(zoo)
    if old is None:
        return []
    problems, expected = [], {}
    for name, rec in old["datasets"].items():
        if dataset_record(zoo, name).exists():
            expected[rec["file"]] = rec["sha256"]
            if read_json(dataset_record(zoo, name)) != rec:
                problems.append(f"data/{name}.json: differs from the manifest's record of it")
    for rel, h in (old.get("records") or {}).items():
        if rel != PLAN and os.path.lexists(zoo / rel):
            expected[rel] = h
    for eid, row in _done_rows(old).items():
        if os.path.lexists(entry_dir(zoo, eid) / DONE):
            expected.update(row["files"])
    problems += [p for rel, h in sorted(expected.items()) if (p := file_problem(zoo, rel, h)) is not None]
    return problems


def entry_file_problems(zoo: Path, entry_id: str) -> list[str]:
    """A finished entry's files against the manifest on disk (one line each); [] when the manifest does not list it."""
    old = _load_old(Path(zoo))
    row = _done_rows(old).get(entry_id) if old is not None else None
    if row is None:
        return []
    return [p for rel, h in sorted(row["files"].items()) if (p := file_problem(Path(zoo), rel, h)) is not None]


def _manifest_problems(zoo: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Problems of manifest.json itself (unreadable, malformed, checksum), and its content when readable."""
    path = zoo / MANIFEST
    if not os.path.lexists(path):
        return [f"{MANIFEST}: missing; {zoo} is not a built model zoo (build one with `testbed zoo build`)"], None
    link = path_problem(zoo, MANIFEST)
    if link is not None:
        return [f"{link}; tampered"], None
    try:
        manifest = safeload.load_json(path)
    except UserError as e:
        return [f"{MANIFEST}: not valid JSON ({str(e).removeprefix(str(path) + ': ')}); tampered or corrupt"], None
    except OSError as e:
        return [f"{MANIFEST}: unreadable ({e.strerror}); tampered or corrupt"], None
    shape = schema_problems(manifest)
    if shape:
        return [f"{MANIFEST}: malformed ({p}); tampered or corrupt" for p in shape[:3]], None
    if manifest["checksum"] != checksum(manifest):
        return [f"{MANIFEST}: tampered or corrupt (its checksum does not match its content)"], manifest
    return [], manifest


def load_manifest(zoo: Path) -> dict[str, Any]:
    """The manifest of a zoo to load from: readable, well-formed, current version, checksum intact."""
    zoo = Path(zoo)
    problems, manifest = _manifest_problems(zoo)
    if problems:
        raise UserError(f"zoo {zoo}: {problems[0]}; run `testbed zoo verify {zoo}`")
    if manifest["version"] != VERSION:
        raise UserError(f"zoo {zoo} has a version-{manifest['version']} manifest (an older segbackdoor); refresh it "
                        f"with `testbed zoo build SPEC.toml --out {zoo}` using its spec (nothing is retrained)")
    return manifest


def _expected_files(manifest: dict[str, Any]) -> dict[str, str]:
    expected = {rec["file"]: rec["sha256"] for rec in manifest["datasets"].values()}
    expected.update(manifest.get("records") or {})
    for row in _done_rows(manifest).values():
        expected.update(row["files"])
    return expected


def _unexpected(zoo: Path, expected: dict[str, str], skip: set[str]) -> list[str]:
    """Files and directories the manifest does not account for, hidden ones, claims and symlinks included."""
    out = []
    allowed_dirs = {"data", "entries"} | {os.path.dirname(rel) for rel in expected}
    for root, dirs, files in os.walk(zoo):
        base = os.path.relpath(root, zoo)
        base = "" if base == "." else base + "/"
        for d in sorted(dirs):
            rel = base + d
            if os.path.islink(os.path.join(root, d)):
                out.append(f"{rel}: a symbolic link (a zoo holds only regular files; not followed)")
            elif rel in skip:
                pass
            elif rel not in allowed_dirs:
                out.append(f"{rel}/: a directory not listed in the manifest")
            else:
                continue
            dirs.remove(d)
        for f in sorted(files):
            rel = base + f
            if rel in expected or (rel in (MANIFEST, ".lock", SIGNATURE) and not os.path.islink(os.path.join(root, f))):
                continue
            if f.endswith(".claim"):
                out.append(f"{rel}: a builder's claim (a build is running, or was killed: run `testbed zoo build` again)")
            elif os.path.islink(os.path.join(root, f)):
                out.append(f"{rel}: a symbolic link not listed in the manifest (not followed)")
            else:
                out.append(f"{rel}: not listed in the manifest")
    return out


def verify(zoo: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Recompute every checksum; returns ``(problems, manifest)``, one line per problem.

    Every file the zoo uses is hashed (datasets, their records, plan.json, every entry file); anything else in
    the zoo is reported; a malformed manifest is reported as tampering and a path that would leave the zoo is
    refused without being read.
    """
    zoo = Path(zoo)
    problems, manifest = _manifest_problems(zoo)
    if manifest is None:
        return problems, None
    if manifest["version"] != VERSION:
        problems.append(f"{MANIFEST}: version {manifest['version']} (an older segbackdoor) does not cover plan.json "
                        "and the dataset records; refresh it with `testbed zoo build SPEC.toml --out ZOO`")
    expected = _expected_files(manifest)
    unfinished = set()
    for e in manifest["entries"]:
        if e["status"] != "done":
            unfinished.add(f"entries/{e['id']}")
            problems.append(_unfinished(zoo, e["id"]))
        elif e.get("is_benign"):
            stale = sorted(set(e.get("reference_data") or {}) - set(e.get("reference") or {}))
            if stale:
                problems.append(f"entry {e['id']}: stale: no benign reference scores for {', '.join(stale)} (attacks "
                                "added after it was built); rerun `testbed zoo build` with the spec")
    bad = {rel: p for rel, h in sorted(expected.items()) if (p := file_problem(zoo, rel, h)) is not None}
    problems += list(bad.values())
    problems += _record_problems(zoo, manifest, bad)
    return problems + _unexpected(zoo, expected, unfinished), manifest


def _unfinished(zoo: Path, entry_id: str) -> str:
    """An entry the manifest lists as unfinished, in `zoo ls`'s words for its state now (running, partial,
    pending), not the state the manifest recorded when it was written."""
    if not safe_name(entry_id):
        return f"entry {entry_id!r}: not finished; its id is not a plain name"
    state = entry_status(zoo, entry_id)
    if state == "done":
        return f"entry {entry_id}: finished after the manifest was written; rerun `testbed zoo build` to record it"
    return f"entry {entry_id}: not finished ({state}); rerun `testbed zoo build`"


def _record_problems(zoo: Path, manifest: dict[str, Any], bad: dict[str, str]) -> list[str]:
    """The records that name hashes (done.json, entry.json, config.json, dataset sidecars) against the manifest,
    for the files whose own hashes matched (a mismatch is already reported)."""
    datasets = manifest["datasets"]
    out = integrity.dataset_record_problems(zoo, {n: r for n, r in datasets.items() if f"data/{n}.json" not in bad})
    for row in _done_rows(manifest).values():
        if not any(rel in bad for rel in row["files"]):
            out += integrity.record_problems(zoo, row, datasets)
    return out

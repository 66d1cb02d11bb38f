"""The zoo's layout on disk and its manifest: what was built, from what, with which checksums.

The manifest is *derived* state: it is recomputed from the records builders leave behind (``plan.json``,
dataset sidecars ``data/NAME.json``, per-entry ``done.json``) under the zoo lock, so a builder killed at any
moment never leaves it wrong for long: the next builder to finish anything rewrites it.  File hashes are
computed once, when a file is finished, and recorded in those sidecars; ``verify`` recomputes them all.

Tamper evidence: ``manifest.json`` carries ``checksum``, the sha256 of its own canonical JSON without that
key.  It catches edits and corruption; it is not a signature (someone who edits the manifest can recompute
the checksum), so publish the manifest's sha256 (``testbed zoo verify`` prints it) beside a shared zoo.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from testbed import atomic
from testbed.errors import UserError
from testbed.zoo.claims import DEFAULT_STALE_AFTER, is_stale, read_claim, zoo_lock

FORMAT = "testbed-zoo"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
DONE = "done.json"
ENTRY_DEF = "entry.json"
ZOO_LOG = "zoo_log.jsonl"
REFERENCE = "reference.json"
SCORE_KEYS = ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")


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
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is unreadable or corrupt ({e}); remove it and rebuild, or run `testbed zoo verify`") from None


def load_plan(zoo: Path) -> dict[str, Any]:
    plan = read_json(zoo / PLAN)
    if plan is None:
        raise UserError(f"{zoo} is not a model zoo (no {PLAN}); build one with `testbed zoo build SPEC.toml --out {zoo}`")
    return plan


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


def collect(zoo: Path) -> dict[str, Any]:
    """The manifest as it stands on disk now (not written)."""
    zoo = Path(zoo)
    plan = load_plan(zoo)
    datasets: dict[str, Any] = {}
    for name in sorted({p["data"] for p in plan["entries"].values() if p.get("data")} | {"clean"}
                       | {n for p in plan["entries"].values() for n in (p.get("reference") or {}).values()}):
        rec = read_json(dataset_record(zoo, name))
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
        done = read_json(entry_dir(zoo, eid) / DONE) if row["status"] == "done" else None
        if done is not None:
            row["metrics"] = done.get("metrics")
            if d["attack"] is None:
                row["reference"] = done.get("reference", {})
            files = {f"entries/{eid}/{name}": h for name, h in done["files"].items()}
            files[f"entries/{eid}/{DONE}"] = file_sha256(entry_dir(zoo, eid) / DONE)
            row["files"] = dict(sorted(files.items()))
            row["finished"] = done.get("finished")
            run_config = read_json(entry_dir(zoo, eid) / "config.json") or {}
            row["config"] = run_config.get("train", row["config"])  # every TrainConfig field, defaults included
        entries.append(row)
    n_done = sum(e["status"] == "done" for e in entries)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": n_done == len(entries), "counts": {"entries": len(entries), "done": n_done},
        "data_source": plan.get("data"),
        "datasets": datasets,
        "entries": entries,
    }
    manifest["checksum"] = checksum(manifest)
    return manifest


def write_manifest(zoo: Path) -> dict[str, Any]:
    """Recompute and atomically rewrite ``manifest.json`` (serialized across builders by the zoo lock)."""
    zoo = Path(zoo)
    with zoo_lock(zoo):
        manifest = collect(zoo)
        atomic.write_json(zoo / MANIFEST, manifest)
    return manifest


def load_manifest(zoo: Path, check: bool = True) -> dict[str, Any]:
    path = Path(zoo) / MANIFEST
    if not path.is_file():
        raise UserError(f"{zoo} has no {MANIFEST}; it is not a model zoo (build one with `testbed zoo build`)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the zoo is damaged, rebuild it or restore the manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a testbed zoo manifest; point at a directory made by `testbed zoo build`")
    if check and manifest.get("checksum") != checksum(manifest):
        raise UserError(f"{path} was modified after it was written (checksum mismatch); run `testbed zoo verify {zoo}`")
    return manifest


def verify(zoo: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Recompute every checksum; returns ``(problems, manifest)``, one line per problem."""
    zoo = Path(zoo)
    problems: list[str] = []
    try:
        manifest = load_manifest(zoo, check=False)
    except UserError as e:
        return [str(e)], None
    if manifest.get("checksum") != checksum(manifest):
        problems.append(f"{MANIFEST}: tampered or corrupt (its checksum does not match its content)")
    listed: dict[str, str] = {}
    for name, rec in sorted((manifest.get("datasets") or {}).items()):
        if isinstance(rec, dict) and "file" in rec:
            listed[rec["file"]] = rec.get("sha256", "")
            side = f"data/{name}.json"
            if not (zoo / side).is_file():
                problems.append(f"{side}: missing")
    unfinished = set()
    for e in manifest.get("entries") or []:
        if e.get("status") != "done":
            unfinished.add(f"entries/{e.get('id')}/")
            problems.append(f"entry {e.get('id')}: not finished ({e.get('status')}); rerun `testbed zoo build`")
            continue
        listed.update(e.get("files") or {})
    for rel, expected in sorted(listed.items()):
        path = zoo / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif file_sha256(path) != expected:
            problems.append(f"{rel}: sha256 mismatch (modified or corrupt)")
    sidecars = {f"data/{name}.json" for name in (manifest.get("datasets") or {})}
    for top in ("data", "entries"):
        base = zoo / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            parts = path.relative_to(zoo).parts
            rel = "/".join(parts)
            if not path.is_file() or any(p.startswith(".") for p in parts) or rel.endswith(".claim"):
                continue
            if rel not in listed and rel not in sidecars and not any(rel.startswith(u) for u in unfinished):
                problems.append(f"{rel}: not listed in the manifest")
    return problems, manifest

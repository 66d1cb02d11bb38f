"""Trusting a zoo's files only as far as its manifest vouches for them.

Zoos come from strangers, so nothing a manifest says is used before it is checked: its shape (every key the
loaders read, with its type — a malformed manifest is tampering, not a crash), its paths (only the canonical
layout ``data/NAME.h5``, ``data/NAME.json``, ``entries/ID/FILE``; never ``..``, an absolute path or a
symbolic link, and a path that would leave the zoo is refused without being read), and every file's sha256.

Hashes are cached per process by file identity (device, inode, size, mtime), so loading many entries that
share one dataset hashes it once, and a file that changes afterwards is hashed again.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from testbed.core import safeload
from testbed.core.errors import UserError
from testbed.core.hashing import file_sha256

FORMAT = "testbed-zoo"
VERSION = 2  # 2: sidecars and plan.json hashed ("records"), benign entries' reference datasets in the manifest
MANIFEST = "manifest.json"
PLAN = "plan.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # entry ids and dataset names: one safe path component
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """``file_sha256``, once per process for an unchanged file."""
    st = os.stat(path, follow_symlinks=False)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = file_sha256(path)
    return _CACHE[key]


def safe_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and ".." not in name


def path_problem(zoo: Path, rel: str) -> str | None:
    """Why ``rel`` may not be read as a file of the zoo (None when it is a regular file inside it).

    Refused without reading: absolute paths, ``..``, and a symbolic link anywhere along the path (a zoo built
    by ``testbed zoo build`` holds only regular files and directories).
    """
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        return f"{rel!r}: not a path inside the zoo (refused, not read)"
    here = Path(zoo)
    for i, part in enumerate(parts):
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as e:
            return f"{rel}: unreadable ({e.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return f"{'/'.join(parts[:i + 1])}: a symbolic link (a zoo holds only regular files; not followed)"
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return f"{rel}: missing ({'/'.join(parts[:i + 1])} is not a directory)"
    if not stat.S_ISREG(st.st_mode):
        return f"{rel}: not a regular file"
    if st.st_nlink > 1:
        return (f"{rel}: a hard link ({st.st_nlink} names for one file; the other may lie outside the zoo, where it "
                "can change: copy the zoo without hard links)")
    return None


def file_problem(zoo: Path, rel: str, sha256: str) -> str | None:
    """Why the zoo's file ``rel`` cannot be trusted to be the one hashed as ``sha256`` (None when it can)."""
    problem = path_problem(zoo, rel)
    if problem is None and cached_sha256(Path(zoo) / rel) != sha256:
        problem = f"{rel}: sha256 mismatch (modified or corrupt)"
    return problem


# -- the manifest's shape -------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _str_map(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items())


def _dataset_problems(datasets: Any) -> list[str]:
    if not isinstance(datasets, dict):
        return [f"'datasets' must be an object (name -> record), got {type(datasets).__name__}"]
    out = []
    for name, rec in datasets.items():
        if not safe_name(name):
            out.append(f"dataset name {name!r} is not a plain file name")
        elif not isinstance(rec, dict) or rec.get("file") != f"data/{name}.h5" or not _SHA_RE.match(str(rec.get("sha256"))):
            out.append(f"datasets[{name!r}] must be a record with file = 'data/{name}.h5' and a sha256")
    return out


def _entry_problems(i: int, e: Any, datasets: dict[str, Any], version: int) -> list[str]:
    where = f"entries[{i}]"
    if not isinstance(e, dict):
        return [f"{where} must be an object"]
    eid = e.get("id")
    if not safe_name(eid):
        return [f"{where}.id {eid!r} is not a valid entry id"]
    where = f"entry {eid}"
    types = {"model": str, "attack_id": str, "status": str, "run_dir": str}
    out = [f"{where}: {k!r} must be a {t.__name__}" for k, t in types.items() if not isinstance(e.get(k), t)]
    if not _is_int(e.get("seed")) or not isinstance(e.get("is_benign"), bool):
        out.append(f"{where}: 'seed' must be an integer and 'is_benign' true or false")
    if e.get("run_dir") != f"entries/{eid}":
        out.append(f"{where}: run_dir must be 'entries/{eid}', got {e.get('run_dir')!r}")
    ds = e.get("dataset")
    if ds is not None and (ds not in datasets or e.get("data") != f"data/{ds}.h5"):
        out.append(f"{where}: its dataset {ds!r} must be listed under 'datasets' with data = 'data/{ds}.h5'")
    if e.get("status") != "done" or out:
        return out
    if ds is None:
        out.append(f"{where}: a finished entry names its dataset")
    files = e.get("files")
    if not _str_map(files):
        return out + [f"{where}: 'files' must be an object of path -> sha256"]
    prefix = f"entries/{eid}/"
    for rel, h in files.items():
        if not rel.startswith(prefix) or "/" in rel[len(prefix):] or not _SHA_RE.match(h):
            out.append(f"{where}: files lists {rel!r}, not a file of {prefix} with a sha256")
    for need in ("model.safetensors", "config.json", "done.json"):
        if prefix + need not in files:
            out.append(f"{where}: files lacks {prefix + need}")
    if not isinstance(e.get("metrics") or {}, dict) or not isinstance(e.get("attack") or {}, dict):
        out.append(f"{where}: 'metrics' and 'attack' must be objects (or null)")
    refs = e.get("reference_data", {}) if version >= 2 else {}
    if not _str_map(refs) or any(n not in datasets for n in refs.values()):
        out.append(f"{where}: 'reference_data' must map attack ids to datasets listed under 'datasets'")
    return out


def schema_problems(manifest: Any) -> list[str]:
    """Everything wrong with the manifest's shape and layout (empty: safe to read paths and hashes from it)."""
    if not isinstance(manifest, dict):
        return ["the manifest is not a JSON object"]
    if manifest.get("format") != FORMAT:
        return [f"'format' is {manifest.get('format')!r}, not {FORMAT!r}"]
    version = manifest.get("version")
    if version not in (1, VERSION):
        return [f"'version' {version!r} is not one this segbackdoor reads ({VERSION})"]
    out = _dataset_problems(manifest.get("datasets"))
    datasets = manifest.get("datasets") if isinstance(manifest.get("datasets"), dict) else {}
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        out.append(f"'entries' must be a list, got {type(entries).__name__}")
        entries = []
    ids = [e.get("id") for e in entries if isinstance(e, dict)]
    if len(set(map(str, ids))) != len(ids):
        out.append("an entry id appears twice")
    for i, e in enumerate(entries):
        out += _entry_problems(i, e, datasets, version)
    if version >= 2:
        records = manifest.get("records")
        allowed = {PLAN} | {f"data/{n}.json" for n in datasets}
        if not _str_map(records) or set(records) != allowed:
            out.append("'records' must map plan.json and dataset records data/NAME.json to their sha256")
    if not isinstance(manifest.get("checksum"), str):
        out.append("'checksum' is missing")
    return out


# -- records that name a hash, cross-checked ------------------------------------------------------
def _json_of(zoo: Path, rel: str) -> Any:
    try:
        return safeload.load_json(Path(zoo) / rel, missing_ok=True)
    except (UserError, OSError) as e:
        return e


def _done_problems(zoo: Path, row: dict[str, Any]) -> list[str]:
    """done.json names the sha256 of every file of its entry: the manifest must name the same ones."""
    eid, prefix = row["id"], f"entries/{row['id']}/"
    done = _json_of(zoo, prefix + "done.json")
    if not isinstance(done, dict) or not _str_map(done.get("files")) or done.get("id") != eid:
        return [f"{prefix}done.json: not the record of entry {eid} (malformed or from another entry)"]
    listed = {rel[len(prefix):]: h for rel, h in row["files"].items() if rel != prefix + "done.json"}
    out = []
    for name in sorted(set(listed) | set(done["files"])):
        if listed.get(name) != done["files"].get(name):
            out.append(f"{prefix}{name}: the manifest's sha256 differs from the one done.json recorded when the entry "
                       "was built (swapped or re-sealed)")
    return out


def _definition_problems(zoo: Path, row: dict[str, Any], datasets: dict[str, Any]) -> list[str]:
    """entry.json (the entry's definition) and config.json (the run: model, data) against the manifest's row."""
    prefix, out = f"entries/{row['id']}/", []
    definition = _json_of(zoo, prefix + "entry.json") if prefix + "entry.json" in row["files"] else None
    if definition is not None and (not isinstance(definition, dict) or any(
            definition.get(k) != row.get(k) for k in ("model", "attack_id", "seed", "attack"))):
        out.append(f"{prefix}entry.json: describes another entry than the manifest's {row['id']} (swapped or re-sealed)")
    config = _json_of(zoo, prefix + "config.json")
    if not isinstance(config, dict):
        return out + [f"{prefix}config.json: unreadable or not a run config"]
    trained = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    want = (datasets.get(row.get("dataset")) or {}).get("content_hash")
    if config.get("model") != row["model"]:
        out.append(f"{prefix}config.json: a run of model {str(config.get('model'))[:40]!r}, not the manifest's "
                   f"{row['model']!r} (swapped or re-sealed)")
    if want is not None and trained.get("content_hash") not in (None, want):
        out.append(f"{prefix}config.json: trained on other data than the manifest's data/{row['dataset']}.h5 "
                   "(its content hash differs; swapped or re-sealed)")
    return out


def record_problems(zoo: Path, row: dict[str, Any], datasets: dict[str, Any]) -> list[str]:
    """Everything a finished entry's own records (done.json, entry.json, config.json) say against the manifest.

    The manifest's hashes alone can be rewritten along with its checksum; the records were sealed when the
    entry was built, so a swapped file with a rewritten manifest hash still disagrees with them."""
    return _done_problems(zoo, row) + _definition_problems(zoo, row, datasets)


def dataset_record_problems(zoo: Path, datasets: dict[str, Any]) -> list[str]:
    """Each dataset sidecar ``data/NAME.json`` must say what the manifest says of it (its file's sha256)."""
    out = []
    for name, rec in sorted(datasets.items()):
        side = _json_of(zoo, f"data/{name}.json")
        if not isinstance(side, dict) or side.get("sha256") != rec.get("sha256") or side.get("file") != rec.get("file"):
            out.append(f"data/{name}.json: its record of data/{name}.h5 differs from the manifest's (swapped or re-sealed)")
    return out

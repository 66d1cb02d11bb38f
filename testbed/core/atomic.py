"""Atomic writes: a crash or Ctrl-C never leaves a half-written file under its final name.

Every file is written to a temporary name in the same directory, fsynced, then ``os.replace``d.  The
temporary name carries the writer's host and pid (``.NAME.HOST.PID.XXXX.tmp``), so a later write of the same
name removes what a killed writer left behind (a SIGKILL runs no cleanup) once that writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from testbed.core.errors import UserError
from testbed.core.procs import HOST, pid_alive

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: 0644 under the usual umask
DIR_MODE = 0o777 & ~_UMASK


def safe_name(s: object) -> str:
    """``s`` as a file-name part: runs of anything but letters, digits, ``_``, ``.``, ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("_") or "x"


# errors of a write that found no room: a full disk, a quota, a file size limit (RLIMIT_FSIZE), a dying device
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)


def write_failure(path: Path, e: OSError) -> UserError | None:
    """A failed write as one line naming the final file (not the temporary one), or None for other errors."""
    if e.errno not in WRITE_ERRNOS and not (e.errno is None and "write failed" in str(e)):
        return None
    reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
    return UserError(f"cannot write {path}: {reason}; free disk space (or raise the file size limit) and run again")


def _check_parent(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        raise UserError(f"output directory {parent} does not exist; create it first or choose another --out")
    if not parent.is_dir():
        raise UserError(f"{parent} is not a directory; choose another --out")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_NAME_MAX = 255  # bytes in one file name (Linux, macOS)
_TAIL = 24  # mkstemp's random part, ".tmp" and a caller's suffix


def temp_stem(name: str) -> str:
    """``name`` as it appears in temporary names: itself, or — when ``.NAME.HOST.PID.`` plus a tail would pass
    the file-name limit (a valid 243-character name) — its start plus ``~`` and 12 hex digits of its sha256."""
    room = _NAME_MAX - _TAIL - len(f"..{HOST}.{os.getpid()}.".encode())
    if len(name.encode()) <= room:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    head = name.encode()[: max(0, room - 13)].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def temp_prefix(name: str) -> str:
    """The start of every temporary name this process uses for ``name``: ``.NAME.HOST.PID.`` (NAME shortened by
    :func:`temp_stem` when it is long)."""
    return f".{temp_stem(name)}.{HOST}.{os.getpid()}."


_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.{re.escape(HOST)}\.(?P<pid>\d+)\.(?P<tail>.*)$")


def sweep_stale(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temporary files and directories of dead writers on this host from ``directory``.

    Only names this module (or a zoo claim) makes are touched — ``.NAME.HOST.PID.*`` with ``tmp`` or ``old``
    in the tail — and only when PID is no longer alive.  ``name`` restricts the sweep to one target name.
    Returns what was removed.
    """
    removed: list[Path] = []
    try:
        it = list(os.scandir(directory))
    except OSError:
        return removed
    for e in it:
        m = _TEMP_RE.match(e.name)
        if m is None or (name is not None and m["name"] not in (name, temp_stem(name))):
            continue
        if "tmp" not in m["tail"] and "old" not in m["tail"]:
            continue
        if pid_alive(int(m["pid"])):
            continue
        path = Path(e.path)
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _mkstemp(path: Path, suffix: str, directory: bool) -> Path:
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp" + suffix, dir=path.parent)
        os.close(fd)
        return Path(tmp)
    except OSError as e:
        raise UserError(f"cannot write in {path.parent} ({e.strerror or e}); choose a writable location for {path.name}") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    _check_parent(path)
    sweep_stale(path.parent, path.name)
    tmp_path = _mkstemp(path, suffix, directory=False)
    try:
        yield tmp_path
        # after writing: some writers (safetensors) replace the file with a private 0600 one
        os.chmod(tmp_path, FILE_MODE)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        failure = write_failure(path, e) if isinstance(e, OSError) else None
        if failure is not None:
            raise failure from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole.

    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    _check_parent(path)
    sweep_stale(path.parent, path.name)
    tmp = _mkstemp(path, "", directory=True)
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(temp_prefix(path.name) + "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(path, e) if isinstance(e, OSError) else None
        if failure is not None:
            raise failure from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")

"""Claim files: two builders (processes, machines, Ray tasks) never work on the same entry or dataset.

A claim is a small JSON file (pid, hostname, process start time, wall time) that appears atomically and
exclusively: it is written complete under a private temporary name and then hard-linked onto the claim
path.  ``link`` fails with EEXIST when the claim exists, exactly like ``open(O_CREAT|O_EXCL)``, but a
reader never sees a half-written claim, and it is the variant that is also exclusive on NFS.

A claim goes stale when its holder is gone: on the same host, the pid is not alive (or is a zombie, or was
reused by a younger process); on another host, the holder stopped touching the file (a heartbeat thread
refreshes its mtime every ``stale_after / 4`` seconds) for ``stale_after`` seconds.  Breaking a stale claim
happens under an ``flock`` on ``ZOO/.lock`` after re-reading it, so two builders never both break the same
claim and then both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from testbed.core import safeload
from testbed.core.errors import UserError
from testbed.core.procs import HOST, me, pid_alive

__all__ = ["HOST", "Claim", "DEFAULT_STALE_AFTER", "break_stale", "is_stale", "me", "read_claim", "zoo_lock"]

DEFAULT_STALE_AFTER = 300.0
_MAX_CLAIM = 64 << 10  # a claim is a few hundred bytes


@contextlib.contextmanager
def zoo_lock(zoo_dir: str | os.PathLike) -> Iterator[None]:
    """A short exclusive lock over the whole zoo (breaking stale claims, rewriting the manifest)."""
    path = Path(zoo_dir) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_claim(path: Path) -> dict[str, Any] | None:
    """The claim's record plus ``_mtime`` and ``_raw``; an unreadable, malformed or oversized one reads as ``{}``
    (whose holder is unknown: stale once its mtime is older than ``stale_after``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CLAIM + 1)
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    text = raw.decode("utf-8", "replace")
    try:
        info = safeload.loads(text, str(path)) if len(raw) <= _MAX_CLAIM else {}
    except UserError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    info["_mtime"] = mtime
    info["_raw"] = text
    return info


def is_stale(info: dict[str, Any], stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    pid = info.get("pid")
    if info.get("host") == HOST and isinstance(pid, int) and not isinstance(pid, bool):
        return pid <= 0 or not pid_alive(pid, info.get("proc_start"))  # pid 0 / -1 name no process: never alive
    return time.time() - float(info.get("_mtime", 0)) > stale_after


def break_stale(path: Path, zoo_dir: str | os.PathLike, stale_after: float = DEFAULT_STALE_AFTER,
                info: dict[str, Any] | None = None) -> bool:
    """Remove the claim at ``path`` if its holder is gone; True when this call removed it.

    The claim is re-read under the zoo lock and removed only if unchanged, so a claim is never broken twice
    (two builders breaking the same stale claim and then both taking it).
    """
    info = info if info is not None else read_claim(path)
    if info is None or not is_stale(info, stale_after):
        return False
    with zoo_lock(zoo_dir):
        again = read_claim(path)
        if again is not None and again["_raw"] == info["_raw"] and is_stale(again, stale_after):
            path.unlink(missing_ok=True)
            return True
    return False


class Claim:
    """``with Claim(path) as c: if c.held: ...`` — or ``acquire()`` / ``release()`` by hand."""

    def __init__(self, path: str | os.PathLike, zoo_dir: str | os.PathLike, stale_after: float = DEFAULT_STALE_AFTER):
        self.path = Path(path)
        self.zoo_dir = Path(zoo_dir)
        self.stale_after = float(stale_after)
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder: dict[str, Any] | None = None  # who holds it when we could not take it

    def _link(self) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.{HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(me(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Take the claim if it is free or stale; ``False`` when a live builder holds it."""
        for _ in range(3):
            if self._link():
                self.held = True
                self._start_heartbeat()
                return True
            info = read_claim(self.path)
            if info is None:
                continue  # released between our link and our read: try again
            if not is_stale(info, self.stale_after):
                self.holder = info
                return False
            break_stale(self.path, self.zoo_dir, self.stale_after, info)
        return False

    def _start_heartbeat(self) -> None:
        interval = max(0.5, self.stale_after / 4)

        def beat() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name=f"claim-heartbeat-{self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = read_claim(self.path)
        if info is not None and info.get("pid") == os.getpid() and info.get("host") == HOST:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "Claim":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

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
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

HOST = socket.gethostname()
DEFAULT_STALE_AFTER = 300.0


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _proc_state(pid) in ("Z", "X"):
        return False
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def me() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": HOST, "proc_start": _proc_start(pid), "started": time.time()}


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
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    info["_mtime"] = mtime
    info["_raw"] = text
    return info


def is_stale(info: dict[str, Any], stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    if info.get("host") == HOST and isinstance(info.get("pid"), int):
        return not pid_alive(info["pid"], info.get("proc_start"))
    return time.time() - float(info.get("_mtime", 0)) > stale_after


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
            with zoo_lock(self.zoo_dir):
                again = read_claim(self.path)
                if again is not None and again["_raw"] == info["_raw"] and is_stale(again, self.stale_after):
                    self.path.unlink(missing_ok=True)
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


def sweep_temp(directory: Path) -> None:
    """Remove temporary files left by dead builders on this host (``.NAME.HOST.PID....tmp*``)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        name = p.name
        if not name.startswith(".") or ".tmp" not in name:
            continue
        parts = name.split(f".{HOST}.")
        if len(parts) != 2:
            continue
        pid_text = parts[1].split(".", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                if p.is_dir():
                    import shutil

                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()

"""Is the process that left this file still alive?  One answer for claims, locks and temporary files.

Files that outlive a killed process (a zoo claim, a hidden ``.NAME.HOST.PID.*.tmp`` of an atomic write, a
run-directory lock) carry the writer's host and pid; a later process removes them only when that writer is
gone.  On Linux a pid can be reused, so the kernel's start time of the process is recorded as well.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

HOST = socket.gethostname()


def proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from the original."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True while ``pid`` runs on this host (a zombie, or a younger process under the same pid, is not it).

    0 and negative numbers name no process (``kill`` would signal a process group): never alive."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    fields = _stat_fields(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False
    if start is not None:
        now = proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def me() -> dict[str, Any]:
    """Who is writing: recorded in claims and locks so a later process can tell whether we are gone."""
    pid = os.getpid()
    return {"pid": pid, "host": HOST, "proc_start": proc_start(pid), "started": time.time()}


def describe(info: dict[str, Any]) -> str:
    """``pid 123 on HOST since 2026-01-01 12:00:00`` for an error message naming a holder."""
    when = info.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{since}"

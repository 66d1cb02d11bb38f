"""Where jobs run: this process, N spawned processes, or (in :mod:`testbed.execution.ray_backend`) Ray tasks,
and the scheduler that keeps every slot busy.

The executors know nothing of what a job is: the caller passes the task, a module-level function
``task(target, job_id, device, threads, progress, stale_after) -> result dict`` (a zoo passes
:func:`testbed.zoo.entries.run_entry_safe`, ``target`` being the zoo directory).

Why the executors are this small interface (``slots``, ``start``, ``wait``, ``close``): the scheduler and
`testbed bench` (:mod:`testbed.bench.workers`) drive every backend the same way, so ``--workers`` and
``--backend ray`` mean the same for a zoo build and a bench.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing as mp
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from testbed.core import progress
from testbed.core.device import resolve_device, usable_cores

POLL_S = 1.0
Task = Callable[[str, str, str, "int | None", bool, float], dict[str, Any]]



class Executor:
    """What a backend provides: ``slots`` parallel entries, ``start(id) -> handle``, ``wait(handles, timeout)``."""

    slots = 1

    def start(self, entry_id: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class InlineExecutor(Executor):
    """One worker, this process (the default; the simplest to kill and resume)."""

    def __init__(self, target: Path, device: str, threads: int | None, progress: bool, stale_after: float,
                 task: Task):
        self.args = (str(target), device, threads, progress, stale_after)
        self.task = task
        self.results: dict[int, dict[str, Any]] = {}
        self.n = 0

    def start(self, entry_id: str) -> int:
        self.n += 1
        self.results[self.n] = self.task(self.args[0], entry_id, *self.args[1:])
        return self.n

    def wait(self, handles, timeout):
        return [(h, self.results.pop(h)) for h in handles]


_WORKER: dict[str, Any] = {"busy": False}


def _on_sigint(signum, frame) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) in a worker: a KeyboardInterrupt inside a job, as inline (the
    job keeps its last checkpoint and the interrupt goes back to the builder); nothing while idle (a traceback from
    the pool's queue would reach the terminal and break the pool). One handler for the worker's life, switched by
    a plain flag: no moment at which an idle worker is left with Python's default handler."""
    if _WORKER["busy"]:
        raise KeyboardInterrupt


def _init_worker(index_queue, device: str, threads: int, quiet: bool, interruptible: bool) -> None:
    """Per-process setup: dies with its parent (a killed builder takes its workers along), its own GPU. The worker
    starts with SIGINT blocked (:meth:`ProcessExecutor.start`): a Ctrl-C during its imports waits, and meets the
    handler set here; ``interruptible``: the builder itself takes Ctrl-C (a builder started with SIGINT ignored, as
    a background job, keeps its workers deaf to it too)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL
    except OSError:
        pass

    signal.signal(signal.SIGINT, _on_sigint if interruptible else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    progress.set_quiet(quiet)
    index = index_queue.get()
    torch.set_num_threads(threads)
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{index % torch.cuda.device_count()}"
    _WORKER.update(device=device, threads=threads)


def _pool_task(task: Task, target: str, entry_id: str, stale_after: float) -> dict[str, Any]:
    _WORKER["busy"] = True
    try:
        return task(target, entry_id, _WORKER["device"], _WORKER["threads"], False, stale_after)
    finally:
        _WORKER["busy"] = False


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread while the pool spawns its workers: they inherit the mask, so a Ctrl-C during
    their seconds of imports waits for their handler (:func:`_init_worker`); here it is deferred, not lost. A
    signal mask, unlike a handler, may be set from any thread (`testbed demo` builds its zoo in one)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class ProcessExecutor(Executor):
    """``--workers N``: N spawned processes, each with ``torch.set_num_threads(threads)`` (default: cores // N)."""

    def __init__(self, target: Path, workers: int, device: str, stale_after: float, quiet: bool,
                 threads: int | None = None, task: Task | None = None):
        if device != "auto":
            device = str(resolve_device(device))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        for i in range(workers):
            q.put(i)
        threads = threads or max(1, usable_cores() // workers)
        self.slots = workers
        self.target, self.stale_after, self.task = str(target), stale_after, task  # a zoo or a bench report
        interruptible = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(q, device, int(threads), quiet, interruptible))
        self._cf = cf

    def start(self, entry_id: str):
        if self.task is None:
            raise TypeError("ProcessExecutor needs a task (or a subclass that overrides start)")
        with _sigint_blocked():  # the first submit spawns the workers
            return self.pool.submit(_pool_task, self.task, self.target, entry_id, self.stale_after)

    def wait(self, handles, timeout):
        done, _ = self._cf.wait(handles, timeout=timeout, return_when=self._cf.FIRST_COMPLETED)
        out = []
        for h in done:
            try:
                out.append((h, h.result()))
            except Exception as e:  # noqa: BLE001 - a worker process died
                out.append((h, {"status": "failed", "error": f"worker died: {type(e).__name__}: {e}"}))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def schedule(ids: list[str], executor: Executor, report: Callable[[str, dict[str, Any]], None],
             poll: float = POLL_S) -> None:
    """Run every id to completion; entries a live builder elsewhere holds are retried every ``poll`` seconds."""
    queue: deque[str] = deque(ids)
    retry_at: dict[str, float] = {}
    running: dict[Any, str] = {}
    while queue or running:
        now = time.time()
        for _ in range(len(queue)):
            if len(running) >= executor.slots:
                break
            eid = queue.popleft()
            if retry_at.get(eid, 0.0) > now:
                queue.append(eid)
                continue
            running[executor.start(eid)] = eid
        if running:
            for handle, result in executor.wait(list(running), timeout=poll):
                eid = running.pop(handle)
                result.setdefault("id", eid)
                if result.get("status") == "busy":
                    retry_at[eid] = time.time() + poll
                    queue.append(eid)
                else:
                    report(eid, result)
        elif queue:
            time.sleep(max(0.05, min(retry_at.get(q, 0.0) for q in queue) - time.time()))

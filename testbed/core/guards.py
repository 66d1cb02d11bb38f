"""Guards every writing command uses: never write over an input, never share a run directory.

``check_outputs`` refuses an output that is, or resolves to, one of the command's inputs — through a
symlink, a hard link (same device and inode), ``..`` or simply the same name — or a file of a directory the
command reads (a RUN/ directory: ``predict RUN/ --out RUN/model.safetensors`` would destroy the model it is
using), or a directory output that holds an input.  ``RunLock`` keeps two trainers out of one RUN/.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from testbed.core.errors import UserError
from testbed.core.procs import describe, me

PathLike = str | os.PathLike
Named = Mapping[str, PathLike | None] | Iterable[tuple[str, PathLike | None]]


def _items(named: Named) -> list[tuple[str, Path]]:
    pairs = named.items() if isinstance(named, Mapping) else named
    return [(label, Path(p)) for label, p in pairs if p is not None]


def _real(path: Path) -> Path:
    """The absolute path with symlinks and ``..`` resolved, also when its last parts do not exist yet."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _files_of(directory: Path) -> Iterator[Path]:
    """Every regular file under ``directory`` (symlinked directories are not followed)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            yield Path(root) / name


def _how(out: Path, inp: Path) -> str:
    if os.path.islink(out) or os.path.islink(inp):
        return "through a symbolic link"
    if _real(out) != _real(inp):
        return "a hard link to it"
    if str(Path(out).absolute()) != str(Path(inp).absolute()):
        return "the same file by another path"
    return "the same file"


def _inside(path: Path, directory: Path) -> bool:
    return _real(path).is_relative_to(_real(directory))


def check_outputs(outputs: Named, inputs: Named) -> None:
    """Refuse (``UserError``) any output that would overwrite or replace an input.

    ``outputs`` and ``inputs`` map a label used in the message (a flag such as ``"--out"`` or a parameter name)
    to a path; ``None`` paths are skipped.  An input that is a directory stands for every file in it (a run
    directory: its weights, config, metrics), so an output may be a *new* file in it but not an existing one.
    An output that is an existing directory (a report or PNG folder replaced as a whole) may hold no input.
    An output that does not exist yet cannot be an input (a dangling symlink is replaced, not followed).
    """
    ins = _items(inputs)
    for olabel, out in _items(outputs):
        so = _stat(out)
        if so is None:
            continue
        for ilabel, inp in ins:
            si = _stat(inp)
            if si is not None and (so.st_dev, so.st_ino) == (si.st_dev, si.st_ino):
                raise UserError(f"{olabel} {out} is {ilabel} {inp} ({_how(out, inp)}); writing it would destroy "
                                f"the input: choose another {olabel}")
            if inp.is_dir():
                for f in _files_of(inp):
                    sf = _stat(f)
                    if sf is not None and (so.st_dev, so.st_ino) == (sf.st_dev, sf.st_ino):
                        raise UserError(f"{olabel} {out} is {f}, a file of {ilabel} {inp} ({_how(out, f)}); writing "
                                        f"it would destroy what the command reads: choose another {olabel}")
            if out.is_dir() and _inside(inp, out):
                raise UserError(f"{olabel} {out} holds {ilabel} {inp}; writing {olabel} would replace the input: "
                                f"choose another {olabel}")


class RunLock:
    """An exclusive lock on a run directory (``RUN/.train.lock``) for as long as one trainer uses it.

    ``flock`` is released by the kernel when its holder dies, so a killed trainer never leaves the directory
    locked; the file records who holds it (pid, host, start time) for the error message of a second trainer,
    and is removed on release.
    """

    NAME = ".train.lock"

    def __init__(self, run_dir: PathLike, label: str = "--out"):
        self.path = Path(run_dir) / self.NAME
        self.label = label
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.label} {self.path.parent} is in use by another training run "
                                f"({self._holder()}); wait for it to finish or choose another {self.label}") from None
            except BaseException:
                os.close(fd)
                raise
            # the holder before us may have removed the file between our open and our flock: retry on the new one
            st, now = os.fstat(fd), _stat(self.path)
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me()).encode(), 0)
                self._fd = fd
                return self
            os.close(fd)
        raise UserError(f"{self.label} {self.path.parent}: could not lock it (other trainers keep taking it); try again")

    def _holder(self) -> str:
        try:
            return describe(json.loads(self.path.read_text()))
        except (OSError, ValueError, AttributeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""The `testbed` command line.  Each subcommand lives in ``testbed/commands/<name>.py`` with a
``register(subparsers)`` function; this module only dispatches and turns user errors into exit code 2.

What a user can cause — a bad flag, a bad file, an unwritable or full disk — ends in one line on stderr and
exit code 2, never a traceback: argparse's multi-line usage is folded into one line with a ``--help`` hint,
and an ``OSError`` that escapes a command is reported by its path and reason.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import NoReturn

from testbed import __version__
from testbed.core import progress
from testbed.core.errors import UserError

COMMANDS = ("data", "poison", "train", "predict", "score", "demo", "defend", "bench", "defenses", "zoo", "compare")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (then where to read the usage), exit code 2."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="testbed",
        description="Backdoor attacks (BadNets, FGBA) and defenses on semantic segmentation: "
        "make data, poison it, train, score, defend, benchmark, build model zoos.",
        epilog="Run `testbed COMMAND --help` for a command's options. Start with `testbed demo`.",
    )
    parser.add_argument("--version", action="version", version=f"segbackdoor {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = f"testbed.commands.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def os_error_message(e: OSError) -> str:
    """One line for an OS error: the path, the reason, and what to check."""
    reason = " ".join(str(e.strerror or e).split())
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{reason}; check the path, its permissions and the free disk space"


def _stdout_gone() -> bool:
    """Whether standard output's reader has left (a flush fails with a broken pipe)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def out_of_memory(e: BaseException) -> str | None:
    """One line for running out of memory (host: ``MemoryError``; a GPU: torch's out-of-memory error), else None."""
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError):
        return "out of memory; use smaller --batch-size or images, or a machine with more memory"
    if isinstance(e, RuntimeError) and ("out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError"):
        return f"out of memory on the device ({text[:120]}); use a smaller --batch-size or another --device"
    return None


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C at any moment, also while the commands (and torch) are imported
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130
    except RecursionError:  # a reader without its own bound met deeply nested input
        print("testbed: error: input nested too deeply to read; refusing it as damaged or hostile", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        line = out_of_memory(e)
        if line is None:
            raise
        print(f"testbed: error: {line}", file=sys.stderr)
        return 2
    if args.quiet:
        progress.set_quiet(True)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left is noticed here, not in the interpreter's final flush
        return code
    except UserError as e:
        print(f"testbed: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if not _stdout_gone():  # another pipe (a worker, a socket): an OS error like any other
            print(f"testbed: error: {os_error_message(e)}", file=sys.stderr)
            return 2
        # `testbed data info d.h5 | head`: the reader left; stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 128 + 13  # SIGPIPE's conventional status
    except OSError as e:
        print(f"testbed: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130
    except RecursionError:  # a reader without its own bound met deeply nested input
        print("testbed: error: input nested too deeply to read; refusing it as damaged or hostile", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        line = out_of_memory(e)
        if line is None:
            raise
        print(f"testbed: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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
import select
import stat
import sys
from typing import NoReturn

from testbed import __version__
from testbed.core import progress
from testbed.core.errors import UserError, did_you_mean

COMMANDS = ("data", "poison", "train", "predict", "score", "demo", "defend", "bench", "defenses", "zoo", "compare")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (then where to read the usage), exit code 2.

    No silent unique-prefix matching (``--min-as`` is not ``--min-asr``); a misspelled option gets "did you mean",
    named by the (sub)command it was given to, even when argparse would first complain of a required one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        ns, extras = super().parse_known_args(args, namespace)
        if extras and getattr(self, "_strict", False):  # a subcommand's unknown option is its own error
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def _unknown_option(self) -> str | None:
        """The first option of this parser's arguments that it does not know, with "did you mean"."""
        known = list(self._option_string_actions)
        subcommands = {c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices}
        for token in self._argv:
            if token == "--" or subcommands and not token.startswith("-"):  # a subcommand's options are its own
                break
            name = token.split("=", 1)[0]
            if name.startswith("-") and len(name) > 1 and not name[1:2].isdigit() and name not in known:
                return f"unrecognized option {name}{did_you_mean(name, known)}"
        return None

    def error(self, message: str) -> NoReturn:
        line = self._unknown_option() or " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line}; see `{self.prog} --help`\n")


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, at any depth (`zoo build`, `data import ...`)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):
                out += [p, *_subcommand_parsers(p)]
    return out


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
    for p in _subcommand_parsers(parser):  # -q anywhere, before or after the subcommand
        p._strict = True
        if "-q" not in p._option_string_actions:
            p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
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
    try:  # the failed write dropped its buffer, so the flush passed: ask the pipe itself (POLLERR: no reader)
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll on this platform
        return False


AGAIN = "; run the same command again to resume"
RESUMABLE = {"bench": f"{AGAIN} (finished pairs are kept)", "defend": f"{AGAIN} (finished pairs are kept)",
             "zoo build": f"{AGAIN} (finished entries and epochs are kept)",
             "train": "; add --resume to the same command to go on from the last finished epoch"}


def resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted command's user does next, for the commands that can resume."""
    command = getattr(args, "command", "") or ""
    if command == "zoo":
        command = f"zoo {getattr(args, 'zoo_command', '')}"
    if command == "train" and getattr(args, "resume", False):
        return "; run the same command again to resume"
    return RESUMABLE.get(command, "")


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
    except (KeyboardInterrupt, MemoryError, RuntimeError) as e:
        return _last_resort(e, None)
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
    except (KeyboardInterrupt, MemoryError, RuntimeError) as e:
        return _last_resort(e, args)


def _last_resort(e: BaseException, args: argparse.Namespace | None) -> int:
    """Ctrl-C (130, with how to resume), input nested too deep or out of memory (one line, 2); else re-raised."""
    if isinstance(e, KeyboardInterrupt):  # notes: what the interrupted work kept (the training loop's checkpoint)
        kept = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))
        print(f"testbed: interrupted{kept}{resume_hint(args) if args is not None else ''}", file=sys.stderr)
        return 130
    if isinstance(e, RecursionError):  # a reader without its own bound met deeply nested input
        print("testbed: error: input nested too deeply to read; refusing it as damaged or hostile", file=sys.stderr)
        return 2
    line = out_of_memory(e)
    if line is None:
        raise e
    print(f"testbed: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `testbed` command line.  Each subcommand lives in ``testbed/commands/<name>.py`` with a
``register(subparsers)`` function; this module only dispatches and turns user errors into exit code 2."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from testbed import __version__, progress
from testbed.errors import UserError

COMMANDS = ("data", "poison", "train", "predict", "score", "demo", "defend", "bench", "zoo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        progress.set_quiet(True)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

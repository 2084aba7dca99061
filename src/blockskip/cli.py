"""The `blockskip` console entry point: one program, one subcommand per step.

Each command lives in its own module, which exposes `register(subparsers)`; that function adds
one or more subparsers and sets `func` to a callable taking the parsed args and returning an exit
code. Commands whose module is not part of this build are listed as unavailable, never faked.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from blockskip import __version__
from blockskip.errors import BlockskipError

# (module, commands it registers): the order is the order of `blockskip --help`.
COMMAND_MODULES = [
    ("blockskip.demo", ["demo"]),
    ("blockskip.host.profile", ["profile"]),
    ("blockskip.host.plan", ["plan"]),
    ("blockskip.host.cache", ["cache"]),
    ("blockskip.host.bundle", ["bundle", "verify", "keygen"]),
    ("blockskip.host.deploy", ["deploy"]),
    ("blockskip.edge.train", ["train"]),
    ("blockskip.edge.export", ["export"]),
    ("blockskip.edge.generate", ["generate"]),
    ("blockskip.edge.agent", ["agent"]),
    ("blockskip.edge.capture", ["capture"]),
]


def _not_available(name: str, reason: str):
    def run(args: argparse.Namespace) -> int:
        print(f"error: `blockskip {name}` is not available in this build: {reason}", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockskip",
        description="DiT-BlockSkip: prepare on a host, personalize and generate on an edge board.",
    )
    parser.add_argument("--version", action="version", version=f"blockskip {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, names in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            for name in names:
                sub = subparsers.add_parser(name, help="(not available in this build)")
                sub.set_defaults(func=_not_available(name, f"module {module_name} is missing"))
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BlockskipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

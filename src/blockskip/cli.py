"""The `blockskip` console entry point: one program, one subcommand per step.

Each command lives in its own module, which exposes `register(subparsers)`; that function adds
one or more subparsers and sets `func` to a callable taking the parsed args and returning an exit
code. Commands whose module is not part of this build are listed as unavailable, never faked.

Start-up stays fast: the command modules import torch, diffusers and peft (seconds), so the
top-level parser is built from the static table COMMANDS below and only the module of the command
on the command line is imported. `blockskip --help`, `--version` and a mistyped command import
none of them; `blockskip COMMAND --help` imports that command's module and shows its full help.
tests/test_cli.py checks that the table says what the modules' own `register` says.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable

from blockskip import __version__
from blockskip.errors import BlockskipError

# (command, module that registers it, its one-line help): the order is the order of `--help`.
COMMANDS = [
    ("demo", "blockskip.demo", "run the end-to-end demo on the built-in crop-leaf model (CPU, offline)"),
    ("profile", "blockskip.host.profile", "measure the cross-attention masking sensitivity profile of a base model"),
    ("plan", "blockskip.host.plan", "turn a sensitivity profile and a skip budget into a skip plan"),
    ("cache", "blockskip.host.cache", "precompute the kept blocks' features with the frozen full model (host)"),
    ("bundle", "blockskip.host.seal", "pack a staging folder into a checksummed (optionally signed) bundle"),
    ("keygen", "blockskip.host.seal", "create an ed25519 key pair for signing bundles"),
    ("prepare", "blockskip.host.prepare", "one subject from photos to a signed bundle: cache, then bundle (host)"),
    ("verify", "blockskip.verify", "check a bundle's checksums (and signature) before using it"),
    ("deploy", "blockskip.host.deploy",
     "copy a bundle (and the agent config) to a board over SSH and verify it there"),
    ("train", "blockskip.edge.train", "train LoRA on the kept blocks from a bundle (edge)"),
    ("export", "blockskip.edge.export",
     "export the transformer (adapter merged) to ONNX; build/refit a TensorRT engine"),
    ("generate", "blockskip.edge.dataset", "generate images offline (TensorRT / ONNX Runtime / torch)"),
    ("agent", "blockskip.edge.agent", "run the edge MQTT agent (commands, progress, captures, results)"),
    ("capture", "blockskip.edge.capture",
     "camera side: publish a folder of images to a device's agent and wait for acks"),
    ("host", "blockskip.host.serve",
     "host worker: take personalize jobs over MQTT (photos -> bundle -> board -> images)"),
    ("fleet", "blockskip.host.fleet",
     "operator: list boards and jobs, submit and follow personalize jobs, fetch their images"),
]
MODULE_OF = {name: module for name, module, _ in COMMANDS}


def _not_available(name: str, reason: str):
    def run(args: argparse.Namespace) -> int:
        print(f"error: `blockskip {name}` is not available in this build: {reason}", file=sys.stderr)
        return 2

    return run


def chosen_command(argv: list[str]) -> str | None:
    """The command named on the command line: the first word that is not an option (the top-level
    options take no value), or None."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in MODULE_OF else None
    return None


def build_parser(load: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The parser; the commands named in `load` come from their modules' `register`, every other
    command is a placeholder with its help line from COMMANDS (enough for `--help`)."""
    parser = argparse.ArgumentParser(
        prog="blockskip",
        description="DiT-BlockSkip: prepare on a host, personalize and generate on an edge board.",
        epilog="`blockskip COMMAND --help` documents each command.",
    )
    parser.add_argument("--version", action="version", version=f"blockskip {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {MODULE_OF[name] for name in load}
    registered = set()
    for name, module_name, help_line in COMMANDS:
        if module_name not in modules:
            subparsers.add_parser(name, help=help_line)
            continue
        if module_name in registered:
            continue  # one module registers all of its commands at once (bundle, verify, keygen)
        registered.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            for other, other_module, other_help in COMMANDS:
                if other_module == module_name:
                    sub = subparsers.add_parser(other, help=f"(not available in this build) {other_help}")
                    sub.set_defaults(func=_not_available(other, f"module {module_name} is missing"))
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    parser = build_parser(load=[command] if command else [])
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

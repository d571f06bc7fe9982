"""Entry point that dispatches ``python -m inferencemesh COMMAND`` to the command modules.

Each command module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (called with the parsed namespace, returning an exit code) as a parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from inferencemesh import __version__

# Module names under inferencemesh.cli, in the order ``--help`` lists them.
COMMAND_MODULES: list[str] = ["demo", "bootstrap", "worker", "client", "status", "prepare"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inferencemesh",
        description="Decentralized LLM inference: split a model's blocks across a swarm of workers.",
    )
    parser.add_argument("--version", action="version", version=f"inferencemesh {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"inferencemesh.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)

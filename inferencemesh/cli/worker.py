"""`python -m inferencemesh worker`: serve a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from inferencemesh.cli.logs import setup_logging
from inferencemesh.cli.settings import SettingsError, add_settings_arguments, resolve_settings
from inferencemesh.server.config import WorkerConfig

REQUIRED = {"model_path", "layers"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve a span of blocks to the swarm",
        description="Load blocks A-B of a model, join the DHT, announce them and serve inference "
        "sessions until SIGINT/SIGTERM. Settings also come from --config FILE.toml and "
        "INFERENCEMESH_* environment variables; flags win.",
    )
    add_settings_arguments(parser, WorkerConfig, REQUIRED)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve_settings(WorkerConfig, args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [name for name in sorted(REQUIRED) if not getattr(config, name)]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        print(f"error: {flags} required (or set them in --config / INFERENCEMESH_*)", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    from inferencemesh.server.worker import Worker  # heavy imports only once the arguments are valid

    try:
        asyncio.run(Worker(config).run_until_signalled())
    except Exception as exc:  # start-up failures: say what failed and exit non-zero
        logging.getLogger("inferencemesh.worker").error("worker failed: %s", exc, exc_info=True)
        return 1
    return 0

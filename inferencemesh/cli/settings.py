"""Options that come from flags, environment variables and a TOML file, in that order of precedence.

A command describes its settings once, as a dataclass whose fields carry a default and a help text
(see inferencemesh.server.config). This module turns the fields into flags, reads
INFERENCEMESH_<FIELD> variables and a ``--config`` TOML file, and merges the three over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "INFERENCEMESH_"


class SettingsError(ValueError):
    """A setting from the file or the environment has the wrong name or type."""


def add_settings_arguments(parser: argparse.ArgumentParser, settings_type: type, required: set[str]) -> None:
    """Adds ``--config`` and one flag per field; flags default to None so that unset ones can be told."""
    parser.add_argument("--config", metavar="PATH", help="TOML file with any of the settings below")
    for f in dataclasses.fields(settings_type):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r}; env {ENV_PREFIX}{f.name.upper()})"
        if f.name in required:
            help_text = f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()})"
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "metavar": f.name.upper()}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, list):
            kwargs["action"] = "append"
        else:
            kwargs["type"] = type(default)
        parser.add_argument(flag, dest=f.name, **kwargs)


def _coerce(name: str, value: Any, default: Any, source: str) -> Any:
    if isinstance(default, list):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(value, str) and not isinstance(default, str):
        try:
            return type(default)(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return type(default)(value)
    raise SettingsError(f"{source}: {name} = {value!r} is not a valid {type(default).__name__}")


def resolve_settings(
    settings_type: type[T], args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> T:
    """Defaults < TOML file (--config) < INFERENCEMESH_* environment < command-line flags."""
    fields = {f.name: f for f in dataclasses.fields(settings_type)}  # type: ignore[arg-type]
    defaults = settings_type()
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {path}: {exc}") from exc
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise SettingsError(f"{path}: unknown setting {key!r} (see --help)")
            values[name] = _coerce(name, value, getattr(defaults, name), str(path))
    for name in fields:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = _coerce(name, env_value, getattr(defaults, name), ENV_PREFIX + name.upper())
    for name in fields:
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            values[name] = flag_value
    return dataclasses.replace(defaults, **values)

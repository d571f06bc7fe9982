"""Worker settings: defaults < TOML file < INFERENCEMESH_* environment < command-line flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from inferencemesh.cli.settings import SettingsError, add_settings_arguments, resolve_settings
from inferencemesh.server.config import WorkerConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, WorkerConfig, {"model_path", "layers"})
    return parser.parse_args(list(argv))


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('layers = "1-10"\nport = 4000\ncache-bytes = 1000\nbootstrap = ["a:1", "b:2"]\n')
    env = {"INFERENCEMESH_PORT": "5000", "INFERENCEMESH_DTYPE": "bfloat16"}
    settings = resolve_settings(WorkerConfig, parse("--config", str(config), "--dtype", "float16"), env)
    assert settings.layers == "1-10"  # file
    assert settings.cache_bytes == 1000  # file
    assert settings.bootstrap == ["a:1", "b:2"]  # file, list
    assert settings.port == 5000  # env over file
    assert settings.dtype == "float16"  # flag over env
    assert settings.max_batch == WorkerConfig().max_batch  # default


def test_repeated_bootstrap_flags_and_comma_separated_env() -> None:
    flags = resolve_settings(WorkerConfig, parse("--bootstrap", "x:1", "--bootstrap", "y:2"), {})
    assert flags.bootstrap == ["x:1", "y:2"]
    env = resolve_settings(WorkerConfig, parse(), {"INFERENCEMESH_BOOTSTRAP": "x:1, y:2"})
    assert env.bootstrap == ["x:1", "y:2"]


def test_bad_settings_name_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        resolve_settings(WorkerConfig, parse("--config", str(config)), {})
    with pytest.raises(SettingsError, match="INFERENCEMESH_PORT"):
        resolve_settings(WorkerConfig, parse(), {"INFERENCEMESH_PORT": "many"})
    with pytest.raises(SystemExit):
        parse("--dtype", "int4")

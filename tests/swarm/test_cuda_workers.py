"""Workers on a CUDA GPU (skipped without one): bootstrap + 3 workers with --device cuda + a client.

A swarm computes the same spans as one process: a worker runs our span code on its slice of the
model, so the swarm's tokens must equal those of the same spans chained in one process on the same GPU
(with the client's head on the CPU, as the client holds it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.compute.dtypes import DTYPES
from inferencemesh.compute.generation import LocalModel
from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.span import Span
from inferencemesh.compute.tokenizer import Tokenizer
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS, THREE_SPANS, start_swarm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def gpu_swarm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path
) -> Iterator[tuple[str, LocalSwarm]]:
    dtype = request.param
    swarm = start_swarm(
        tmp_path_factory.mktemp(f"gpu-{dtype}"),
        smollm2_dir,
        THREE_SPANS,
        "--device",
        "cuda",
        "--dtype",
        dtype,
    )
    yield dtype, swarm
    swarm.stop()


def one_process(model_dir: Path, dtype: torch.dtype) -> LocalModel:
    """The swarm's computation in one process: the spans on the GPU, the head on the CPU."""
    spans = [
        Span.load(model_dir, start, start + 10, dtype=dtype, device="cuda", progress=False)
        for start in (0, 10, 20)
    ]
    head = ClientHead.load(model_dir, dtype=dtype)
    return LocalModel(head, spans, Tokenizer.load(model_dir), cache_budget_bytes=1 << 30)


def test_gpu_workers_generate_what_the_same_spans_generate_in_one_process(
    gpu_swarm: tuple[str, LocalSwarm], smollm2_dir: Path
) -> None:
    dtype, swarm = gpu_swarm
    local = one_process(smollm2_dir, DTYPES[dtype])
    with DistributedModelForCausalLM.from_pretrained(
        smollm2_dir, [swarm.bootstrap], dtype=DTYPES[dtype]
    ) as client:
        for prompt in PROMPTS:
            ids = client.encode_prompt(prompt, chat=True)
            expected = local.generate(ids, max_new_tokens=MAX_NEW_TOKENS).token_ids
            result = client.generate(ids, max_new_tokens=MAX_NEW_TOKENS)
            assert result.token_ids == expected, (dtype, prompt)
            assert [hop["layers"] for hop in result.route] == list(THREE_SPANS)


# float32 only: bf16 rounds a batch's rows differently than one row, enough to flip near-ties.
@pytest.mark.parametrize("gpu_swarm", ["float32"], indirect=True)
def test_gpu_workers_batch_concurrent_sessions_exactly(
    gpu_swarm: tuple[str, LocalSwarm], smollm2_dir: Path
) -> None:
    _, swarm = gpu_swarm
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.bootstrap]) as client:
        batch = client.generate_batch(PROMPTS, chat=True, max_new_tokens=MAX_NEW_TOKENS)
        alone = [client.generate(prompt, chat=True, max_new_tokens=MAX_NEW_TOKENS) for prompt in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


@pytest.mark.parametrize("gpu_swarm", ["float32"], indirect=True)
def test_a_gpu_client_head_gives_the_cpu_heads_tokens(
    gpu_swarm: tuple[str, LocalSwarm], smollm2_dir: Path
) -> None:
    _, swarm = gpu_swarm
    results = []
    for device in ("cpu", "cuda"):
        with DistributedModelForCausalLM.from_pretrained(
            smollm2_dir, [swarm.bootstrap], device=device
        ) as client:
            results.append(client.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_NEW_TOKENS).token_ids)
    assert results[0] == results[1]

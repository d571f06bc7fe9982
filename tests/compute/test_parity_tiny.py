"""Tiny random models of each supported family against transformers: prefill and decode logits."""

from __future__ import annotations

import pytest
import torch
from compute_models import TINY_VARIANTS

from inferencemesh.compute.generation import LocalModel
from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.span import Span
from inferencemesh.compute.tokenizer import Tokenizer

PROMPT = [5, 17, 99, 3, 250, 42, 7, 128, 64]
DECODE = [11, 300, 2, 77, 5, 19]


def reference_logits(model_dir, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """transformers' logits: the prefill's last position, then one per decoded token."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        logits, cache = [out.logits[0, -1]], out.past_key_values
        for token in continuation:
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = out.past_key_values
    return logits


def engine_for(model_dir) -> LocalModel:
    head = ClientHead.load(model_dir)
    spans = [Span.load(model_dir, 0, 1, progress=False), Span.load(model_dir, 1, 4, progress=False)]
    return LocalModel(head, spans, cache_budget_bytes=1 << 24)  # the tiny models have no tokenizer


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_two_spans_match_transformers(tiny_model_dir, variant: str) -> None:
    model_dir = tiny_model_dir(variant)
    expected = reference_logits(model_dir, PROMPT, DECODE)
    engine = engine_for(model_dir)
    session = engine.new_session(64)
    actual = [session.step(PROMPT)] + [session.step([token]) for token in DECODE]
    for step, (ours, theirs) in enumerate(zip(actual, expected, strict=True)):
        assert (ours - theirs).abs().max().item() < 1e-4, f"{variant}: step {step} differs"
    # The references differ per step; a forward that ignored its inputs could not pass this.
    assert (expected[0] - expected[1]).abs().max().item() > 1e-2


def test_tokenizerless_dir_is_reported(tiny_model_dir) -> None:
    from inferencemesh.compute.errors import InvalidModelDirectory

    with pytest.raises(InvalidModelDirectory, match=r"tokenizer\.json"):
        Tokenizer.load(tiny_model_dir("llama"))

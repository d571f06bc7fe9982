"""Model definitions shared by the compute tests (a module, since conftest cannot be imported)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from inferencemesh.compute.generation import LocalModel

SMOLLM2_SPLITS = [(0, 10), (10, 20), (20, 30)]  # blocks 1-10, 11-20, 21-30
TOKENS = [5, 17, 99, 3, 250, 42, 7, 128, 64, 11, 300, 2]  # token ids for the tiny models

TINY_BASE: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    # Larger than the default 0.02 so that every block changes the hidden states noticeably and a
    # wrong block would show in the logits.
    initializer_range=0.15,
)

TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3-rope-biases": (
        "LlamaConfig",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": 128, "head_dim": 24}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
}


def chat_ids(local: LocalModel, prompt: str) -> list[int]:
    return local.tokenizer.encode_chat([{"role": "user", "content": prompt}])


def teacher_forced_logits(
    references: list[Any], local: LocalModel, prompt: str, steps: int
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Our logits and every reference's (float64 for comparing), after the prompt and after each of
    ``steps`` decode steps; every model is fed the first reference's greedy tokens."""
    prompt_ids = chat_ids(local, prompt)
    session = local.new_session(len(prompt_ids) + steps + 1)
    caches: list[Any] = [None] * len(references)
    tokens = prompt_ids
    try:
        with torch.inference_mode():
            for _ in range(steps + 1):
                # The cache goes by position: transformers 5.x renamed the argument (past_key_values
                # -> cache) but kept its place.
                outs = [
                    ref(torch.tensor([tokens], device=ref.device), None, None, c, use_cache=True)
                    for ref, c in zip(references, caches, strict=True)
                ]
                caches = [out.past_key_values for out in outs]
                theirs = [out.logits[0, -1].double().cpu() for out in outs]
                yield session.step(tokens).double().cpu(), theirs
                tokens = [int(theirs[0].argmax())]
    finally:
        session.close()


def worst_errors(
    exact: Any, reference: Any, local: LocalModel, prompt: str, steps: int
) -> tuple[float, float]:
    """How far our logits and ``reference``'s are, at worst over the prompt and ``steps`` teacher-forced
    steps, from ``exact``'s (a float64 run of the same model: ~1e-16 rounding, the closest thing to
    exact at hand)."""
    ours_off = theirs_off = 0.0
    for ours, (exact_logits, theirs) in teacher_forced_logits([exact, reference], local, prompt, steps):
        ours_off = max(ours_off, (ours - exact_logits).abs().max().item())
        theirs_off = max(theirs_off, (theirs - exact_logits).abs().max().item())
    return ours_off, theirs_off


def assert_same_states(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal to float32 rounding: batches and single rows, decodes and prefills take different
    kernels (summation orders), which differ by units in the last place (~1e-6 of values up to ~10)."""
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

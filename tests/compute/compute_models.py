"""Model definitions shared by the compute tests (a module, since conftest cannot be imported)."""

from __future__ import annotations

from typing import Any

SMOLLM2_SPLITS = [(0, 10), (10, 20), (20, 30)]  # blocks 1-10, 11-20, 21-30

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

"""config.json parsing: supported families, transformers 4.x and 5.x formats, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.errors import InvalidModelDirectory, UnsupportedModel

LLAMA_31: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "eos_token_id": [128001, 128008, 128009],
}


def test_smollm2_config(smollm2_dir: Path) -> None:
    config = ModelConfig.load(smollm2_dir)
    assert (config.family, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.intermediate_size == 1536 and config.vocab_size == 49152
    assert config.rope.theta == 100000.0 and config.rope.rope_type == "default"
    assert config.tie_word_embeddings and not config.qkv_bias
    assert config.max_context == 8192 and config.eos_token_ids == (2,)


def test_llama31_transformers4_format_with_llama3_rope() -> None:
    config = ModelConfig.from_dict(LLAMA_31)
    assert config.rope.rope_type == "llama3" and config.rope.factor == 8.0
    assert config.rope.original_max_position_embeddings == 8192 and config.rope.theta == 500000.0
    assert config.head_dim == 128 and config.num_kv_heads == 8
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert not config.tie_word_embeddings


def test_qwen2_has_qkv_bias_but_no_o_bias() -> None:
    raw = {**LLAMA_31, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": None}
    config = ModelConfig.from_dict(raw)
    assert config.qkv_bias and not config.o_bias and not config.mlp_bias


def test_sliding_window_limits_the_context() -> None:
    raw = {**LLAMA_31, "architectures": ["MistralForCausalLM"], "rope_scaling": None, "sliding_window": 4096}
    assert ModelConfig.from_dict(raw).max_context == 4096
    assert ModelConfig.from_dict({**raw, "sliding_window": None}).max_context == 131072


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"architectures": []}, "architectures"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_options_are_named(change: dict[str, Any], option: str) -> None:
    with pytest.raises(UnsupportedModel) as error:
        ModelConfig.from_dict({**LLAMA_31, **change})
    assert error.value.option == option
    assert option in str(error.value)


def test_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelDirectory, match="no config"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelDirectory, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_31, "hidden_size": "big"}))
    with pytest.raises(InvalidModelDirectory, match="hidden_size"):
        ModelConfig.load(tmp_path)

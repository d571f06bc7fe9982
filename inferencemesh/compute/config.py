"""Parsing of Hugging Face ``config.json`` for the Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

Everything the block math depends on is captured in :class:`ModelConfig`. Any option that would change
the math in a way this engine does not implement raises :class:`UnsupportedModel` naming the option,
so a model is either run exactly or refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferencemesh.compute.errors import InvalidModelDirectory, UnsupportedModel

# HF architecture name -> the family whose block layout it uses.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``rope_type`` is one of :data:`SUPPORTED_ROPE_TYPES`."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: frequency band limits and the context length the band limits refer to.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts of one model; blocks are numbered 0..num_layers-1."""

    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Longest context a session may use; set when the model applies sliding-window attention, which
    # equals full attention as long as no session grows past the window.
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """Longest sequence a session may hold with exact results."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.sliding_window, self.max_position_embeddings)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(raw)
        family = SUPPORTED_ARCHITECTURES[architecture]
        _reject_unsupported_options(raw)
        num_heads = _positive_int(raw, "num_attention_heads")
        hidden_size = _positive_int(raw, "hidden_size")
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise UnsupportedModel(
                "num_key_value_heads", num_kv_heads, f"must divide num_attention_heads={num_heads}"
            )
        head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
        if head_dim % 2:
            raise UnsupportedModel("head_dim", head_dim, "rotary embeddings need an even head_dim")
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architecture,
            family=family,
            num_layers=_positive_int(raw, "num_hidden_layers"),
            hidden_size=hidden_size,
            intermediate_size=_positive_int(raw, "intermediate_size"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=_positive_int(raw, "vocab_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(raw),
            max_position_embeddings=_positive_int(raw, "max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and never an o_proj bias; Llama's attention_bias covers all four.
            qkv_bias=family == "qwen2" or (family == "llama" and attention_bias),
            o_bias=family == "llama" and attention_bias,
            mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
            sliding_window=_sliding_window(raw, family),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id")),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        return cls.from_dict(read_config_json(model_dir))


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidModelDirectory(f"{model_dir} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise InvalidModelDirectory(f"{path} is not valid JSON: {exc}") from None


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if len(architectures) != 1:
        raise UnsupportedModel("architectures", architectures, "expected exactly one architecture")
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UnsupportedModel("architectures", architecture, f"supported: {supported}")
    return architecture


def _reject_unsupported_options(raw: dict[str, Any]) -> None:
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "unknown")
        raise UnsupportedModel("quantization_config", method, "load a dequantized (float) checkpoint")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel("hidden_act", raw["hidden_act"], "only silu is implemented")
    rope = _rope_dict(raw)
    if float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModel("partial_rotary_factor", rope.get("partial_rotary_factor"))


def _rope_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """Merges transformers 5's ``rope_parameters`` and 4.x's ``rope_theta`` + ``rope_scaling``."""
    merged: dict[str, Any] = {}
    if raw.get("rope_theta") is not None:
        merged["rope_theta"] = raw["rope_theta"]
    merged.update(raw.get("rope_scaling") or {})
    merged.update(raw.get("rope_parameters") or {})
    return merged


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    rope = _rope_dict(raw)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise UnsupportedModel("rope_scaling.rope_type", rope_type, f"supported: {supported}")
    theta = float(rope.get("rope_theta", 10000.0))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(rope["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _sliding_window(raw: dict[str, Any], family: str) -> int | None:
    layer_types = raw.get("layer_types") or []
    uses_window = {
        "mistral": raw.get("sliding_window") is not None,
        "qwen2": bool(raw.get("use_sliding_window")) or "sliding_attention" in layer_types,
        "llama": False,
    }[family]
    return int(raw["sliding_window"]) if uses_window else None


def _positive_int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidModelDirectory(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)

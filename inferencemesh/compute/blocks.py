"""Weights of one decoder block, loaded from HF tensors into the engine's fused layout.

q/k/v become one projection (one matmul per step instead of three), and so do gate and up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.errors import InvalidModelDirectory
from inferencemesh.compute.linear import Projection
from inferencemesh.compute.native import native_core
from inferencemesh.compute.weights import WeightFiles


@dataclass
class BlockWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Projection  # hidden -> q_size + 2 * kv_size
    o: Projection  # q_size -> hidden
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: Projection  # hidden -> 2 * intermediate
    down: Projection  # intermediate -> hidden

    def projections(self) -> tuple[Projection, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    def nbytes(self) -> int:
        norms = self.attn_norm.numel() * self.attn_norm.element_size() * 2
        return norms + sum(p.nbytes() for p in self.projections())


def block_tensor_names(config: ModelConfig, index: int) -> list[str]:
    """HF names of every tensor block ``index`` (0-based) needs."""
    prefix = f"model.layers.{index}."
    names = [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
    names += [f"{prefix}self_attn.{p}_proj.weight" for p in "qkvo"]
    names += [f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    if config.qkv_bias:
        names += [f"{prefix}self_attn.{p}_proj.bias" for p in "qkv"]
    if config.o_bias:
        names.append(prefix + "self_attn.o_proj.bias")
    if config.mlp_bias:
        names += [f"{prefix}mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    return names


def load_block(
    files: WeightFiles, config: ModelConfig, index: int, dtype: torch.dtype, device: torch.device | str
) -> BlockWeights:
    prefix = f"model.layers.{index}."
    attn, mlp = prefix + "self_attn.", prefix + "mlp."

    def load(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = files.load(name, dtype, device)
        if tuple(tensor.shape) != shape:
            raise InvalidModelDirectory(f"{name} has shape {tuple(tensor.shape)}, config implies {shape}")
        return tensor

    hidden, inter = config.hidden_size, config.intermediate_size
    q_size, kv_size = config.q_size, config.kv_size

    def qkv_part(kind: str, suffix: str) -> torch.Tensor:
        rows = q_size if kind == "q" else kv_size
        return load(f"{attn}{kind}_proj.{suffix}", (rows, hidden) if suffix == "weight" else (rows,))

    def optional(name: str, shape: tuple[int, ...], present: bool) -> torch.Tensor | None:
        return load(name, shape) if present else None

    def gate_up_bias() -> torch.Tensor | None:
        if not config.mlp_bias:
            return None
        return torch.cat([load(mlp + "gate_proj.bias", (inter,)), load(mlp + "up_proj.bias", (inter,))])

    return BlockWeights(
        attn_norm=load(prefix + "input_layernorm.weight", (hidden,)),
        qkv=Projection(
            torch.cat([qkv_part(kind, "weight") for kind in "qkv"]),
            torch.cat([qkv_part(kind, "bias") for kind in "qkv"]) if config.qkv_bias else None,
        ),
        o=Projection(
            load(attn + "o_proj.weight", (hidden, q_size)),
            optional(attn + "o_proj.bias", (hidden,), config.o_bias),
        ),
        mlp_norm=load(prefix + "post_attention_layernorm.weight", (hidden,)),
        gate_up=Projection(
            torch.cat(
                [
                    load(mlp + "gate_proj.weight", (inter, hidden)),
                    load(mlp + "up_proj.weight", (inter, hidden)),
                ]
            ),
            gate_up_bias(),
        ),
        down=Projection(
            load(mlp + "down_proj.weight", (hidden, inter)),
            optional(mlp + "down_proj.bias", (hidden,), config.mlp_bias),
        ),
    )


# ``_core.rms_norm_f32``, or None without the native core.
_NATIVE_RMS_NORM: Callable[..., None] | None = getattr(native_core(), "rms_norm_f32", None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension."""
    if x.dtype == torch.float32:
        if (
            _NATIVE_RMS_NORM is not None
            and x.is_cpu
            and x.is_contiguous()
            and weight.dtype == torch.float32
            and weight.is_cpu
            and weight.is_contiguous()
            and weight.shape == x.shape[-1:]
        ):
            # One pass over each row: F.rms_norm's chain of ops cost ~6 % of a decode step on an
            # Intel VM (csrc/rms_norm.h). The kernel reads raw memory, hence the checks above.
            y = torch.empty_like(x)
            dim = weight.shape[0]
            _NATIVE_RMS_NORM(x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), eps, y.data_ptr())
            return y
        return F.rms_norm(x, weight.shape, weight, eps)
    # Reduced precision: normalise in float32, round, then scale. This is transformers' rounding
    # order, which F.rms_norm (one rounding at the end) does not reproduce bit for bit.
    x32 = x.float()
    normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalised.to(x.dtype)

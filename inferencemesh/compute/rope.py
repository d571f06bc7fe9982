"""Rotary position embeddings: inverse frequencies (with rope scaling) and cos/sin tables."""

from __future__ import annotations

import math

import torch

from inferencemesh.compute.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair rotation speeds (float32, ``head_dim // 2`` values), including rope scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, the band between
    # the two limits interpolated smoothly.
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, smoothed, scaled)


class RopeTable:
    """Rotation factors for positions ``0..capacity-1``, ``[positions, head_dim]``, in the compute dtype.

    ``cos`` is ``[cos, cos]`` and ``sin`` is ``[-sin, sin]`` over the two halves of the head dim, so
    :func:`apply_rope` needs no slicing. Angles and cos/sin are computed in float32 and then rounded
    to the compute dtype, as transformers does, so bf16 results match it exactly. The table grows on
    demand (doubling): a model with a 128k context does not hold a 128k table for short sessions.
    """

    def __init__(
        self, rope: RopeConfig, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self._inv_freq = inverse_frequencies(rope, head_dim).to(device)
        self._dtype = dtype
        self.cos = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.sin = torch.empty(0, head_dim, dtype=dtype, device=device)

    def ensure(self, length: int) -> None:
        """Makes :attr:`cos` and :attr:`sin` cover at least positions ``0..length-1``."""
        if length > self.cos.shape[0]:
            capacity = max(length, 2 * self.cos.shape[0], 256)
            positions = torch.arange(capacity, dtype=torch.float32, device=self._inv_freq.device)
            angles = torch.outer(positions, self._inv_freq)
            cos, sin = angles.cos().to(self._dtype), angles.sin().to(self._dtype)
            self.cos = torch.cat([cos, cos], dim=-1)
            self.sin = torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``[N, heads, head_dim]`` (HF's half-split pair layout) by table rows
    ``[N, 1, head_dim]``.

    ``x.roll(half)`` times ``[-sin, sin]`` is exactly transformers' ``rotate_half(x) * sin``
    (negation is exact), and each product is rounded before the sum as there, so reduced-precision
    results are bit-identical to transformers'.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin

"""Decode attention on the native kernel: one call per sequence and block for float32 on the CPU.

A decode step's attention for one sequence is little arithmetic (the kernel: ~14 us a block at 37
cached positions, ~110 at 1000), but in torch it is a chain of ~25 dispatched ops (the rope, two
indexed cache writes, SDPA and its views), ~170-380 us a block on an Intel Xeon VM: 11-14 % of a
30-block step there (``python bench/bench_attention.py``). ``_core.decode_attention_f32`` does the
rope, the cache writes and the attention in one pass (csrc/decode_attention.h). Other dtypes and
devices keep torch's path in compute/span.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.kv_cache import SessionCache
from inferencemesh.compute.native import native_core
from inferencemesh.compute.rope import RopeTable


def _native_kernel() -> Callable[..., None] | None:
    """``_core.decode_attention_f32``, or None without the native core or on a CPU without AVX-512F."""
    core = native_core()
    if core is None or not core.decode_attention_f32_supported():
        return None
    return core.decode_attention_f32


_NATIVE_DECODE_ATTENTION = _native_kernel()

_FLOAT32_BYTES = 4


def runs_natively(rope: RopeTable, caches: Sequence[SessionCache]) -> bool:
    """Whether a decode batch over ``caches`` runs on the kernel: float32 CPU tensors laid out as it
    reads them (the rope table and caches are made so; the kernel reads raw memory, hence the check)."""
    tensors = [rope.cos, rope.sin] + [t for cache in caches for t in (cache.keys, cache.values)]
    return _NATIVE_DECODE_ATTENTION is not None and all(
        t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors
    )


class NativeDecodeAttention:
    """``attend(layer, qkv)`` of one decode step for a batch: row ``r`` of the fused projection
    ``qkv`` is the new position of ``caches[r]``, at ``positions[r]``. Returns ``[rows, heads * head_dim]``.

    Each call rotates the rows' queries and keys, writes their keys and values into the caches of
    block ``layer`` and attends over every cached position. Check :func:`runs_natively` first.
    """

    def __init__(
        self, config: ModelConfig, rope: RopeTable, caches: Sequence[SessionCache], positions: Sequence[int]
    ) -> None:
        if max(positions, default=0) >= rope.cos.shape[0]:
            raise ValueError(f"the rope table ends before position {max(positions)}: call rope.ensure first")
        self._heads, self._kv_heads, self._head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self._width = config.q_size + 2 * config.kv_size
        self._q_size = config.q_size
        table_row = config.head_dim * _FLOAT32_BYTES
        # Per row: the rope rows' addresses, the caches' addresses and one block's bytes in them, the
        # caches' length and the position.
        self._rows = [
            (
                rope.cos.data_ptr() + position * table_row,
                rope.sin.data_ptr() + position * table_row,
                cache.keys.data_ptr(),
                cache.values.data_ptr(),
                cache.keys.stride(0) * _FLOAT32_BYTES,
                cache.max_length,
                position,
            )
            for cache, position in zip(caches, positions, strict=True)
        ]

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        if qkv.shape != (len(self._rows), self._width) or qkv.dtype != torch.float32 or not qkv.is_cpu:
            raise ValueError(f"qkv must be float32 [{len(self._rows)}, {self._width}] on the CPU")
        qkv = qkv.contiguous()
        out = qkv.new_empty(len(self._rows), self._q_size)
        qkv_address, out_address = qkv.data_ptr(), out.data_ptr()
        for row, (cos, sin, keys, values, block_bytes, max_length, position) in enumerate(self._rows):
            _NATIVE_DECODE_ATTENTION(  # type: ignore[misc]
                qkv_address + row * self._width * _FLOAT32_BYTES,
                cos,
                sin,
                keys + layer * block_bytes,
                values + layer * block_bytes,
                self._heads,
                self._kv_heads,
                self._head_dim,
                max_length,
                position,
                out_address + row * self._q_size * _FLOAT32_BYTES,
            )
        return out

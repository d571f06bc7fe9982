"""A contiguous span of decoder blocks: span-only loading and the prefill/decode forward.

Blocks are indexed 0-based and spans are half-open ``[start, end)`` internally; user-facing ranges
are 1-based inclusive ("1-10" is blocks 0..9), see :func:`parse_block_range`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from inferencemesh.compute.attention import NativeDecodeAttention, runs_natively
from inferencemesh.compute.blocks import BlockWeights, block_tensor_names, load_block, rms_norm
from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.devices import resolve_device
from inferencemesh.compute.errors import InvalidSpan
from inferencemesh.compute.hugepages import place_in_huge_pages
from inferencemesh.compute.kv_cache import KVCacheManager, SessionCache
from inferencemesh.compute.rope import RopeTable, apply_rope
from inferencemesh.compute.weights import WeightFiles

# attend(block_position, qkv [N, q_size + 2 * kv_size], the block's fused projection, before the rope)
# -> attention output [N, heads * head_dim]
AttendFn = Callable[[int, torch.Tensor], torch.Tensor]


def parse_block_range(text: str, num_layers: int) -> tuple[int, int]:
    """``"11-20"`` (1-based, inclusive) -> ``(10, 20)`` (0-based, half-open); ``"7"`` is one block."""
    first, sep, last = text.partition("-")
    try:
        start, end = int(first) - 1, int(last if sep else first)
    except ValueError:
        raise InvalidSpan(f"block range {text!r} is not FIRST-LAST (e.g. 1-10)") from None
    check_span(start, end, num_layers)
    return start, end


def format_block_range(start: int, end: int) -> str:
    """``(10, 20)`` -> ``"11-20"``, the inverse of :func:`parse_block_range`."""
    return f"{start + 1}-{end}"


def check_span(start: int, end: int, num_layers: int) -> None:
    if not 0 <= start < end <= num_layers:
        raise InvalidSpan(
            f"blocks {format_block_range(start, end)} are not a non-empty range within 1-{num_layers}"
        )


class Span:
    """Blocks ``[start, end)`` of a model, ready to run on ``device`` in ``dtype``."""

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        blocks: Sequence[BlockWeights],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        check_span(start, end, config.num_layers)
        if len(blocks) != end - start:
            raise InvalidSpan(f"span {format_block_range(start, end)} got {len(blocks)} blocks")
        self.config = config
        self.start = start
        self.end = end
        self.blocks = list(blocks)
        self.dtype = dtype
        self.device = torch.device(device)
        self._rope = RopeTable(config.rope, config.head_dim, dtype, self.device)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        progress: bool = True,
        huge_pages: bool = True,
    ) -> Span:
        """Reads only the tensors of blocks ``[start, end)`` from ``model_dir``; on the CPU their
        weights go to huge pages unless ``huge_pages`` is False (see compute/hugepages.py)."""
        device = resolve_device(device)
        config = ModelConfig.load(model_dir)
        check_span(start, end, config.num_layers)
        files = WeightFiles(model_dir)
        files.require(name for index in range(start, end) for name in block_tensor_names(config, index))
        label = f"loading blocks {format_block_range(start, end)}"
        blocks = [
            load_block(files, config, index, dtype, device)
            for index in tqdm(range(start, end), desc=label, unit="block", disable=not progress)
        ]
        files.close()
        if huge_pages:
            place_in_huge_pages([p for block in blocks for p in block.projections()])
        return cls(config, start, end, blocks, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        """Bytes held by the span's weights."""
        return sum(block.nbytes() for block in self.blocks)

    def cache_manager(self, budget_bytes: int) -> KVCacheManager:
        """A KV cache manager shaped for this span."""
        return KVCacheManager(
            num_layers=self.num_blocks,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            budget_bytes=budget_bytes,
            max_context=self.config.max_context,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def prefill(self, hidden: torch.Tensor, cache: SessionCache) -> torch.Tensor:
        """Runs ``T`` consecutive positions of one session: ``hidden`` ``[T, hidden_size]`` -> same shape.

        The tokens continue the session at ``cache.length`` (0 for a fresh session; after
        :meth:`SessionCache.truncate` this re-prefills from the truncation point).
        """
        hidden = self._check_hidden(hidden)
        self._check_cache(cache)
        num_tokens = hidden.shape[0]
        cache.check_room(num_tokens)
        start, end = cache.length, cache.length + num_tokens
        self._rope.ensure(end)
        cos, sin = self._rope.cos[start:end].unsqueeze(1), self._rope.sin[start:end].unsqueeze(1)
        if start == 0:
            mask = None
        else:  # position start + t may see keys 0..start + t
            key_positions = torch.arange(end, device=self.device)
            mask = key_positions[None, :] <= torch.arange(start, end, device=self.device)[:, None]

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            q, k, v = self._rotated_heads(qkv, cos, sin)
            cache.keys[layer, :, start:end] = k.transpose(0, 1)
            cache.values[layer, :, start:end] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                cache.keys[None, layer, :, :end],
                cache.values[None, layer, :, :end],
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=True,
            )
            return out[0].transpose(0, 1).reshape(num_tokens, -1)

        output = self._forward(hidden, attend)
        cache.length = end
        cache.touch()
        return output

    @torch.inference_mode()
    def decode(
        self, hidden: torch.Tensor, caches: Sequence[SessionCache], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One new position for each of ``B`` sessions: ``hidden`` ``[B, hidden_size]`` -> same shape.

        Sessions may have different lengths; the batch may change freely between calls. ``out``: a
        tensor of that shape, on the span's device and of its dtype, that the last block writes the
        output into (a worker passes the outgoing message's buffer: no copy after the forward).
        """
        hidden = self._check_hidden(hidden)
        if hidden.shape[0] != len(caches):
            raise ValueError(f"{hidden.shape[0]} hidden rows for {len(caches)} sessions")
        if out is not None and (
            out.shape != hidden.shape or out.dtype != self.dtype or out.device != self.device
        ):
            raise ValueError(f"out must be {self.dtype} {list(hidden.shape)} on {self.device}")
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("a session appears twice in one decode batch")
        for cache in caches:
            self._check_cache(cache)
            cache.check_room(1)
        positions = [cache.length for cache in caches]
        self._rope.ensure(max(positions) + 1)
        attend: AttendFn
        if runs_natively(self._rope, caches):
            attend = NativeDecodeAttention(self.config, self._rope, caches, positions)
        else:
            attend = self._torch_decode_attention(caches, positions)
        output = self._forward(hidden, attend, out)
        for cache in caches:
            cache.length += 1
            cache.touch()
        return output

    def _forward(self, x: torch.Tensor, attend: AttendFn, out: torch.Tensor | None = None) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        inter = self.config.intermediate_size
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            qkv = block.qkv(rms_norm(x, block.attn_norm, eps))
            x = x + block.o(attend(layer, qkv))
            gate_up = block.gate_up(rms_norm(x, block.mlp_norm, eps))
            mlp = block.down(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
            x = torch.add(x, mlp, out=out) if layer == last and out is not None else x + mlp
        return x

    def _torch_decode_attention(self, caches: Sequence[SessionCache], positions: list[int]) -> AttendFn:
        """Decode attention in torch ops, for what the native kernel does not take (other dtypes, CUDA)."""
        if len(caches) == 1:
            index: slice | torch.Tensor = slice(positions[0], positions[0] + 1)
        else:
            index = torch.tensor(positions, device=self.device)
        cos, sin = self._rope.cos[index].unsqueeze(1), self._rope.sin[index].unsqueeze(1)

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            # Attention is per session (each has its own length); everything else runs batched.
            q, k, v = self._rotated_heads(qkv, cos, sin)
            # 4-D inputs with enable_gqa select torch's fused CPU kernel and give the same bits as
            # transformers' repeat_kv + SDPA (a 3-D call falls back to a slower unfused path).
            outputs = []
            with self._serial_small_kernels():
                for row, (cache, position) in enumerate(zip(caches, positions, strict=True)):
                    cache.keys[layer, :, position] = k[row]
                    cache.values[layer, :, position] = v[row]
                    outputs.append(
                        F.scaled_dot_product_attention(
                            q[row, None, :, None],
                            cache.keys[None, layer, :, : position + 1],
                            cache.values[None, layer, :, : position + 1],
                            enable_gqa=True,
                        )
                    )
            return torch.stack(outputs).view(len(caches), -1)

        return attend

    def _rotated_heads(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[N, heads, head_dim]`` and k ``[N, kv_heads, head_dim]`` rotated, and v, from ``qkv``."""
        config = self.config
        rows, heads, kv_heads = qkv.shape[0], config.num_heads, config.num_kv_heads
        q_and_k = config.q_size + config.kv_size
        # q and k heads are adjacent in the fused projection: one rope call rotates both.
        rotated = apply_rope(qkv[:, :q_and_k].view(rows, heads + kv_heads, config.head_dim), cos, sin)
        v = qkv[:, q_and_k:].view(rows, kv_heads, config.head_dim)
        return rotated[:, :heads], rotated[:, heads:], v

    @contextmanager
    def _serial_small_kernels(self) -> Iterator[None]:
        """Runs one-query attention kernels on one CPU thread.

        They take microseconds, so a parallel region cannot pay off, and it can cost milliseconds:
        after a one-row matmul (which MKL runs on one thread) the second thread has gone to sleep
        and must be woken, which on a loaded machine waits for a scheduler slot (measured 7 ms per
        call instead of 20 us on a shared 2-core VM).
        """
        threads = torch.get_num_threads()
        if self.device.type != "cpu" or threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _check_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.config.hidden_size or hidden.shape[0] == 0:
            raise ValueError(
                f"hidden states must be [tokens, {self.config.hidden_size}], got {tuple(hidden.shape)}"
            )
        return hidden.to(device=self.device, dtype=self.dtype)

    def _check_cache(self, cache: SessionCache) -> None:
        expected = (self.num_blocks, self.config.num_kv_heads)
        if tuple(cache.keys.shape[:2]) != expected or cache.keys.dtype != self.dtype:
            raise ValueError(f"session {cache.session_id!r}'s cache was not made for this span")

"""Decode attention on the native kernel (float32, CPU): the rope and cache writes bit for bit as
torch's ops make them, the attention within float32 rounding of a float64 one, and whole decode
steps as torch's path computes them."""

from __future__ import annotations

import math

import pytest
import torch
from compute_models import TOKENS, assert_same_states

from inferencemesh.compute import attention
from inferencemesh.compute.rope import apply_rope

needs_kernel = pytest.mark.skipif(
    attention._NATIVE_DECODE_ATTENTION is None, reason="needs the native core on a CPU with AVX-512F"
)


def rope_rows(dim: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin table rows as compute/rope.py lays them out, for one position."""
    angles = position * 1e4 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.cat([angles.cos(), angles.cos()]), torch.cat([-angles.sin(), angles.sin()])


def run_kernel(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    position: int,
) -> torch.Tensor:
    kv_heads, max_length, dim = keys.shape
    out = torch.full((heads * dim,), float("nan"))
    attention._NATIVE_DECODE_ATTENTION(  # type: ignore[misc]
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        heads, kv_heads, dim, max_length, position, out.data_ptr(),
    )  # fmt: skip
    return out


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "position"),
    [
        (9, 3, 64, 0),  # SmolLM2's heads; the first position attends to itself only
        (9, 3, 64, 36),
        (4, 4, 16, 16),  # one head per key/value head; a block of 16 positions and one more
        (8, 2, 80, 100),  # a head dim that is not a multiple of 16 (masked lanes)
        (2, 1, 6, 5),  # a head dim under one vector
        (32, 8, 128, 299),
    ],
)
def test_the_kernel_writes_the_rotated_key_and_attends_within_float32_rounding(
    heads: int, kv_heads: int, dim: int, position: int
) -> None:
    torch.manual_seed(heads * 1000 + position)
    max_length = position + 3
    qkv = torch.randn((heads + 2 * kv_heads) * dim) * 2
    cos, sin = rope_rows(dim, position)
    keys, values = torch.randn(kv_heads, max_length, dim), torch.randn(kv_heads, max_length, dim)
    keys_before, values_before = keys.clone(), values.clone()

    out = run_kernel(qkv, cos, sin, keys, values, heads, position)

    q_and_k = qkv[: (heads + kv_heads) * dim].view(1, heads + kv_heads, dim)
    rotated = apply_rope(q_and_k, cos.view(1, 1, dim), sin.view(1, 1, dim))[0]
    new_values = qkv[(heads + kv_heads) * dim :].view(kv_heads, dim)
    assert torch.equal(keys[:, position], rotated[heads:])  # the bits torch's rope gives
    assert torch.equal(values[:, position], new_values)
    others = [p for p in range(max_length) if p != position]
    assert torch.equal(keys[:, others], keys_before[:, others])
    assert torch.equal(values[:, others], values_before[:, others])

    q = rotated[:heads].double()
    k = keys[:, : position + 1].double().repeat_interleave(heads // kv_heads, dim=0)
    v = values[:, : position + 1].double().repeat_interleave(heads // kv_heads, dim=0)
    weights = torch.softmax(torch.einsum("hd,htd->ht", q, k) / math.sqrt(dim), dim=-1)
    exact = torch.einsum("ht,htd->hd", weights, v).reshape(-1)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6 * exact.abs().max().item() + 1e-7)


@needs_kernel
def test_large_scores_give_a_finite_one_hot_attention() -> None:
    # Scores in the thousands: the softmax must subtract the maximum before exponentiating.
    heads, kv_heads, dim, position = 2, 1, 16, 20
    qkv = torch.zeros((heads + 2 * kv_heads) * dim)
    qkv[: heads * dim] = 400.0
    cos, sin = torch.ones(dim), torch.zeros(dim)
    keys, values = torch.zeros(kv_heads, position + 1, dim), torch.randn(kv_heads, position + 1, dim)
    keys[0, 7] = 1.0  # position 7's score is 400 * 16 / 4 = 1600 above every other one
    out = run_kernel(qkv, cos, sin, keys, values, heads, position)
    assert torch.equal(out.view(heads, dim), values[0, 7].expand(heads, dim))


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "position", "message"),
    [
        (9, 2, 64, 3, "multiple of kv_heads"),
        (4, 0, 64, 3, "multiple of kv_heads"),
        (4, 2, 63, 3, "head_dim even"),
        (4, 2, 64, 8, "past the cache"),
    ],
)
def test_the_kernel_refuses_shapes_it_cannot_read(
    heads: int, kv_heads: int, dim: int, position: int, message: str
) -> None:
    cache = torch.zeros(max(kv_heads, 1), 8, dim)
    qkv, rows = torch.zeros((heads + 2 * kv_heads) * dim), torch.zeros(dim)
    with pytest.raises(ValueError, match=message):
        attention._NATIVE_DECODE_ATTENTION(  # type: ignore[misc]
            qkv.data_ptr(), rows.data_ptr(), rows.data_ptr(), cache.data_ptr(), cache.data_ptr(),
            heads, kv_heads, dim, 8, position, cache.data_ptr(),
        )  # fmt: skip


@needs_kernel
def test_decode_steps_on_the_kernel_match_torchs_path(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of two sessions of different lengths, four steps, with and without the kernel: the
    same states and caches to float32 rounding, the first block's cache (written before any attention
    output differs) bit for bit."""
    span, head = tiny
    calls = []
    kernel = attention._NATIVE_DECODE_ATTENTION

    def run(native: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        counted = lambda *args: calls.append(args) or kernel(*args)  # noqa: E731
        monkeypatch.setattr(attention, "_NATIVE_DECODE_ATTENTION", counted if native else None)
        manager = span.cache_manager(1 << 22)
        caches = [manager.allocate("short", 32), manager.allocate("long", 32)]
        span.prefill(head.embed(TOKENS[:3]), caches[0])
        span.prefill(head.embed(TOKENS[:11]), caches[1])
        outputs = [span.decode(head.embed([TOKENS[step], TOKENS[step + 1]]), caches) for step in range(4)]
        assert [cache.length for cache in caches] == [7, 15]
        return outputs, [t[:, :, : cache.length] for cache in caches for t in (cache.keys, cache.values)]

    torch_outputs, torch_caches = run(native=False)
    assert not calls
    native_outputs, native_caches = run(native=True)
    assert len(calls) == 4 * span.num_blocks * 2  # every step, block and session on the kernel
    for ours, reference in zip(native_outputs, torch_outputs, strict=True):
        assert_same_states(ours, reference)
    for ours, reference in zip(native_caches, torch_caches, strict=True):
        assert torch.equal(ours[0], reference[0])
        assert_same_states(ours, reference)


@needs_kernel
def test_bfloat16_decode_stays_on_torch(smollm2_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferencemesh.compute.span import Span

    monkeypatch.setattr(attention, "_NATIVE_DECODE_ATTENTION", lambda *args: pytest.fail("read raw memory"))
    span = Span.load(smollm2_dir, 0, 1, dtype=torch.bfloat16, progress=False)
    cache = span.cache_manager(1 << 22).allocate("s", 8)
    span.prefill(torch.randn(3, span.config.hidden_size), cache)
    assert span.decode(torch.randn(1, span.config.hidden_size), [cache]).dtype == torch.bfloat16


@needs_kernel
def test_positions_past_the_rope_table_are_refused(tiny) -> None:
    span, _ = tiny
    cache = span.cache_manager(1 << 22).allocate("s", 8)
    span._rope.ensure(4)
    with pytest.raises(ValueError, match="rope table ends"):
        attention.NativeDecodeAttention(span.config, span._rope, [cache], [span._rope.cos.shape[0]])

"""Span loading (only its tensors, dtype) and execution: batching, rollback, limits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from compute_models import TOKENS, assert_same_states

from inferencemesh.compute.errors import CacheOverflow, InvalidModelDirectory, InvalidSpan
from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.span import Span, format_block_range, parse_block_range


def test_block_ranges_are_one_based_inclusive() -> None:
    assert parse_block_range("1-10", 30) == (0, 10)
    assert parse_block_range("21-30", 30) == (20, 30)
    assert parse_block_range("7", 30) == (6, 7)
    assert format_block_range(10, 20) == "11-20"
    for bad in ("0-3", "5-3", "1-31", "a-b", ""):
        with pytest.raises(InvalidSpan):
            parse_block_range(bad, 30)


def test_span_holds_only_its_blocks(smollm2_dir: Path) -> None:
    middle = Span.load(smollm2_dir, 10, 20, progress=False)
    one = Span.load(smollm2_dir, 0, 1, progress=False)
    assert (middle.start, middle.end, middle.num_blocks) == (10, 20, 10)
    assert middle.nbytes() == 10 * one.nbytes()
    # 30 blocks of SmolLM2 hold 134.5M - 28.3M (tied embedding) parameters in float32.
    assert middle.nbytes() == pytest.approx((134.5e6 - 49152 * 576) * 4 / 3, rel=0.01)
    head = ClientHead.load(smollm2_dir)
    assert head.nbytes() == (49152 * 576 + 576) * 4  # tied: one vocab x hidden matrix


def test_bfloat16_span_and_cache(smollm2_dir: Path) -> None:
    span = Span.load(smollm2_dir, 0, 2, dtype=torch.bfloat16, progress=False)
    assert all(block.qkv.dtype == torch.bfloat16 for block in span.blocks)
    cache = span.cache_manager(1 << 20).allocate("s", 8)
    out = span.prefill(torch.randn(3, 576), cache)
    assert out.dtype == torch.bfloat16 and cache.keys.dtype == torch.bfloat16


def test_unneeded_shards_are_never_opened(tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir("llama")
    model_dir = tmp_path / "partial"
    shutil.copytree(source, model_dir)
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {file for name, file in weight_map.items() if name.startswith("model.layers.0.")}
    for file in set(weight_map.values()) - needed:
        (model_dir / file).unlink()
    expected = Span.load(source, 0, 1, progress=False)
    partial = Span.load(model_dir, 0, 1, progress=False)
    probe = torch.randn(2, 64)
    assert torch.equal(partial.blocks[0].qkv(probe), expected.blocks[0].qkv(probe))
    with pytest.raises(InvalidModelDirectory, match="missing"):
        Span.load(model_dir, 3, 4, progress=False)


def test_span_must_be_within_the_model(tiny_model_dir) -> None:
    with pytest.raises(InvalidSpan):
        Span.load(tiny_model_dir("llama"), 2, 5, progress=False)


def run_alone(span: Span, head: ClientHead, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    cache = span.cache_manager(1 << 22).allocate("alone", 64)
    outputs = [span.prefill(head.embed(prompt), cache)[-1]]
    outputs += [span.decode(head.embed([token]), [cache])[0] for token in steps]
    return outputs


def test_batched_decode_matches_single_sessions(tiny) -> None:
    span, head = tiny
    manager = span.cache_manager(1 << 22)
    prompts = {"a": TOKENS[:3], "b": TOKENS[:9], "c": TOKENS[4:6]}
    steps = {"a": [7, 8, 9, 10], "b": [20, 21, 22, 23], "c": [30, 31]}
    expected = {sid: run_alone(span, head, prompts[sid], steps[sid])[1:] for sid in prompts}
    caches = {sid: manager.allocate(sid, 64) for sid in prompts}
    for sid in ("a", "b"):
        span.prefill(head.embed(prompts[sid]), caches[sid])
    got: dict[str, list[torch.Tensor]] = {sid: [] for sid in prompts}
    # Continuous batching: "c" joins at step 2, "a" and "c" leave when their steps are done.
    schedule = [["a", "b"], ["a", "b"], ["a", "b", "c"], ["b", "a", "c"]]
    for step, members in enumerate(schedule):
        if step == 2:
            span.prefill(head.embed(prompts["c"]), caches["c"])
        tokens = [steps[sid][len(got[sid])] for sid in members]
        out = span.decode(head.embed(tokens), [caches[sid] for sid in members])
        for row, sid in enumerate(members):
            got[sid].append(out[row])
    for sid in prompts:
        for ours, alone in zip(got[sid], expected[sid], strict=True):
            assert_same_states(ours, alone)
    assert [caches[sid].length for sid in ("a", "b", "c")] == [7, 13, 4]


def test_decode_writes_into_a_given_output_tensor_exactly(tiny) -> None:
    span, head = tiny
    manager = span.cache_manager(1 << 22)
    ours, reference = manager.allocate("ours", 16), manager.allocate("reference", 16)
    for cache in (ours, reference):
        span.prefill(head.embed(TOKENS[:4]), cache)
    hidden = head.embed([TOKENS[4]])
    out = torch.full_like(hidden, float("nan"))
    assert span.decode(hidden, [ours], out=out) is out
    assert torch.equal(out, span.decode(hidden, [reference]))  # the same bits as without
    for wrong in (torch.empty(2, hidden.shape[1]), out.double()):
        with pytest.raises(ValueError, match="out must be"):
            span.decode(hidden, [ours], out=wrong)
    assert ours.length == 5  # a refused call leaves the session as it was


def test_truncate_and_replay_reproduce_the_states(tiny) -> None:
    span, head = tiny
    cache = span.cache_manager(1 << 22).allocate("s", 32)
    span.prefill(head.embed(TOKENS[:8]), cache)
    original = span.decode(head.embed([TOKENS[8]]), [cache])[0]
    later = span.decode(head.embed([TOKENS[9]]), [cache])[0]
    cache.truncate(5)  # forget positions 5..9, then replay 5..8 (as after a failover)
    replayed = span.prefill(head.embed(TOKENS[5:9]), cache)[-1]
    assert cache.length == 9
    assert_same_states(replayed, original)
    assert_same_states(replayed, run_alone(span, head, TOKENS[:9], [])[0])
    assert (replayed - later).abs().max().item() > 1e-2  # the comparison can tell states apart


def test_cache_overflow_and_bad_inputs(tiny) -> None:
    span, head = tiny
    cache = span.cache_manager(1 << 22).allocate("s", 4)
    span.prefill(head.embed(TOKENS[:4]), cache)
    with pytest.raises(CacheOverflow):
        span.decode(head.embed([1]), [cache])
    assert cache.length == 4
    other = span.cache_manager(1 << 22).allocate("t", 4)
    with pytest.raises(ValueError, match="hidden states"):
        span.prefill(torch.zeros(2, 7), other)
    with pytest.raises(ValueError, match="sessions"):
        span.decode(torch.zeros(2, 64), [other])
    with pytest.raises(ValueError, match="twice"):
        span.decode(torch.zeros(2, 64), [other, other])


def test_a_device_this_machine_lacks_is_refused_with_what_to_use_instead(smollm2_dir: Path) -> None:
    from inferencemesh.compute.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for unknown in ("tpu", "gpu0"):
        with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
            Span.load(smollm2_dir, 0, 1, device=unknown, progress=False)
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
                Span.load(smollm2_dir, 0, 1, device=device, progress=False)
            with pytest.raises(ValueError, match="sees no CUDA GPU"):
                ClientHead.load(smollm2_dir, device=device)
    else:
        with pytest.raises(ValueError, match="CUDA GPU\\(s\\)"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")

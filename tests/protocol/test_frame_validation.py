"""Every malformed frame or encoder input gets a typed FrameError with the right code: never a crash,
never an out-of-bounds read. Byte-level mutation fuzzing runs here too (the 1e6-frame libFuzzer run
under ASan+UBSan lives in fuzz/ and runs in CI)."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inferencemesh import _core
from inferencemesh.protocol.errors import FrameError, FrameErrorCode, MetadataError
from inferencemesh.protocol.frames import FrameLimits, decode_message, encode_message

HEADER = _core.FRAME_HEADER_SIZE


def valid_frame(*tensors: torch.Tensor, metadata: dict | None = None) -> bytearray:
    return bytearray(encode_message(3, 11, metadata or {"m": 1}, list(tensors) or [torch.ones(4)]).to_bytes())


def expect(code: FrameErrorCode, data: bytes | bytearray, **limits: int) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_message(bytes(data), limits=FrameLimits(**limits))
    assert info.value.code == code, (info.value.code_name, str(info.value))
    assert info.value.code_name == code.name
    return info.value


def table_entry_offset(frame: bytearray) -> int:
    metadata_len = struct.unpack_from("<I", frame, 32)[0]
    return HEADER + metadata_len


def test_truncated_anywhere() -> None:
    frame = valid_frame(torch.ones(16))
    for cut in (0, 1, HEADER - 1, HEADER, HEADER + 3, len(frame) - 1):
        expect(FrameErrorCode.TRUNCATED, frame[:cut])


def test_bad_magic_and_version() -> None:
    frame = valid_frame()
    expect(FrameErrorCode.BAD_MAGIC, b"XXXX" + frame[4:])
    frame[4] = 2
    err = expect(FrameErrorCode.UNSUPPORTED_VERSION, frame)
    assert "version 2" in str(err)


def test_oversized_frame_metadata_and_tensor_count() -> None:
    frame = valid_frame(torch.ones(1024))
    expect(FrameErrorCode.OVERSIZED, frame, max_frame_size=len(frame) - 1)
    expect(FrameErrorCode.OVERSIZED, valid_frame(metadata={"k": "x" * 100}), max_metadata_size=50)
    expect(FrameErrorCode.OVERSIZED, valid_frame(*[torch.ones(1)] * 3), max_tensors=2)
    with pytest.raises(FrameError) as info:
        encode_message(1, 1, {}, [torch.ones(1024)], limits=FrameLimits(max_frame_size=1000))
    assert info.value.code == FrameErrorCode.OVERSIZED


def test_declared_length_larger_than_buffer_or_smaller_than_layout() -> None:
    frame = valid_frame()
    struct.pack_into("<Q", frame, 16, len(frame) + 64)
    expect(FrameErrorCode.TRUNCATED, frame)
    frame = valid_frame()
    struct.pack_into("<Q", frame, 16, 8)
    expect(FrameErrorCode.LENGTH_MISMATCH, frame)
    frame = valid_frame()
    expect(FrameErrorCode.LENGTH_MISMATCH, frame + b"\0" * 64)
    frame = valid_frame()
    struct.pack_into("<Q", frame, 24, struct.unpack_from("<Q", frame, 24)[0] - 1)
    expect(FrameErrorCode.LENGTH_MISMATCH, frame)


def test_huge_declared_sizes_do_not_overflow() -> None:
    frame = valid_frame()
    struct.pack_into("<Q", frame, 24, 2**64 - 1)
    expect(FrameErrorCode.LENGTH_MISMATCH, frame)
    frame = valid_frame()
    entry = table_entry_offset(frame)
    struct.pack_into("<Q", frame, entry + 8, 2**64 - 64)  # offset near the top of the address space
    expect(FrameErrorCode.BAD_OFFSET, frame)
    frame = valid_frame(torch.ones(2, 2))
    struct.pack_into("<qq", frame, entry + 24, 2**62, 2**62)  # element count overflows
    expect(FrameErrorCode.BAD_SHAPE, frame)


def test_unknown_dtype_too_many_dims_and_reserved_bits() -> None:
    frame = valid_frame()
    entry = table_entry_offset(frame)
    frame[entry] = 200
    expect(FrameErrorCode.BAD_DTYPE, frame)
    frame = valid_frame()
    frame[entry + 1] = _core.MAX_DIMS + 1
    expect(FrameErrorCode.TOO_MANY_DIMS, frame)
    frame = valid_frame()
    frame[entry + 2] = 1
    expect(FrameErrorCode.RESERVED_NONZERO, frame)
    frame = valid_frame()
    frame[38] = 1
    expect(FrameErrorCode.RESERVED_NONZERO, frame)


def test_shape_and_byte_length_must_agree() -> None:
    frame = valid_frame(torch.ones(4))
    entry = table_entry_offset(frame)
    struct.pack_into("<q", frame, entry + 24, 5)
    expect(FrameErrorCode.SIZE_MISMATCH, frame)
    struct.pack_into("<q", frame, entry + 24, -1)
    expect(FrameErrorCode.BAD_SHAPE, frame)


def test_misaligned_overlapping_and_out_of_payload_offsets() -> None:
    frame = valid_frame(torch.ones(32), torch.ones(32))
    first = table_entry_offset(frame)
    second = first + 24 + 8
    bad = bytearray(frame)
    struct.pack_into("<Q", bad, second + 8, 68)
    expect(FrameErrorCode.BAD_OFFSET, bad)
    bad = bytearray(frame)
    struct.pack_into("<Q", bad, second + 8, 64)  # overlaps the first tensor's 128 bytes
    expect(FrameErrorCode.BAD_OFFSET, bad)
    bad = bytearray(frame)
    struct.pack_into("<Q", bad, second + 8, 1024)
    expect(FrameErrorCode.BAD_OFFSET, bad)


def test_metadata_must_be_a_msgpack_map() -> None:
    frame = valid_frame(metadata={})
    frame[HEADER] = 0xC1  # a byte msgpack never uses
    with pytest.raises(MetadataError) as info:
        decode_message(bytes(frame))
    assert info.value.code == FrameErrorCode.BAD_METADATA
    assert isinstance(info.value, FrameError)


def test_encoder_rejects_strided_device_and_unsupported_inputs() -> None:
    with pytest.raises(FrameError) as info:
        encode_message(1, 1, {}, [torch.ones(4, 6).t()])
    assert info.value.code == FrameErrorCode.NON_CONTIGUOUS
    assert "contiguous" in str(info.value)
    with pytest.raises(FrameError) as info:
        encode_message(1, 1, {}, [torch.ones(3, dtype=torch.complex64)])
    assert info.value.code == FrameErrorCode.BAD_DTYPE
    with pytest.raises(FrameError) as info:
        encode_message(1, 1, {}, [object()])
    assert info.value.code == FrameErrorCode.BAD_ARGUMENT
    with pytest.raises(FrameError) as info:
        encode_message(1, 1, {}, [torch.ones(1)] * 65)
    assert info.value.code == FrameErrorCode.OVERSIZED


def test_write_into_a_short_buffer_is_refused() -> None:
    frame = encode_message(1, 1, {}, [torch.ones(64)])
    with pytest.raises(FrameError) as info:
        frame.write_into(bytearray(frame.nbytes - 1))
    assert info.value.code == FrameErrorCode.BUFFER_TOO_SMALL


def test_parse_header_reports_the_frame_length_early() -> None:
    frame = valid_frame(torch.ones(100))
    header = _core.parse_header(bytes(frame[:HEADER]))
    assert header["frame_len"] == len(frame)
    assert header["kind"] == 3 and header["request_id"] == 11


SEEDS = [
    bytes(valid_frame(torch.ones(3), torch.arange(5), metadata={"session": "abc", "step": 3})),
    bytes(valid_frame(torch.ones(2, 3, dtype=torch.bfloat16))),
    bytes(valid_frame(torch.tensor(1.0), torch.empty(0))),
]


@settings(max_examples=2000, deadline=None)
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 4096),
)
def test_mutated_frames_never_crash(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    data = data[: max(cut, 0)] if cut < len(data) else data
    try:
        message = decode_message(bytes(data))
    except FrameError:
        return
    for tensor in message.tensors:  # touching every decoded byte must be in bounds
        tensor.clone()


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode_message(data)
    except FrameError:
        pass

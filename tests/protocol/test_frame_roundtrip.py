"""Round trips of the frame codec: every dtype and shape, metadata, and zero-copy aliasing."""

from __future__ import annotations

import gc

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inferencemesh import _core
from inferencemesh.protocol.frames import decode_message, encode_message

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=gen).to(dtype)


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=_core.MAX_DIMS).map(tuple)
tensor_specs = st.lists(st.tuples(st.sampled_from(DTYPES), shapes, st.integers(0, 2**31)), max_size=8)
metadata_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    specs=tensor_specs,
    metadata=st.dictionaries(st.text(max_size=10), metadata_values, max_size=6),
    kind=st.integers(0, 255),
    request_id=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 2**16 - 1),
)
def test_round_trip_preserves_everything(specs, metadata, kind, request_id, flags) -> None:
    tensors = [random_tensor(dtype, shape, seed) for dtype, shape, seed in specs]
    frame = encode_message(kind, request_id, metadata, tensors, flags=flags)
    message = decode_message(frame.to_bytes())
    assert (message.kind, message.request_id, message.flags) == (kind, request_id, flags)
    assert message.metadata == metadata
    assert len(message.tensors) == len(tensors)
    for sent, got in zip(tensors, message.tensors, strict=True):
        assert got.dtype == sent.dtype
        assert got.shape == sent.shape
        assert torch.equal(got, sent)


def test_zero_dim_empty_and_max_dims() -> None:
    tensors = [
        torch.tensor(3.5),
        torch.empty(0, 576),
        torch.empty(0),
        torch.ones((1,) * _core.MAX_DIMS, dtype=torch.int32),
    ]
    got = decode_message(encode_message(1, 1, {}, tensors).to_bytes()).tensors
    assert [t.shape for t in got] == [t.shape for t in tensors]
    assert got[0].item() == 3.5


def test_large_bfloat16_hidden_state_round_trip() -> None:
    hidden = torch.randn(1, 2048, 4096).to(torch.bfloat16)  # 16 MiB, a long prefill's hidden state
    got = decode_message(encode_message(2, 1, {}, [hidden]).to_bytes()).tensors[0]
    assert torch.equal(got, hidden)


def test_numpy_arrays_and_bytes_are_accepted() -> None:
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    got = decode_message(encode_message(1, 1, {}, [array, b"raw bytes"]).to_bytes()).tensors
    assert torch.equal(got[0], torch.from_numpy(array))
    assert bytes(got[1].numpy()) == b"raw bytes"


def test_tensor_payloads_are_64_byte_aligned_in_the_frame() -> None:
    tensors = [torch.ones(3), torch.ones(5, dtype=torch.int64), torch.ones(7, dtype=torch.float16)]
    frame = _core.decode_frame(encode_message(1, 1, {"k": 1}, tensors).to_bytes())
    offsets = [frame.tensor_info(i)[2] for i in range(frame.tensor_count)]
    assert all(offset % _core.FRAME_ALIGNMENT == 0 for offset in offsets)


def test_encoder_segments_point_into_the_tensor_without_copying() -> None:
    hidden = torch.randn(1, 1, 576)
    frame = encode_message(1, 1, {}, [hidden])
    segment = np.frombuffer(frame.segments()[1], dtype=np.uint8)
    assert segment.ctypes.data == hidden.data_ptr()
    hidden.add_(1.0)  # the frame sees later writes: it holds a view, not a copy
    got = decode_message(b"".join(bytes(s) for s in frame.segments())).tensors[0]
    assert torch.equal(got, hidden)


def test_write_into_and_pooled_buffer_give_the_same_bytes() -> None:
    frame = encode_message(4, 2, {"a": 1}, [torch.arange(100)])
    dest = bytearray(frame.nbytes)
    assert frame.write_into(dest) == frame.nbytes
    pooled = frame.to_buffer(_core.BufferPool(1 << 20))
    assert bytes(dest) == frame.to_bytes() == bytes(memoryview(pooled))


def test_decoded_tensors_alias_the_received_buffer() -> None:
    pool = _core.BufferPool(1 << 24)
    buffer = encode_message(1, 1, {}, [torch.zeros(1024)]).to_buffer(pool)
    tensor = decode_message(buffer).tensors[0]
    start = buffer.address
    assert start <= tensor.data_ptr() < start + buffer.nbytes
    memoryview(buffer)[-4:] = np.float32(7.0).tobytes()  # last element of the tensor
    assert tensor[-1].item() == 7.0


def test_buffer_lives_exactly_as_long_as_a_view() -> None:
    pool = _core.BufferPool(1 << 24)
    buffer = encode_message(1, 1, {}, [torch.arange(4096, dtype=torch.float32)]).to_buffer(pool)
    (first,) = decode_message(buffer).tensors
    second = decode_message(buffer).tensors[0][10:20]
    del buffer
    gc.collect()
    assert pool.stats()["buffers_in_use"] == 1
    assert first[4095].item() == 4095.0
    del first
    gc.collect()
    assert pool.stats()["buffers_in_use"] == 1  # the slice still views it
    assert second[0].item() == 10.0
    del second
    gc.collect()
    assert pool.stats()["buffers_in_use"] == 0


def test_bytes_buffer_outlives_the_frame_through_its_tensors() -> None:
    data = encode_message(1, 1, {}, [torch.full((256,), 3.0)]).to_bytes()
    tensor = decode_message(data).tensors[0]
    del data
    gc.collect()
    assert torch.all(tensor == 3.0)


def test_unconsumed_capsules_release_the_buffer() -> None:
    pool = _core.BufferPool(1 << 20)
    buffer = encode_message(1, 1, {}, [torch.ones(8)]).to_buffer(pool)
    frame = _core.decode_frame(buffer)
    capsules = frame.dlpacks()
    del buffer, frame
    gc.collect()
    assert pool.stats()["buffers_in_use"] == 1
    del capsules
    gc.collect()
    assert pool.stats()["buffers_in_use"] == 0


def test_frame_error_codes_match_the_python_enum() -> None:
    from inferencemesh.protocol.errors import FrameErrorCode

    native = dict(_core.FRAME_ERROR_CODES)
    assert {name: int(FrameErrorCode[name]) for name in native} == native


def test_every_dtype_has_a_wire_code() -> None:
    assert {str(dtype).removeprefix("torch.") for dtype in DTYPES} == set(_core.DTYPE_CODES)


def test_a_frame_encoded_ahead_takes_its_request_id_later() -> None:
    hidden = torch.randn(1, 576)
    frame = encode_message(9, 0, {"position": 7}, [hidden])
    frame.set_request_id(2**64 - 1)
    message = decode_message(frame.to_bytes())
    assert message.request_id == 2**64 - 1
    assert message.kind == 9 and message.metadata == {"position": 7}
    assert torch.equal(message.tensors[0], hidden)

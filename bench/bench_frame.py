"""Encode+decode of a torch hidden state through the frame codec vs torch.save/load and safetensors,
measured side by side in one run. Prints microseconds per round trip and the ratios.

    python bench/bench_frame.py [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from inferencemesh import _core
from inferencemesh.protocol.frames import decode_message, encode_message


def frame_round_trip(hidden: torch.Tensor) -> torch.Tensor:
    return decode_message(encode_message(2, 1, {"step": 1}, [hidden]).to_bytes()).tensors[0]


def make_pooled_round_trip() -> Callable[[torch.Tensor], torch.Tensor]:
    pool = _core.BufferPool(1 << 30)

    def round_trip(hidden: torch.Tensor) -> torch.Tensor:
        return decode_message(encode_message(2, 1, {"step": 1}, [hidden]).to_buffer(pool)).tensors[0]

    return round_trip


def frame_zero_copy(hidden: torch.Tensor) -> _core.EncodedFrame:
    # What the QUIC path pays: encode to segments and decode a received buffer (no contiguous copy).
    return encode_message(2, 1, {"step": 1}, [hidden])


def torch_save_round_trip(hidden: torch.Tensor) -> torch.Tensor:
    out = io.BytesIO()
    torch.save(hidden, out)
    return torch.load(io.BytesIO(out.getvalue()))


def safetensors_round_trip(hidden: torch.Tensor) -> torch.Tensor:
    return st_load(st_save({"h": hidden}))["h"]


def time_us(fn: Callable[[torch.Tensor], object], arg: torch.Tensor, repeat: int) -> float:
    fn(arg)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn(arg)
        samples.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=2000, help="round trips per sample for the small case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [
        ("1x1x576 fp32 (2.25 KiB)", torch.randn(1, 1, 576), args.repeat),
        (
            "1x2048x4096 bf16 (16 MiB)",
            torch.randn(1, 2048, 4096).to(torch.bfloat16),
            max(args.repeat // 200, 5),
        ),
    ]
    methods: list[tuple[str, Callable[[torch.Tensor], object]]] = [
        ("frame encode only (segments)", frame_zero_copy),
        ("frame -> bytes -> tensor", frame_round_trip),
        ("frame -> pooled buffer -> tensor", make_pooled_round_trip()),
        ("torch.save/load", torch_save_round_trip),
        ("safetensors save/load", safetensors_round_trip),
    ]
    for label, hidden, repeat in cases:
        print(f"\n{label}")
        wire = encode_message(2, 1, {"step": 1}, [hidden]).to_bytes()
        decode_only = ("frame decode only (view)", lambda _, wire=wire: decode_message(wire).tensors[0])
        results = {name: time_us(fn, hidden, repeat) for name, fn in [*methods, decode_only]}
        base = results["frame -> bytes -> tensor"]
        for name, us in results.items():
            print(f"  {name:34s} {us:12.1f} us   {us / base:7.2f}x frame")


if __name__ == "__main__":
    main()

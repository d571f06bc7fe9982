"""Writes valid frames of varied shapes and dtypes as the fuzzer's seed corpus."""

from __future__ import annotations

import pathlib
import sys

import torch

from inferencemesh.protocol.frames import encode_message


def main(out: str) -> None:
    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    seeds = [
        [torch.ones(1, 1, 576)],
        [torch.arange(7), torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor(2.0)],
        [torch.empty(0, 4), torch.ones((1,) * 8, dtype=torch.int8)],
        [],
    ]
    for i, tensors in enumerate(seeds):
        frame = encode_message(i + 1, 1000 + i, {"session": "s" * i, "step": i}, tensors)
        (directory / f"seed-{i}.frame").write_bytes(frame.to_bytes())


if __name__ == "__main__":
    main(sys.argv[1])

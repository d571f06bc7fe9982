"""Writes a model directory shaped like SmolLM2-135M-Instruct, with random weights.

For machines that cannot install the real model (an offline GPU machine): the config, tokenizer and
chat template are copied from SOURCE (the prepared model's directory, or just its small files), the
weights are drawn by transformers' own initialisation with a fixed seed. Parity between our engine and
transformers, the CUDA tests and the benchmarks' timings hold on these weights; the real model's
answers do not. Point the tests at it with INFERENCEMESH_TEST_MODEL_DIR=OUT (tests/conftest.py).

    python tools/random_smollm2.py SOURCE OUT
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="directory holding SmolLM2's config.json and tokenizer")
    parser.add_argument("out", type=Path, help="directory to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (args.source / name).exists():
            shutil.copy(args.source / name, args.out / name)
    config = transformers.AutoConfig.from_pretrained(args.out)
    torch.manual_seed(args.seed)
    print(f"drawing {config.num_hidden_layers} blocks of random weights (seed {args.seed})", flush=True)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

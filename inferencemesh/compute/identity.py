"""A stable model id: the model's name plus a digest of its config and weights.

Workers and clients compare ids so that different weights never mix in one swarm. Every party must
compute the id without loading all weights (a worker reads only its span), so the digest covers the
math-relevant config, each weight file's safetensors header (tensor names, dtypes, shapes, offsets)
and a fixed sample of each file's data bytes: a fine-tune with the same shapes differs in
practically every sampled chunk.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inferencemesh.compute.config import ModelConfig, read_config_json
from inferencemesh.compute.errors import InvalidModelDirectory
from inferencemesh.compute.weights import WeightFiles

SAMPLED_CHUNKS = 64
CHUNK_BYTES = 4096
DIGEST_HEX_CHARS = 16


def model_id(model_dir: str | Path, name: str | None = None) -> str:
    """``"<name>-<16 hex digits>"``; ``name`` defaults to the name config.json records for the model
    (``_name_or_path``), so that copies of one model in differently named directories on different
    machines share an id; a config without one falls back to the directory name."""
    model_dir = Path(model_dir)
    label = _slug(name if name is not None else _recorded_name(model_dir) or model_dir.resolve().name)
    return f"{label}-{weights_digest(model_dir)[:DIGEST_HEX_CHARS]}"


def _recorded_name(model_dir: Path) -> str | None:
    raw = read_config_json(model_dir)
    for key in ("_name_or_path", "_model_name_or_path"):
        value = raw.get(key)
        if isinstance(value, str) and re.search(r"[A-Za-z0-9]", value):
            return value.rstrip("/").rsplit("/", 1)[-1]  # a hub id's repository part
    return None


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 (hex) over the parsed config and every weight file's header and sampled data."""
    digest = hashlib.sha256()
    config = ModelConfig.load(model_dir)
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    files = WeightFiles(model_dir)
    for path in files.files:
        digest.update(path.name.encode())
        _hash_safetensors_file(path, digest)
    return digest.hexdigest()


def _hash_safetensors_file(path: Path, digest: Any) -> None:  # digest: a hashlib hash object
    size = path.stat().st_size
    with path.open("rb") as file:
        header_size_bytes = file.read(8)
        if len(header_size_bytes) != 8:
            raise InvalidModelDirectory(f"{path} is not a safetensors file")
        (header_size,) = struct.unpack("<Q", header_size_bytes)
        data_start = 8 + header_size
        if data_start > size:
            raise InvalidModelDirectory(f"{path} has a truncated header")
        digest.update(file.read(header_size))
        data_size = size - data_start
        digest.update(data_size.to_bytes(8, "little"))
        for chunk in range(SAMPLED_CHUNKS):
            file.seek(data_start + data_size * chunk // SAMPLED_CHUNKS)
            digest.update(file.read(CHUNK_BYTES))


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"model name {name!r} has no usable characters")
    return slug

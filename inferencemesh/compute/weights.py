"""Lazy access to the safetensors weights of an HF model directory.

Only the tensors that are asked for are read (safetensors memory-maps the file and copies just the
requested ranges), so a worker serving blocks 11-20 never materialises blocks 1-10.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from inferencemesh.compute.errors import InvalidModelDirectory

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightFiles:
    """Maps tensor names to the (possibly sharded) safetensors file holding them."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.tensor_files = _tensor_files(self.model_dir)
        self._handles: dict[Path, Any] = {}

    @property
    def files(self) -> list[Path]:
        """The weight files, sorted by name."""
        return sorted(set(self.tensor_files.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def load(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Reads one tensor and converts it to ``dtype`` on ``device``."""
        return self._handle(name).get_tensor(name).to(dtype=dtype, device=device)

    def require(self, names: Iterable[str]) -> None:
        missing = [name for name in names if name not in self.tensor_files]
        if missing:
            raise InvalidModelDirectory(f"{self.model_dir}: weights lack {', '.join(missing[:5])}")

    def close(self) -> None:
        self._handles.clear()

    def _handle(self, name: str) -> Any:  # safetensors' handle type is not public
        try:
            path = self.tensor_files[name]
        except KeyError:
            raise InvalidModelDirectory(f"{self.model_dir}: no tensor named {name}") from None
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise InvalidModelDirectory(f"{path.name} (holding {name}) is missing") from None
        return self._handles[path]


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise InvalidModelDirectory(f"{index} is not a safetensors index: {exc}") from None
        # Shards are opened only when one of their tensors is needed: a worker may hold just the
        # shards of its span.
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise InvalidModelDirectory(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)

"""Model ids: stable for the same model, different for different configs or weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from inferencemesh.compute.identity import model_id


def test_smollm2_id_is_stable(smollm2_dir: Path) -> None:
    first = model_id(smollm2_dir)
    # The label is the name the model records in config.json (from the GGUF's general.name).
    assert re.fullmatch(r"smollm2-135m-[0-9a-z-]+-[0-9a-f]{16}", first)
    assert model_id(smollm2_dir) == first
    assert model_id(smollm2_dir, name="SmolLM2 135M") == "smollm2-135m-" + first.rsplit("-", 1)[1]


def test_the_directory_name_does_not_matter(smollm2_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "models" / "my-local-copy"
    renamed.mkdir(parents=True)
    for item in smollm2_dir.iterdir():
        (renamed / item.name).symlink_to(item)
    assert model_id(renamed) == model_id(smollm2_dir)


def test_copies_agree_and_changes_are_detected(tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir("llama")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    assert model_id(copy, name="tiny") == model_id(source, name="tiny")

    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert model_id(copy, name="tiny") != model_id(source, name="tiny")

    retrained = tmp_path / "retrained"
    shutil.copytree(source, retrained)
    # Same names, shapes and dtypes, slightly different values: what a fine-tune looks like.
    for shard in retrained.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file(
            {name: tensor * 1.001 for name, tensor in tensors.items()}, shard, metadata={"format": "pt"}
        )
    assert model_id(retrained, name="tiny") != model_id(source, name="tiny")

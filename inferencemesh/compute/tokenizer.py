"""Tokenization and chat templates from an HF model directory, without transformers.

Uses ``tokenizers`` for ``tokenizer.json`` and renders the model's Jinja chat template (from
``chat_template.jinja`` or ``tokenizer_config.json``) in a sandboxed jinja2 environment set up the
way transformers renders it, so prompts are token-for-token the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from inferencemesh.compute.config import read_config_json
from inferencemesh.compute.errors import ComputeError, InvalidModelDirectory

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ComputeError):
    """The model has no chat template, or its template rejected the messages."""


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        special_tokens: Mapping[str, str],
        eos_token_ids: frozenset[int],
        chat_template: str | None,
    ) -> None:
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise InvalidModelDirectory(f"{model_dir} has no tokenizer.json")
        tokenizer = HFTokenizer.from_file(str(path))
        tokenizer_config = _read_optional_json(model_dir / "tokenizer_config.json")
        special_tokens = {
            key: _token_text(tokenizer_config[key])
            for key in SPECIAL_TOKEN_KEYS
            if tokenizer_config.get(key) is not None
        }
        return cls(
            tokenizer,
            special_tokens=special_tokens,
            eos_token_ids=_eos_token_ids(model_dir, tokenizer, special_tokens.get("eos_token")),
            chat_template=_chat_template(model_dir, tokenizer_config),
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``)."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template")
        env = _jinja_environment()
        from jinja2 import TemplateError  # importable: _jinja_environment checked it

        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        # The template already writes the special tokens; the post-processor must not add more.
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidModelDirectory(f"{path} is not valid JSON: {exc}") from None


def _token_text(value: str | Mapping[str, Any]) -> str:
    # Older tokenizer configs store special tokens as AddedToken dicts.
    return value["content"] if isinstance(value, Mapping) else value


def _eos_token_ids(model_dir: Path, tokenizer: HFTokenizer, eos_token: str | None) -> frozenset[int]:
    ids: set[int] = set()
    for source in (read_config_json(model_dir), _read_optional_json(model_dir / "generation_config.json")):
        value = source.get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
        ids.add(tokenizer.token_to_id(eos_token))
    return frozenset(ids)


def _chat_template(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def _jinja_environment() -> Any:
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template rejected the messages: {message}")

    def tojson(value: Any, indent: int | None = None) -> str:
        # jinja2's own tojson HTML-escapes; chat templates expect plain JSON.
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env

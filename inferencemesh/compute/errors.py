"""Typed errors of the compute engine; callers (worker, client, CLI) map them to protocol errors."""

from __future__ import annotations


class ComputeError(Exception):
    """Base class of every error the compute engine raises on purpose."""


class UnsupportedModel(ComputeError):
    """The model uses an architecture or option this engine cannot run exactly.

    ``option`` names the offending config key (e.g. ``"rope_scaling.rope_type"``) so that the user
    sees what to change instead of getting silently wrong outputs.
    """

    def __init__(self, option: str, value: object, detail: str = "") -> None:
        self.option = option
        self.value = value
        message = f"unsupported model option {option}={value!r}"
        super().__init__(f"{message}: {detail}" if detail else message)


class InvalidModelDirectory(ComputeError):
    """The model directory is missing files or its files are inconsistent."""


class InvalidSpan(ComputeError, ValueError):
    """A block range outside the model or empty."""


class CacheFull(ComputeError):
    """The KV cache byte budget cannot hold a new session of the requested length."""

    def __init__(self, requested_bytes: int, free_bytes: int) -> None:
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        super().__init__(f"KV cache full: session needs {requested_bytes} bytes, {free_bytes} bytes free")


class CacheOverflow(ComputeError):
    """A forward would write past the session's allocated max length."""


class UnknownSession(ComputeError, KeyError):
    """No KV cache is allocated for this session id."""

    def __str__(self) -> str:
        return f"unknown session {self.args[0]!r}"


class DuplicateSession(ComputeError):
    """A session id that already holds a KV cache was allocated again."""


class ModelPreparationError(ComputeError):
    """Preparing a model directory (GGUF download / conversion) failed."""

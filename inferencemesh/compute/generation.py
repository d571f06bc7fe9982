"""The generation loop (sampling, EOS, stop strings, streaming) and a one-process model.

:class:`TokenLoop` holds one sequence's generation state and :func:`generate` drives it with a
``step`` function that consumes new token ids and returns the logits of the last one, so the same
logic serves the local model here and the mesh client (which runs the blocks on remote workers and
steps many sequences together).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.kv_cache import KVCacheManager, SessionCache
from inferencemesh.compute.sampling import Sampler, SamplingParams
from inferencemesh.compute.span import Span
from inferencemesh.compute.tokenizer import Tokenizer

# step(new_token_ids) -> float32 logits [vocab] predicting the token after the last one given.
StepFn = Callable[[Sequence[int]], torch.Tensor]


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens, without the prompt, EOS or tokens past a stop string
    text: str
    finish_reason: str  # "eos", "stop" (a stop string) or "length"


class TextStream:
    """Turns generated tokens into text deltas, cut at the first stop string.

    Text that could still become a stop string, or an incomplete UTF-8 character, is held back
    until it is decided, so a streaming consumer never sees text that is later retracted.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stop_strings = tuple(stop_strings)
        self._token_ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Adds a token; returns the newly decided text (possibly empty)."""
        self._token_ids.append(token_id)
        text = self._tokenizer.decode(self._token_ids)
        stops = [index for index in (text.find(stop) for stop in self._stop_strings) if index >= 0]
        if stops:
            self.stopped = True
            text = text[: min(stops)]
            safe_end = len(text)
        else:
            safe_end = len(text) - self._undecided_suffix(text)
        self.text = text
        delta = text[self._emitted : safe_end]
        self._emitted = max(self._emitted, safe_end)
        return delta

    def flush(self) -> str:
        """The held-back rest, once generation has ended."""
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta

    def _undecided_suffix(self, text: str) -> int:
        if text.endswith("\ufffd"):  # the tokenizer's placeholder for a partial UTF-8 sequence
            return 1
        longest = 0
        for stop in self._stop_strings:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class TokenLoop:
    """One sequence's generation state: sampling, EOS, stop strings, the length limit and streaming.

    Feed it the logits after each step; it answers the next token to step with, or None once the
    sequence has ended.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self._sampler = Sampler(sampling or SamplingParams())
        self._stream = TextStream(tokenizer, stop_strings)
        self._eos = () if ignore_eos else tokenizer.eos_token_ids
        self._max_new_tokens = max_new_tokens
        self._on_text = on_text
        self._history = list(prompt_ids)
        self.generated: list[int] = []
        self.finish_reason = ""  # set once the sequence has ended

    def next_token(self, logits: torch.Tensor) -> int | None:
        """Samples from ``logits`` [vocab]; returns the token to step with, or None when done."""
        token = self._sampler(logits, self._history)
        if token in self._eos:
            return self._finish("eos")
        self.generated.append(token)
        self._history.append(token)
        delta = self._stream.push(token)
        if self._on_text is not None and delta:
            self._on_text(delta)
        if self._stream.stopped:
            return self._finish("stop")
        if len(self.generated) == self._max_new_tokens:
            return self._finish("length")
        return token

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        rest = self._stream.flush()
        if self._on_text is not None and rest:
            self._on_text(rest)

    def result(self) -> GenerationResult:
        return GenerationResult(self.generated, self._stream.text, self.finish_reason)


def generate(step: StepFn, loop: TokenLoop, prompt_ids: Sequence[int]) -> GenerationResult:
    """Drives one sequence: the prompt, then a step per token until ``loop`` says it has ended."""
    token = loop.next_token(step(prompt_ids))
    while token is not None:
        token = loop.next_token(step([token]))
    return loop.result()


class LocalModel:
    """The whole model in one process: client head plus a chain of spans.

    It is the reference the mesh is compared with and the engine the benchmark measures; splitting
    it into several spans runs exactly the code path a chain of workers runs.
    """

    def __init__(
        self,
        head: ClientHead,
        spans: Sequence[Span],
        tokenizer: Tokenizer | None = None,
        *,
        cache_budget_bytes: int,
    ) -> None:
        positions = [0] + [span.end for span in spans]
        if [span.start for span in spans] != positions[:-1] or positions[-1] != head.config.num_layers:
            raise ValueError("spans must cover all blocks in order without gaps")
        self.head = head
        self.spans = list(spans)
        self.tokenizer = tokenizer
        self.caches: list[KVCacheManager] = [span.cache_manager(cache_budget_bytes) for span in spans]
        self._session_ids = itertools.count()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        splits: Sequence[tuple[int, int]] | None = None,
        cache_budget_bytes: int = 1 << 30,
        progress: bool = True,
    ) -> LocalModel:
        """``splits``: 0-based half-open block ranges, one span each (default: one span of all blocks)."""
        head = ClientHead.load(model_dir, dtype=dtype, device=device)
        ranges = splits or [(0, head.config.num_layers)]
        spans = [
            Span.load(model_dir, start, end, dtype=dtype, device=device, progress=progress)
            for start, end in ranges
        ]
        return cls(head, spans, Tokenizer.load(model_dir), cache_budget_bytes=cache_budget_bytes)

    def new_session(self, max_length: int) -> LocalSession:
        session_id = next(self._session_ids)
        caches: list[SessionCache] = []
        try:
            for manager in self.caches:
                caches.append(manager.allocate(session_id, max_length))
        except Exception:
            for manager in self.caches:
                manager.free(session_id)
            raise
        return LocalSession(self, session_id, caches)

    def decode_batch(self, sessions: Sequence[LocalSession], token_ids: Sequence[int]) -> torch.Tensor:
        """One token for each session (sessions may have different lengths) -> ``[B, vocab]`` logits."""
        hidden = self.head.embed(list(token_ids))
        for index, span in enumerate(self.spans):
            hidden = span.decode(hidden, [session.caches[index] for session in sessions])
        return self.head.logits(hidden)

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        if self.tokenizer is None:
            raise ValueError("generation needs a tokenizer; this model was built without one")
        loop = TokenLoop(
            prompt_ids,
            self.tokenizer,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_strings=stop_strings,
            on_text=on_text,
        )
        session = self.new_session(len(prompt_ids) + max_new_tokens)
        try:
            return generate(session.step, loop, prompt_ids)
        finally:
            session.close()


class LocalSession:
    """One sequence's caches across all spans of a :class:`LocalModel`."""

    def __init__(self, model: LocalModel, session_id: int, caches: list[SessionCache]) -> None:
        self.model = model
        self.session_id = session_id
        self.caches = caches

    @property
    def length(self) -> int:
        return self.caches[0].length

    def step(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feeds ``token_ids``; returns the float32 logits ``[vocab]`` after the last one."""
        hidden = self.model.head.embed(list(token_ids))
        for span, cache in zip(self.model.spans, self.caches, strict=True):
            hidden = span.prefill(hidden, cache) if len(token_ids) > 1 else span.decode(hidden, [cache])
        return self.model.head.logits(hidden[-1:])[0]

    def truncate(self, position: int) -> None:
        for cache in self.caches:
            cache.truncate(position)

    def close(self) -> None:
        for manager in self.model.caches:
            manager.free(self.session_id)

"""The Python API of the client, in the spirit of transformers.

    model = DistributedModelForCausalLM.from_pretrained("path/to/model", bootstrap=["127.0.0.1:31330"])
    result = model.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    with model.inference_session(max_length=256) as session:
        logits = session.step(prompt_ids)          # prefill; logits of the next token
        logits = session.step([next_token])        # one decode step

The client holds only the embeddings, the final norm and the LM head; the blocks run on the swarm.
"""

from __future__ import annotations

import collections
import functools
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from inferencemesh.client.batched_head import BatchedHead
from inferencemesh.client.route import BanList, KnownProviders
from inferencemesh.client.runtime import RESULT_BUSY_POLL_S, MeshRuntime, gather
from inferencemesh.client.session import PendingStep, RemoteSession, SessionOptions, finish_steps
from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.generation import GenerationResult, TokenLoop
from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.identity import model_id as compute_model_id
from inferencemesh.compute.sampling import SamplingParams
from inferencemesh.compute.tokenizer import Tokenizer

WAVE_ROWS = 8  # generate_batch's default waves keep at least this many sequences in each


class InferenceSession:
    """Step-by-step use of the swarm: each :meth:`step` returns the logits of the next token."""

    def __init__(self, model: DistributedModelForCausalLM, max_length: int) -> None:
        self._model = model
        self._remote = model._remote_session(max_length)
        model.runtime.call(self._remote.open())
        # Dropped without close(), it closes in the background: its workers free the cache now,
        # not after their idle timeout, and the client forgets the step it encoded ahead.
        self._abandoned = weakref.finalize(self, _close_abandoned, model.runtime, self._remote)
        self._abandoned.atexit = False  # at exit the runtime goes down anyway
        self.token_ids: list[int] = []

    def step(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feeds ``token_ids`` (the prompt, then one token at a time); returns float32 logits [vocab]."""
        hidden = self._model.embed(token_ids)
        (output,) = finish_steps(self._model.runtime, [(self._remote, self._remote.begin_step(hidden))])
        self.token_ids.extend(token_ids)
        return self._model.lm_head.logits(output)[-1]

    @property
    def route(self) -> list[dict[str, Any]]:
        return [hop.describe() for hop in self._remote.hops]

    @property
    def last_chain_s(self) -> float:
        """The last step's time in the swarm: from sending it to the first hop to its result."""
        return self._remote.last_chain_s

    @property
    def steps_encoded_ahead(self) -> int:
        """Steps whose message was encoded while the step before computed (decode steps, one token
        after another, on an unchanged route)."""
        return self._remote.steps_encoded_ahead

    @property
    def last_step_id(self) -> int:
        """The last step's id: workers answer a PING with ``step_times`` with their forward time for it."""
        return self._remote.last_step_id

    @property
    def failovers(self) -> int:
        return len(self._remote.failovers)

    @property
    def failover_times(self) -> list[float]:
        return [f.recovery_s for f in self._remote.failovers]

    def close(self) -> None:
        self._abandoned.detach()
        self._model.runtime.call(self._remote.close())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_abandoned(runtime: MeshRuntime, remote: RemoteSession) -> None:
    runtime.call_soon(remote.close())


@dataclass
class MeshGeneration(GenerationResult):
    prompt_token_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    route: list[dict[str, Any]] = field(default_factory=list)
    failovers: int = 0


class DistributedModelForCausalLM:
    def __init__(
        self,
        model_path: Path,
        runtime: MeshRuntime,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        options: SessionOptions,
    ) -> None:
        self.model_path = model_path
        self.runtime = runtime
        self.options = options
        self.config = ModelConfig.load(model_path)
        self.model_id = compute_model_id(model_path)
        self.known = KnownProviders(self.model_id, self.config.num_layers)
        runtime.call_soon(self.known.look_up(runtime))  # while the head loads: the first session needs it
        self.head = ClientHead.load(model_path, dtype=dtype, device=device)
        self.lm_head = BatchedHead(self.head)  # shared by the sessions of all threads
        self.tokenizer = Tokenizer.load(model_path)
        self.bans = BanList()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        bootstrap: Sequence[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        host: str = "127.0.0.1",
        options: SessionOptions | None = None,
        busy_poll_s: float = RESULT_BUSY_POLL_S,
    ) -> DistributedModelForCausalLM:
        """Loads the client's part of the model (embeddings, final norm, LM head) on ``device`` and
        joins the swarm. ``busy_poll_s``: while one step at a time is in flight, the thread waiting for
        its result busy-polls this long either side of when it is due (0: never; docs/swarm.md)."""
        runtime = MeshRuntime(bootstrap, host=host, busy_poll_s=busy_poll_s)
        try:
            return cls(
                Path(model_path), runtime, dtype=dtype, device=device, options=options or SessionOptions()
            )
        except BaseException:
            runtime.close()
            raise

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self, max_length)

    def encode_prompt(self, prompt: str, *, chat: bool = False) -> list[int]:
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        chat: bool = False,
        sampling: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> MeshGeneration:
        """Generates a continuation; ``on_text`` receives the text as it is generated (streaming)."""
        stream = None if on_text is None else (lambda _index, text: on_text(text))
        (result,) = self.generate_batch(
            [prompt],
            max_new_tokens=max_new_tokens,
            chat=chat,
            sampling=sampling,
            stop_strings=stop_strings,
            ignore_eos=ignore_eos,
            on_text=stream,
        )
        return result

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 64,
        chat: bool = False,
        sampling: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[int, str], None] | None = None,
        waves: int | None = None,
    ) -> list[MeshGeneration]:
        """Generates a continuation of every prompt, each in its own session, stepping them together.

        A round sends a step of every unfinished sequence at once, as one burst that each worker
        computes as one batch, and runs the LM head over all of them in one matmul. With ``waves`` > 1
        the sequences form that many groups that take turns down the chain: while the second hop
        computes one group, the first computes the next (pipeline parallelism). The default gives
        each hop of the route a group, but no group fewer than WAVE_ROWS sequences: smaller batches
        cost more than the overlap gains (measured in docs/benchmarks.md, "The swarm against one
        process").
        Results are what :meth:`generate` gives each prompt alone; ``on_text(index, text)`` streams.
        """
        if waves is not None and waves < 1:
            raise ValueError("waves must be >= 1")
        prompt_ids = [self.encode_prompt(p, chat=chat) if isinstance(p, str) else list(p) for p in prompts]
        loops = [
            TokenLoop(
                ids,
                self.tokenizer,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                stop_strings=stop_strings,
                ignore_eos=ignore_eos,
                on_text=None if on_text is None else functools.partial(on_text, index),
            )
            for index, ids in enumerate(prompt_ids)
        ]
        remotes = [
            self._remote_session(min(len(ids) + max_new_tokens, self.config.max_context))
            for ids in prompt_ids
        ]
        timings: list[list[float]] = [[] for _ in prompts]
        started = time.perf_counter()  # TTFT counts the sessions' opening: the caller waits for it too
        try:
            self.runtime.call(gather(remote.open() for remote in remotes))
            if waves is None:
                waves = max(1, min(len(remotes[0].hops) if remotes else 1, len(remotes) // WAVE_ROWS))
            groups = (range(first, len(prompts), waves) for first in range(waves))
            in_flight = collections.deque(
                self._begin_wave(remotes, {i: prompt_ids[i] for i in group}) for group in groups if group
            )
            while in_flight:
                wave = in_flight.popleft()
                outputs = finish_steps(self.runtime, [(remotes[i], step) for i, step in wave.items()])
                logits = self.lm_head.logits(torch.cat([output[-1:] for output in outputs]))
                now = time.perf_counter()
                inputs: dict[int, list[int]] = {}  # the wave's unfinished sequences' next input
                for row, index in enumerate(wave):
                    timings[index].append(now)
                    token = loops[index].next_token(logits[row])
                    if token is not None:
                        inputs[index] = [token]
                if inputs:
                    in_flight.append(self._begin_wave(remotes, inputs))
            return [
                _mesh_generation(loop.result(), ids, started, times, remote)
                for loop, ids, times, remote in zip(loops, prompt_ids, timings, remotes, strict=True)
            ]
        finally:
            self.runtime.call(gather(remote.close() for remote in remotes))

    def _begin_wave(
        self, remotes: list[RemoteSession], inputs: dict[int, list[int]]
    ) -> dict[int, PendingStep]:
        """Sends the step of every sequence in ``inputs`` (index -> token ids) down the chain; decode
        steps as one burst, which the workers compute as one batch."""
        decoding = len(inputs) > 1 and all(len(ids) == 1 for ids in inputs.values())
        burst = (self.runtime.new_burst(), len(inputs)) if decoding else None
        return {index: remotes[index].begin_step(self.embed(ids), burst) for index, ids in inputs.items()}

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Token ids -> the hidden states a step sends: float32 in host memory, whatever the head's
        dtype and device (workers take float32 and cast to their own dtype)."""
        return self.head.embed(list(token_ids)).to(device="cpu", dtype=torch.float32)

    def _remote_session(self, max_length: int) -> RemoteSession:
        return RemoteSession(
            self.runtime,
            self.model_id,
            self.config.num_layers,
            max_length,
            self.bans,
            self.known,
            self.options,
        )

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _mesh_generation(
    result: GenerationResult,
    prompt_ids: list[int],
    started: float,
    timings: list[float],
    remote: RemoteSession,
) -> MeshGeneration:
    """``timings``: when each step's logits were ready (the first: the prompt's)."""
    decode_steps, decode_s = len(timings) - 1, timings[-1] - timings[0]
    return MeshGeneration(
        token_ids=result.token_ids,
        text=result.text,
        finish_reason=result.finish_reason,
        prompt_token_ids=prompt_ids,
        ttft_s=timings[0] - started,
        decode_tokens_per_s=decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
        route=[hop.describe() for hop in remote.hops],
        failovers=len(remote.failovers),
    )

"""The Python API of the client, in the spirit of transformers.

    model = DistributedModelForCausalLM.from_pretrained("path/to/model", bootstrap=["127.0.0.1:31330"])
    result = model.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    with model.inference_session(max_length=256) as session:
        logits = session.step(prompt_ids)          # prefill; logits of the next token
        logits = session.step([next_token])        # one decode step

The client holds only the embeddings, the final norm and the LM head; the blocks run on the swarm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from inferencemesh.client.route import BanList
from inferencemesh.client.runtime import MeshRuntime
from inferencemesh.client.session import RemoteSession, SessionOptions
from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.generation import GenerationResult, generate
from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.identity import model_id as compute_model_id
from inferencemesh.compute.sampling import SamplingParams
from inferencemesh.compute.tokenizer import Tokenizer


class InferenceSession:
    """Step-by-step use of the swarm: each :meth:`step` returns the logits of the next token."""

    def __init__(self, model: DistributedModelForCausalLM, max_length: int) -> None:
        self._model = model
        self._remote = RemoteSession(
            model.runtime, model.model_id, model.config.num_layers, max_length, model.bans, model.options
        )
        model.runtime.call(self._remote.open())
        self.token_ids: list[int] = []

    def step(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feeds ``token_ids`` (the prompt, then one token at a time); returns float32 logits [vocab]."""
        head = self._model.head
        hidden = head.embed(list(token_ids)).to(torch.float32)
        output = self._model.runtime.call(self._remote.step(hidden))
        self.token_ids.extend(token_ids)
        return head.logits(output.to(head.dtype))[-1].float()

    @property
    def route(self) -> list[dict[str, Any]]:
        return [hop.describe() for hop in self._remote.hops]

    @property
    def failovers(self) -> int:
        return len(self._remote.failovers)

    @property
    def failover_times(self) -> list[float]:
        return [f.recovery_s for f in self._remote.failovers]

    def close(self) -> None:
        self._model.runtime.call(self._remote.close())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        options: SessionOptions,
    ) -> None:
        self.model_path = model_path
        self.runtime = runtime
        self.options = options
        self.config = ModelConfig.load(model_path)
        self.model_id = compute_model_id(model_path)
        self.head = ClientHead.load(model_path, dtype=dtype)
        self.tokenizer = Tokenizer.load(model_path)
        self.bans = BanList()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        bootstrap: Sequence[str],
        *,
        dtype: torch.dtype = torch.float32,
        host: str = "127.0.0.1",
        options: SessionOptions | None = None,
    ) -> DistributedModelForCausalLM:
        """Loads the client's part of the model (embeddings, final norm, LM head) and joins the swarm."""
        runtime = MeshRuntime(bootstrap, host=host)
        try:
            return cls(Path(model_path), runtime, dtype=dtype, options=options or SessionOptions())
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
        prompt_ids = self.encode_prompt(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        max_length = min(len(prompt_ids) + max_new_tokens, self.config.max_context)
        timings: list[float] = []
        with self.inference_session(max_length) as session:

            def step(token_ids: Sequence[int]) -> torch.Tensor:
                logits = session.step(token_ids)
                timings.append(time.perf_counter())
                return logits

            started = time.perf_counter()
            result = generate(
                step,
                prompt_ids,
                self.tokenizer,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                stop_strings=stop_strings,
                ignore_eos=ignore_eos,
                on_text=on_text,
            )
            route, failovers = session.route, session.failovers
        ttft = timings[0] - started
        decode_steps = len(timings) - 1
        decode_s = timings[-1] - timings[0]
        return MeshGeneration(
            token_ids=result.token_ids,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_token_ids=prompt_ids,
            ttft_s=ttft,
            decode_tokens_per_s=decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
            route=route,
            failovers=failovers,
        )

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

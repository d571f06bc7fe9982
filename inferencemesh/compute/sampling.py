"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty, seeded.

The order of the transforms (penalty, temperature, top-k, top-p) is the one transformers uses, so
the same settings mean the same thing to users coming from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks tokens for one sequence; a seeded sampler repeats its choices exactly."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> int:
        """``logits``: ``[vocab]``; ``previous_ids``: prompt and generated tokens (for the penalty)."""
        if logits.dim() != 1:
            raise ValueError(f"expected [vocab] logits, got shape {tuple(logits.shape)}")
        scores = logits.float().cpu()
        if self.params.repetition_penalty != 1.0 and len(previous_ids):
            scores = apply_repetition_penalty(scores, previous_ids, self.params.repetition_penalty)
        if self.params.greedy:
            return int(scores.argmax())
        scores = scores / self.params.temperature
        if self.params.top_k:
            scores = keep_top_k(scores, self.params.top_k)
        if self.params.top_p < 1.0:
            scores = keep_top_p(scores, self.params.top_p)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def apply_repetition_penalty(
    scores: torch.Tensor, previous_ids: Sequence[int], penalty: float
) -> torch.Tensor:
    """Makes already seen tokens less likely: positive scores are divided by ``penalty``, negative
    ones multiplied (so the penalty always lowers them)."""
    ids = torch.as_tensor(list(set(previous_ids)), dtype=torch.long)
    seen = scores[ids]
    penalised = scores.clone()
    penalised[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return penalised


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k >= scores.numel():
        return scores
    threshold = torch.topk(scores, k).values[-1]
    return scores.masked_fill(scores < threshold, float("-inf"))


def keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the most likely tokens whose probabilities first reach ``top_p`` together (at least one)."""
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))

"""Sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds, parameter checks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from inferencemesh.compute.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    keep_top_k,
    keep_top_p,
)

# Probabilities 0.5, 0.25, 0.125, 0.125 over tokens 0..3.
LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))


def draw(params: SamplingParams, count: int, logits: torch.Tensor = LOGITS) -> Counter[int]:
    sampler = Sampler(params)
    return Counter(sampler(logits) for _ in range(count))


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams())(logits) == 1


def test_seeded_sampling_repeats_and_follows_the_distribution() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    first, second = draw(params, 4000), draw(params, 4000)
    assert first == second
    assert first[0] / 4000 == pytest.approx(0.5, abs=0.03)
    assert first[1] / 4000 == pytest.approx(0.25, abs=0.03)
    assert draw(SamplingParams(temperature=1.0, seed=8), 4000) != first


def test_low_temperature_sharpens() -> None:
    counts = draw(SamplingParams(temperature=0.25, seed=1), 2000)
    assert counts[0] / 2000 > 0.9  # p ~ 0.5^4 / (0.5^4 + 0.25^4 + 2 * 0.125^4) = 0.94


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    assert set(draw(SamplingParams(temperature=1.0, top_k=2, seed=3), 500)) == {0, 1}
    # 0.5 alone does not reach 0.6, 0.5 + 0.25 does: tokens 0 and 1 remain.
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.6, seed=3), 500)) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.5, seed=3), 200)) == {0}
    assert torch.isinf(keep_top_k(LOGITS, 1)[1:]).all()
    assert not torch.isinf(keep_top_p(LOGITS, 1e-9)[0])  # at least one token always survives


def test_repetition_penalty_lowers_seen_tokens() -> None:
    scores = torch.tensor([2.0, -2.0, 1.0])
    penalised = apply_repetition_penalty(scores, [0, 1, 1], penalty=2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0]
    # With the penalty, the greedy choice moves away from the repeated token.
    assert Sampler(SamplingParams(repetition_penalty=3.0))(torch.tensor([2.0, 1.0]), [0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)

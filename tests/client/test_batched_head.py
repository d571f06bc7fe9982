"""BatchedHead: threads that need logits at the same time share one LM head matmul (real SmolLM2 head)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from inferencemesh.client.batched_head import BatchedHead
from inferencemesh.compute.head import ClientHead


@pytest.fixture(scope="module")
def head(smollm2_dir: Path) -> ClientHead:
    return ClientHead.load(smollm2_dir)


class CountingHead(ClientHead):
    """The real head, counting its matmuls and holding the first one until released."""

    def __init__(self, head: ClientHead) -> None:
        super().__init__(head.config, head.embed_weight, head.norm_weight, head.lm_head)
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.batches:
            self.entered.set()
            self.release.wait(10)
        self.batches.append(hidden.shape[0])
        return super().logits(hidden)


def test_concurrent_callers_share_matmuls_and_each_gets_its_own_logits(head: ClientHead) -> None:
    torch.manual_seed(0)
    rows = [torch.randn(1 + i % 2, head.config.hidden_size) for i in range(6)]
    counting = CountingHead(head)
    batched = BatchedHead(counting)
    with ThreadPoolExecutor(len(rows)) as pool:
        first = pool.submit(batched.logits, rows[0])
        assert counting.entered.wait(10)
        rest = [pool.submit(batched.logits, r) for r in rows[1:]]
        # The other five queue behind the first matmul, then go as one.
        while len(batched._waiting) < len(rows) - 1:
            time.sleep(0.001)
        counting.release.set()
        results = [first.result(10)] + [f.result(10) for f in rest]
    assert counting.batches == [1, sum(r.shape[0] for r in rows[1:])]
    for hidden, logits in zip(rows, results, strict=True):
        torch.testing.assert_close(logits, head.logits(hidden), rtol=1e-5, atol=1e-4)


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_works(head: ClientHead) -> None:
    batched = BatchedHead(head)
    with pytest.raises(RuntimeError):
        batched.logits(torch.randn(1, head.config.hidden_size + 1))  # wrong width
    logits = batched.logits(torch.zeros(1, head.config.hidden_size))
    assert logits.shape == (1, head.config.vocab_size)

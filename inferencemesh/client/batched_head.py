"""The LM head shared by every session of one client, batched across the threads that use it.

The LM head is the client's big matmul (SmolLM2: 49152 x 576, 113 MB in float32): one row at a time it
is bound by streaming those weights, so sessions stepping in parallel threads each pay the whole
stream. Here a thread that needs logits while another computes them waits, and the next computation
takes every waiting row at once: the weights stream once for all of them. A lone session never
waits (its row runs at once). Rows are independent; a batch may round differently from a single row
(several rows run on another kernel than one, see compute/linear.py), by ~1e-5, well within the
engine's float32 parity bound against transformers (2e-4, tests/compute/test_parity_smollm2.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from inferencemesh.compute.head import ClientHead


@dataclass
class _Rows:
    hidden: torch.Tensor  # [N, hidden_size]
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class BatchedHead:
    def __init__(self, head: ClientHead) -> None:
        self.head = head
        self._state = threading.Condition()
        self._waiting: list[_Rows] = []
        self._computing = False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden_size]`` final hidden states -> ``[N, vocab_size]`` float32 logits."""
        rows = _Rows(hidden.to(device=self.head.device, dtype=self.head.dtype))
        with self._state:
            self._waiting.append(rows)
            while self._computing and not rows.done:
                self._state.wait()
            if not rows.done:
                self._computing = True
                batch, self._waiting = self._waiting, []
        if not rows.done:
            self._compute(batch)
        if rows.error is not None:
            raise rows.error
        assert rows.logits is not None
        return rows.logits

    def _compute(self, batch: list[_Rows]) -> None:
        try:
            stacked = torch.cat([rows.hidden for rows in batch]) if len(batch) > 1 else batch[0].hidden
            logits = self.head.logits(stacked)
            start = 0
            for rows in batch:
                rows.logits = logits[start : start + rows.hidden.shape[0]]
                start += rows.hidden.shape[0]
        except BaseException as exc:
            for rows in batch:
                rows.error = exc
        finally:
            with self._state:
                for rows in batch:
                    rows.done = True
                self._computing = False
                self._state.notify_all()

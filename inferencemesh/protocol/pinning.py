"""Page-locks a buffer pool's large buffers when CUDA is present, so host-to-device copies of received
hidden states run asynchronously. The native core never links CUDA: registration goes through the CUDA
runtime that torch already loaded (``torch.cuda.cudart()``)."""

from __future__ import annotations

import logging

import torch

from inferencemesh import _core

log = logging.getLogger(__name__)

DEFAULT_PIN_MIN_BYTES = 1 << 20


def enable_cuda_pinning(pool: _core.BufferPool, min_bytes: int = DEFAULT_PIN_MIN_BYTES) -> bool:
    """Installs cudaHostRegister/cudaHostUnregister hooks on ``pool``; returns False without CUDA.

    Only buffers allocated from now on and at least ``min_bytes`` large are pinned; a failed
    registration leaves that buffer pageable (logged), it never fails the allocation.
    """
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()

    def pin(address: int, size: int) -> bool:
        status = cudart.cudaHostRegister(address, size, 0)
        if int(status) != 0:
            log.warning("cudaHostRegister of %d bytes failed with status %s", size, status)
            return False
        return True

    def unpin(address: int) -> None:
        cudart.cudaHostUnregister(address)

    pool.set_pin_hooks(pin, unpin, min_bytes)
    return True

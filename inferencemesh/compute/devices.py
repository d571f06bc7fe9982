"""The torch devices a span or a client head may run on (``--device``), checked against this machine."""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` (cpu, cuda or cuda:N) as a torch device this machine has; ValueError saying what to
    use otherwise (torch's own error for a missing GPU names an assertion, not a remedy)."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, "
                "or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved

"""The native core (``inferencemesh._core``) for the compute kernels, where this install has it.

Compute runs without the data plane's native module too (torch alone), so each kernel's caller asks
here and falls back to torch's ops when the answer is None.
"""

from __future__ import annotations

from types import ModuleType


def native_core() -> ModuleType | None:
    """``inferencemesh._core``, or None where it is not built."""
    try:
        from inferencemesh import _core
    except ImportError:
        return None
    return _core

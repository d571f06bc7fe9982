"""blocks.rms_norm: float32 CPU rows on the native kernel, everything else on torch, all within float32
rounding of a float64 RMS norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inferencemesh.compute import blocks
from inferencemesh.compute.blocks import rms_norm

needs_native = pytest.mark.skipif(blocks._NATIVE_RMS_NORM is None, reason="needs the native core")


def exact(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


@needs_native
@pytest.mark.parametrize("shape", [(1, 576), (2, 576), (37, 576), (3, 5, 64), (1, 1), (0, 16)])
def test_float32_rows_run_natively_within_float32_rounding(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]
) -> None:
    calls = []
    kernel = blocks._NATIVE_RMS_NORM
    monkeypatch.setattr(blocks, "_NATIVE_RMS_NORM", lambda *args: calls.append(args) or kernel(*args))
    torch.manual_seed(sum(shape))
    x, weight = torch.randn(*shape) * 4, torch.randn(shape[-1])
    y = rms_norm(x, weight, 1e-5)
    assert len(calls) == 1 and y.shape == x.shape and y.dtype == torch.float32
    # A few float32 roundings of values of the output's size: far below any lost or doubled term.
    bound = 8 * 2.0**-24 * (exact(x, weight, 1e-5).abs() + 1e-30)
    assert ((y.double() - exact(x, weight, 1e-5)).abs() <= bound).all()
    torch.testing.assert_close(y, F.rms_norm(x, weight.shape, weight, 1e-5), rtol=1e-6, atol=1e-6)


@needs_native
def test_the_input_is_left_as_it_was() -> None:
    x, weight = torch.randn(2, 64), torch.randn(64)
    before = x.clone()
    rms_norm(x, weight, 1e-6)
    assert torch.equal(x, before)


@pytest.mark.parametrize("case", ["strided", "strided weight", "bfloat16"])
def test_other_inputs_take_torchs_way(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr(blocks, "_NATIVE_RMS_NORM", lambda *args: pytest.fail("the kernel read raw memory"))
    torch.manual_seed(3)
    weight = torch.randn(32)
    x = torch.randn(4, 64)[:, ::2] if case == "strided" else torch.randn(4, 32)
    if case == "strided weight":
        weight = torch.randn(64)[::2]
    if case == "bfloat16":
        x, weight = x.bfloat16(), weight.bfloat16()
    y = rms_norm(x, weight, 1e-5)
    tolerance = 1e-2 if case == "bfloat16" else 1e-5
    torch.testing.assert_close(
        y.double(), exact(x.float(), weight.float(), 1e-5), rtol=tolerance, atol=tolerance
    )

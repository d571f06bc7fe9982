"""Projection: whatever the weight layout, it computes x @ W.T + b like torch's reference, row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inferencemesh.compute import linear
from inferencemesh.compute.linear import Projection

ROWS = 6  # decode batches and small prefill chunks


@pytest.mark.parametrize("rows", range(1, ROWS + 1))
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_float32_projection_matches_linear_for_every_row_count(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 40), torch.randn(rows, 40)
    b = torch.randn(96) if bias else None
    y = Projection(weight, b)(x)
    assert y.shape == (rows, 96) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_float32_projection_takes_non_contiguous_rows(layout: str) -> None:
    torch.manual_seed(2)
    weight, bias = torch.randn(96, 40), torch.randn(96)
    x = torch.randn(3, 80)[:, ::2] if layout == "strided" else torch.randn(40, 3).t()
    torch.testing.assert_close(Projection(weight, bias)(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_several_rows_use_torchs_linear_where_torch_has_no_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "_ONEDNN_LINEAR", None)  # as in a torch build without mkldnn
    torch.manual_seed(3)
    weight, x = torch.randn(96, 40), torch.randn(ROWS, 40)
    projection = Projection(weight)
    assert torch.equal(projection(x), F.linear(x, projection.weight))


def test_rows_do_not_depend_on_each_other() -> None:
    # A batch's rows are separate sessions: none may see another's values.
    torch.manual_seed(0)
    projection = Projection(torch.randn(64, 32))
    x = torch.randn(ROWS, 32)
    alone = torch.cat([projection(x[i : i + 1]) for i in range(x.shape[0])])
    for rows in range(1, x.shape[0] + 1):
        torch.testing.assert_close(projection(x[:rows]), alone[:rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_uses_torchs_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    weight, x = torch.randn(48, 16, dtype=dtype), torch.randn(3, 16, dtype=dtype)
    assert torch.equal(Projection(weight)(x), F.linear(x, weight))


needs_native = pytest.mark.skipif(
    linear._NATIVE_MATVEC is None, reason="the native float32 matvec needs an x86-64 CPU with AVX-512F"
)


# Outputs: below, at and past a vector's 16 lanes and a 1024-output chunk; inputs: below and past a
# group of 8 rows and a block of 64, and a down projection's 1536.
@needs_native
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(1, 1), (17, 7), (70, 100), (1040, 65), (96, 584), (40, 1536)]
)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [1, 2])
def test_one_or_two_float32_rows_run_natively_within_their_rounding_bound(
    out_features: int, in_features: int, bias: bool, rows: int
) -> None:
    torch.manual_seed(out_features + in_features)
    weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    b = torch.randn(out_features) if bias else None
    projection = Projection(weight, b)
    assert projection._native_fits(x)
    y = projection._native(x, rows)  # the kernel itself, also for a row count Projection gives MKL
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    # Summing in blocks of 64, each output takes at most 64 + blocks + 1 roundings of a float32 (unit
    # 2^-24) of at most the sum of the terms' magnitudes; a lost or doubled term is far outside.
    magnitude = F.linear(x.abs().double(), weight.abs().double()) + (0 if b is None else b.abs().double())
    roundings = 64 + -(-in_features // 64) + 1
    assert ((y.double() - exact).abs() <= roundings * 2.0**-24 * magnitude).all()


@needs_native
def test_the_native_row_reads_a_weight_moved_to_huge_pages() -> None:
    from inferencemesh.compute.hugepages import place_in_huge_pages

    torch.manual_seed(4)
    weight, x = torch.randn(256, 64), torch.randn(1, 64)
    projection = Projection(weight)
    place_in_huge_pages([projection])
    assert projection._native_fits(x)
    torch.testing.assert_close(projection._native(x, 1), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@needs_native
def test_many_torch_threads_keep_torchs_multi_threaded_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    weight, x = torch.randn(96, 40), torch.randn(2, 40)  # two rows: natively on every AVX-512 CPU
    projection = Projection(weight)
    calls = []
    monkeypatch.setattr(linear, "_NATIVE_MATVEC", lambda *args: calls.append(args))
    threads = torch.get_num_threads()
    torch.set_num_threads(linear.NATIVE_MAX_THREADS + 1)
    try:
        y = projection(x)
    finally:
        torch.set_num_threads(threads)
    assert calls == [] and torch.equal(y, F.linear(x, projection.weight))
    projection(x)  # back within the limit: the native kernel again
    assert len(calls) == 1


def test_one_row_uses_torchs_linear_without_the_native_matvec(monkeypatch: pytest.MonkeyPatch) -> None:
    # No native core, or a CPU without AVX-512.
    monkeypatch.setattr(linear, "_NATIVE_MATVEC", None)
    monkeypatch.setattr(linear, "_NATIVE_ROWS", frozenset())
    torch.manual_seed(5)
    weight, x = torch.randn(96, 40), torch.randn(1, 40)
    projection = Projection(weight)
    assert torch.equal(projection(x), F.linear(x, projection.weight))


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_the_row_counts_chosen_for_the_native_kernel_run_on_it(
    monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    # One row goes to MKL where MKL runs AVX-512 (Intel CPUs), to the kernel elsewhere; two rows
    # always to the kernel (it reads the weight once for both); three to torch.
    calls = []
    kernel = linear._NATIVE_MATVEC
    monkeypatch.setattr(linear, "_NATIVE_MATVEC", lambda *args: calls.append(args) or kernel(*args))
    torch.manual_seed(7)
    weight, x = torch.randn(96, 40), torch.randn(rows, 40)
    y = Projection(weight)(x)
    assert len(calls) == (rows == 2 or (rows == 1 and not linear._MKL_RUNS_AVX512))
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)

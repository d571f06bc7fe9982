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

"""softmax_jacobian_norm: the exact ‖Diag(p) − ppᵀ‖₂ against float64 eigvalsh."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.diagnostics.conftest import F64, eig_ref, gen

from lightning_stability.diagnostics import (
    softmax_jacobian_norm,
)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 128])
def test_jacobian_norm_matches_eigvalsh(scale: float, n: int) -> None:
    p = torch.softmax(torch.randn(200, n, generator=gen(n), dtype=F64) * scale, -1)
    assert (softmax_jacobian_norm(p) - eig_ref(p)).abs().max().item() <= 1e-12


def test_jacobian_norm_special_rows() -> None:
    n = 7
    rows = [
        torch.full((n,), 1.0 / n, dtype=F64),  # uniform → 1/n
        torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0], dtype=F64),  # two halves → ½
        torch.tensor([0.3, 0.3, 0.2, 0.1, 0.05, 0.05, 0.0], dtype=F64),  # top-2 tie → p1
        torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=F64),  # one-hot → 0
        torch.tensor([0.25, 0.25, 0.25, 0.25, 0, 0, 0], dtype=F64),  # masked uniform over 4 → ¼
    ]
    p = torch.stack([r.to(F64) for r in rows])
    got = softmax_jacobian_norm(p)
    assert torch.allclose(got, torch.tensor([1 / n, 0.5, 0.3, 0.0, 0.25], dtype=F64), atol=1e-15, rtol=0)
    assert (got - eig_ref(p)).abs().max().item() <= 1e-12


def test_jacobian_norm_near_one_hot() -> None:
    # p1 rounds to 1 in float64; the tail is far below eps.
    logits = torch.tensor(
        [[60.0, 0.0, -1.0, -3.0], [40.0, 39.0, 0.0, 0.0], [800.0, 0.0, 0.0, 0.0]], dtype=F64
    )
    p = torch.softmax(logits, -1)
    got = softmax_jacobian_norm(p)
    assert (got - eig_ref(p)).abs().max().item() <= 1e-12
    # two-point row (1−r, r): λ = 2·p1·r exactly; r = e^-60-ish must not be lost to 1 − p1 = 0
    two = torch.softmax(torch.tensor([[60.0, 0.0]], dtype=F64), -1)
    r = two[0, 1].item()
    assert math.isclose(softmax_jacobian_norm(two).item(), 2 * r * (1 - r), rel_tol=1e-12)


def test_jacobian_norm_nonfinite_and_dtypes() -> None:
    p = torch.tensor([[0.5, float("nan")], [0.2, 0.8]])
    got = softmax_jacobian_norm(p)
    assert got[0].item() == math.inf and math.isclose(got[1].item(), 0.32, rel_tol=1e-6)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.softmax(torch.randn(5, 9, generator=gen(1)), -1).to(dt)
        assert got.dtype == F64
        # rows rounded to dt do not sum to 1: the exact eigenvalue of the given matrix
        assert (softmax_jacobian_norm(q) - eig_ref(q.to(F64))).abs().max().item() <= 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=24), st.floats(0.01, 50.0))
def test_jacobian_norm_property(logits: list[float], scale: float) -> None:
    p = torch.softmax(torch.tensor(logits, dtype=F64) * scale, -1)
    lam = softmax_jacobian_norm(p).item()
    assert 0.0 <= lam <= 0.5
    assert abs(lam - eig_ref(p).item()) <= 1e-12


def test_jacobian_norm_errors() -> None:
    with pytest.raises(ValueError, match="p"):
        softmax_jacobian_norm(torch.tensor(3.0))
    with pytest.raises(ValueError, match="floating"):
        softmax_jacobian_norm(torch.tensor([1, 0]))


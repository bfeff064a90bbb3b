"""Spectral norms, condition numbers and κ(W_Kᵀ W_Q) against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from tests.diagnostics.conftest import F64, gen

from lightning_stability.diagnostics import (
    condition_from_singular_values,
    condition_number,
    extreme_singular_values,
    kappa_wkwq,
    singular_value_extremes_many,
    spectral_norm,
    wkwq_norm,
)
from lightning_stability.diagnostics.linear import kappa_wkwq_many


def _per_head_reference(w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int) -> list[float]:
    """κ over the d_head leading singular values of W_Q^hᵀ W_K^h, formed densely in float64."""
    dh = w_q.shape[0] // n_heads
    out = []
    for h in range(n_heads):
        rows = slice(h * dh, (h + 1) * dh)
        s = torch.linalg.svdvals(w_q[rows].double().T @ w_k[rows].double())[: min(dh, w_q.shape[1])]
        out.append((s[0] / s[-1]).item())
    return out


def test_spectral_norm_and_condition_number_batched() -> None:
    w = torch.randn(3, 7, 5, generator=gen(1))
    sv = torch.linalg.svdvals(w.double())
    assert torch.allclose(spectral_norm(w).double(), sv[:, 0], rtol=1e-5)
    assert torch.allclose(condition_number(w).double(), sv[:, 0] / sv[:, -1], rtol=1e-4)
    assert spectral_norm(w[0]).shape == () and condition_number(w[0].double()).dtype == F64
    assert condition_number(torch.ones(3, 3)).item() > 1e6  # rank deficient (float32 roundoff) or inf
    assert condition_number(torch.tensor([[1.0, 0.0], [0.0, 0.0]])).item() == math.inf
    assert condition_number(torch.zeros(2, 3)).item() == 1.0
    assert condition_number(torch.tensor([[float("nan"), 1.0]])).item() == math.inf
    assert spectral_norm(torch.tensor([[float("inf"), 1.0]])).item() == math.inf
    assert condition_from_singular_values(torch.tensor([[2.0, 1.0], [0.0, 0.0]])).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="w"):
        spectral_norm(torch.randn(3))


def test_kappa_wkwq_against_dense_product() -> None:
    g = gen(2)
    n_heads, d_model = 4, 16
    w_q, w_k = torch.randn(d_model, d_model, generator=g), torch.randn(d_model, d_model, generator=g)
    kap, nrm = kappa_wkwq(w_q, w_k, n_heads), wkwq_norm(w_q, w_k, n_heads)
    dh = d_model // n_heads
    for h in range(n_heads):
        prod = w_q[h * dh:(h + 1) * dh].double().T @ w_k[h * dh:(h + 1) * dh].double()
        sv = torch.linalg.svdvals(prod)[:dh]
        assert math.isclose(kap[h].item(), (sv[0] / sv[-1]).item(), rel_tol=1e-9)
        assert math.isclose(nrm[h].item(), sv[0].item(), rel_tol=1e-9)
    assert kap.shape == (n_heads,)
    zero = torch.zeros(8, 4)
    assert kappa_wkwq(zero, zero, 2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="n_heads"):
        kappa_wkwq(w_q, w_k, 5)
    with pytest.raises(ValueError, match="equal shape"):
        kappa_wkwq(w_q, w_k[:8], 4)


@pytest.mark.parametrize("cond", [1.0, 50.0, 1e3, 1e5, 1e9, math.inf])
def test_extreme_singular_values_match_svdvals_at_any_conditioning(cond: float) -> None:

    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(7, 40, 12, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(7, 12, 12, generator=gen, dtype=torch.float64))
    top = 1.0 / cond if math.isfinite(cond) else 0.0
    s = torch.logspace(0, math.log10(top) if top > 0 else -1, 12, dtype=torch.float64)
    if top == 0:
        s[-1] = 0.0  # rank deficient
    a = u @ torch.diag_embed(s.expand(7, 12)) @ w.mT
    for m in (a, a.mT):  # tall and wide
        ref = torch.linalg.svdvals(m)
        hi, lo = extreme_singular_values(m)
        torch.testing.assert_close(hi, ref[..., 0], rtol=1e-12, atol=0)
        torch.testing.assert_close(lo, ref[..., -1], rtol=1e-8, atol=1e-14)


def test_batched_spectra_of_mixed_shapes_equal_one_by_one() -> None:
    g = gen(3)
    mats = [
        torch.randn(96, 96, generator=g),
        torch.randn(384, 96, generator=g),
        torch.randn(96, 384, generator=g),
        torch.randn(96, 96, generator=g),
        torch.randn(7, 5, generator=g) @ torch.diag(torch.tensor([1.0, 1e-1, 1e-3, 1e-5, 1e-6])),
    ]
    got = singular_value_extremes_many(mats)
    assert len(got) == len(mats)
    for m, (hi, lo) in zip(mats, got, strict=True):
        sv = torch.linalg.svdvals(m.to(F64))
        assert hi.dtype == F64 and hi.shape == () and lo.shape == ()
        assert torch.allclose(hi, sv[0], rtol=1e-12)
        assert torch.allclose(lo, sv[-1], rtol=1e-9)
    assert singular_value_extremes_many([]) == []


def test_kappa_wkwq_many_equals_one_by_one_and_the_dense_product() -> None:
    g = gen(5)
    triples = [
        (torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g), 4),
        (torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g), 2),  # other head count
        (torch.randn(8, 20, generator=g), torch.randn(8, 20, generator=g), 4),  # other shape
        (torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g), 4),  # same group as [0]
        (torch.randn(16, 12, generator=g).double(), torch.randn(16, 12, generator=g).double(), 4),
    ]
    got = kappa_wkwq_many(triples)
    for (w_q, w_k, heads), value in zip(triples, got, strict=True):
        assert value.dtype == F64 and value.shape == (heads,)
        assert torch.equal(value, kappa_wkwq(w_q, w_k, heads))
        assert value.tolist() == pytest.approx(_per_head_reference(w_q, w_k, heads), rel=1e-9)
    assert kappa_wkwq_many([]) == []


def test_kappa_wkwq_many_marks_only_the_non_finite_heads() -> None:
    g = gen(6)
    w_q, w_k = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    bad = w_k.clone()
    bad[5, 0] = math.nan  # head 1 of 4 (rows 4..7)
    clean, broken = kappa_wkwq_many([(w_q, w_k, 4), (w_q, bad, 4)])
    assert broken[1].item() == math.inf
    assert torch.equal(broken[[0, 2, 3]], clean[[0, 2, 3]])
    with pytest.raises(ValueError, match="kappa_wkwq_many: n_heads=5"):
        kappa_wkwq_many([(w_q, w_k, 5)])


def test_many_spectra_calls_split_by_the_byte_budget_give_the_same_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning_stability.diagnostics import linear

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(3, 12, 8, generator=g), torch.randn(12, 8, generator=g)]
    mats.append(torch.randn(5, 7, generator=g))
    pairs = [(torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g), 4) for _ in range(5)]
    whole = linear.singular_value_extremes_many(mats), linear.kappa_wkwq_many(pairs)
    monkeypatch.setattr(linear, "BATCH_BYTES", 12 * 8 * 8)  # one 12 x 8 float64 matrix per call
    split = linear.singular_value_extremes_many(mats), linear.kappa_wkwq_many(pairs)
    for (a_hi, a_lo), (b_hi, b_lo) in zip(whole[0], split[0], strict=True):
        assert torch.equal(a_hi, b_hi) and torch.equal(a_lo, b_lo)
    for a, b, (w_q, w_k, h) in zip(whole[1], split[1], pairs, strict=True):
        assert torch.equal(a, b) and torch.equal(b, linear.kappa_wkwq(w_q, w_k, h))
    assert list(linear.batches([5, 5, 20, 1], budget=10)) == [[0, 1], [2], [3]]


def test_spectra_of_only_empty_stacks_are_empty() -> None:
    from lightning_stability.diagnostics import linear

    ((hi, lo),) = linear.singular_value_extremes_many([torch.empty(0, 4, 3)])
    assert hi.shape == lo.shape == (0,) and hi.dtype == torch.float64


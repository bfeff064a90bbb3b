"""Issue 15, probe part: the cheaper paths of token_variance, the collapse statistics and the
batched κ(W_Qᵀ W_K) give the float64 references' numbers."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lightning_stability.diagnostics import kappa_wkwq, rank_collapse, token_similarity, token_variance
from lightning_stability.diagnostics.collapse import collapse_statistics
from lightning_stability.diagnostics.linear import kappa_wkwq_many

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_variance(row: list[float], rms: bool) -> float:
    """The biased variance (or mean square) of float values, in exact rational arithmetic."""
    vals = [Fraction(v) for v in row]
    mean = Fraction(0) if rms else sum(vals) / len(vals)
    return float(sum((v - mean) ** 2 for v in vals) / len(vals))


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
@pytest.mark.parametrize("rms", [False, True])
def test_token_variance_two_pass_against_exact_rationals(offset: float, rms: bool) -> None:
    # a large shared offset is where E[x²] − E[x]² would cancel: σ² = 1 under a mean of 1e5
    x = torch.randn(6, 48, generator=gen(0)) + offset
    got = token_variance(x, rms=rms)
    assert got.dtype == F64
    for row, value in zip(x.tolist(), got.tolist(), strict=True):
        assert value == pytest.approx(exact_variance(row, rms), rel=1e-13)


def test_token_variance_leaves_a_float64_input_unchanged() -> None:
    x = torch.randn(5, 7, generator=gen(1), dtype=F64) + 3.0
    before = x.clone()
    token_variance(x)
    token_variance(x, rms=True)
    assert torch.equal(x, before)  # centred and squared on a private copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
def test_collapse_statistics_equal_the_two_functions(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 11, 6, generator=gen(2)) + 2.0).to(dtype)
    rank, sim = collapse_statistics(x)
    assert torch.equal(rank, rank_collapse(x)) and torch.equal(sim, token_similarity(x))
    # and the float64 definitions, written out
    x64 = x.double()
    centred = x64 - x64.mean(-2, keepdim=True)
    want = centred.flatten(1).norm(dim=1) / x64.flatten(1).norm(dim=1)
    assert torch.allclose(rank, want, rtol=1e-12, atol=0)
    u = x64 / x64.norm(dim=-1, keepdim=True)
    gram = u @ u.mT
    n = x.shape[1]
    assert torch.allclose(sim, (gram.sum((-2, -1)) - n) / (n * (n - 1)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_token_reaches_only_its_own_example(bad: float) -> None:
    x = torch.randn(3, 9, 5, generator=gen(3))
    clean_rank, clean_sim = collapse_statistics(x)
    x[1, 4, 2] = bad
    rank, sim = collapse_statistics(x)
    assert rank[1].item() == sim[1].item() == math.inf
    for b in (0, 2):  # the other examples' values are unchanged
        assert rank[b].item() == clean_rank[b].item() and sim[b].item() == clean_sim[b].item()
    assert torch.equal(rank, rank_collapse(x)) and torch.equal(sim, token_similarity(x))


def test_a_masked_non_finite_token_is_ignored_as_before() -> None:
    x = torch.randn(2, 7, 4, generator=gen(4))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3] = False
    x_bad = x.clone()
    x_bad[0, 3] = math.nan
    rank, sim = collapse_statistics(x_bad, mask)
    kept = torch.cat([x[0, :3], x[0, 4:]])[None]
    assert rank[0].item() == pytest.approx(rank_collapse(kept).item(), abs=1e-12)
    assert sim[0].item() == pytest.approx(token_similarity(kept).item(), abs=1e-12)


def _per_head_reference(w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int) -> list[float]:
    """κ over the d_head leading singular values of W_Q^hᵀ W_K^h, formed densely in float64."""
    dh = w_q.shape[0] // n_heads
    out = []
    for h in range(n_heads):
        rows = slice(h * dh, (h + 1) * dh)
        s = torch.linalg.svdvals(w_q[rows].double().T @ w_k[rows].double())[: min(dh, w_q.shape[1])]
        out.append((s[0] / s[-1]).item())
    return out


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

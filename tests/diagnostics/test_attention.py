"""Attention diagnostics against float64 brute-force references (SPEC §1, §8)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_stability.diagnostics import (
    attention_diagnostics,
    attention_entropy,
    kappa_score,
    kappa_softmax,
    kappa_v,
    softmax_jacobian_norm,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eig_ref(p: torch.Tensor) -> torch.Tensor:
    # Entries below 1e-150 change λ by < 1e-150 but make LAPACK crawl through subnormals.
    p = p.to(F64)
    p = torch.where(p < 1e-150, 0.0, p)
    j = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.linalg.eigvalsh(j)[..., -1]


def ksm_ref(s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """max_i ‖J(P_i)‖₂‖S_i‖/‖P_i‖ written out with loops (attended keys only)."""
    s = s.to(F64)
    lead = s.shape[:-2]
    flat = s.reshape(-1, *s.shape[-2:])
    m = None if mask is None else mask.expand(s.shape).reshape(-1, *s.shape[-2:])
    out = torch.zeros(flat.shape[0], dtype=F64)
    for g in range(flat.shape[0]):
        best = 0.0
        for i in range(flat.shape[1]):
            row = flat[g, i] if m is None else flat[g, i][m[g, i]]
            if row.numel() == 0:
                continue
            p = torch.softmax(row, -1)
            best = max(best, eig_ref(p).item() * row.norm().item() / p.norm().item())
        out[g] = best
    return out.reshape(lead)


# ------------------------------------------------------------------ softmax_jacobian_norm
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


# ------------------------------------------------------------------ kappa_softmax
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_kappa_softmax_exact_vs_brute_force(scale: float) -> None:
    s = torch.randn(3, 4, 12, 12, generator=gen(int(scale)), dtype=F64) * scale
    ref = ksm_ref(s)
    assert (kappa_softmax(s) - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", ["causal", "padding", "random"])
def test_kappa_softmax_masks(kind: str) -> None:
    g = gen(3)
    s = torch.randn(2, 3, 10, 10, generator=g) * 5
    if kind == "causal":
        mask = torch.ones(10, 10, dtype=torch.bool).tril()
    elif kind == "padding":
        mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        mask[0, ..., 6:] = False
    else:
        mask = torch.rand(2, 3, 10, 10, generator=g) > 0.6
        mask[0, 0] = False  # a fully masked head
    s_masked_garbage = s.masked_fill(~mask, float("nan"))  # masked entries must not matter
    ref = ksm_ref(s, mask)
    got = kappa_softmax(s_masked_garbage, mask)
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    if kind == "random":
        assert got[0, 0].item() == 0.0


def test_kappa_softmax_pruning_many_rows_and_ties() -> None:
    g = gen(4)
    s = (torch.randn(6, 48, 40, generator=g) * 10).to(F64)
    s[0, :, :2] = 7.0  # every row of matrix 0 has a top-2 tie
    s[1] = s[1, :1]  # identical rows
    s[2, 5, :] = s[2, 5, :] + torch.linspace(0, 1e-9, 40, dtype=F64)  # near tie
    ref = ksm_ref(s)
    assert (kappa_softmax(s) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert (kappa_softmax(s, chunk_size=1) - kappa_softmax(s)).abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kappa_softmax_low_precision_inputs(dtype: torch.dtype) -> None:
    s = (torch.randn(2, 2, 16, 16, generator=gen(5)) * 4).to(dtype)
    got = kappa_softmax(s)
    assert got.dtype == F64 and got.shape == (2, 2)
    ref = ksm_ref(s.to(F64))  # exact on the given (rounded) scores
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_kappa_softmax_degenerate() -> None:
    s = torch.randn(4, 5, 6, generator=gen(6))
    s[1, 2, 3] = float("nan")
    s[2, 0, 0] = float("inf")
    s[3, 4, 5] = -float("inf")
    got = kappa_softmax(s)
    assert got[0].isfinite() and (got[1:] == math.inf).all()
    assert kappa_softmax(torch.zeros(2, 1, 1)).tolist() == [0.0, 0.0]  # n = 1
    assert kappa_softmax(torch.randn(3, 1, generator=gen(7))).item() == 0.0  # n_k = 1 → one-hot
    assert kappa_softmax(s, torch.zeros(6, dtype=torch.bool)).abs().sum().item() == 0.0  # fully masked
    assert kappa_softmax(torch.randn(3, 4)).shape == ()


def test_kappa_softmax_errors() -> None:
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"mask.*dtype torch.float32"):
        kappa_softmax(s, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(5,\) is not broadcastable to \(2, 3, 4\)"):
        kappa_softmax(s, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        kappa_softmax(torch.randn(4))


# ------------------------------------------------------------------ kappa_score / kappa_v / entropy
def test_kappa_score_matches_formula_with_mask() -> None:
    g = gen(8)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    mask = torch.rand(2, 3, 7, 5, generator=g) > 0.4
    got = kappa_score(q, k, mask)
    for b in range(2):
        for h in range(3):
            m = mask[b, h]
            qq, kk = q[b, h].double(), k[b, h].double()
            qk = (qq @ kk.T)[m]
            qn = qq[m.any(1)].norm()
            kn = kk[m.any(0)].norm()
            assert math.isclose(got[b, h].item(), (qn * kn / qk.norm()).item(), rel_tol=1e-12)
    plain = kappa_score(q, k)
    ref = q.double().flatten(-2).norm(dim=-1) * k.double().flatten(-2).norm(dim=-1)
    ref = ref / (q.double() @ k.double().transpose(-1, -2)).flatten(-2).norm(dim=-1)
    assert torch.allclose(plain, ref, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(0, 10**6))
def test_kappa_score_and_v_at_least_one(n: int, m: int, d: int, seed: int) -> None:
    g = gen(seed)
    q, k = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    assert kappa_score(q, k).item() >= 1.0 - 1e-12
    scale = 10 ** float(torch.randint(-8, 3, (1,), generator=g))
    assert kappa_v(torch.randn(n, d, generator=g) * scale).item() >= 1.0


def test_kappa_score_degenerate() -> None:
    z = torch.zeros(3, 2)
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.0, 1.0]])
    assert kappa_score(z, z).item() == 1.0  # 0/0
    assert kappa_score(q, k).item() == math.inf  # orthogonal
    assert kappa_score(torch.full((2, 2), float("nan")), q).item() == math.inf
    assert kappa_score(q, q, torch.zeros(1, 1, dtype=torch.bool)).item() == 1.0  # nothing attended
    with pytest.raises(ValueError, match="last dim"):
        kappa_score(torch.randn(3, 2), torch.randn(3, 4))


def test_kappa_v_matches_svdvals_and_degenerate() -> None:
    v = torch.randn(2, 3, 6, 4, generator=gen(9))
    sv = torch.linalg.svdvals(v.double())
    assert torch.allclose(kappa_v(v), sv[..., 0] / (sv[..., -1] + 1e-6), rtol=1e-12)
    rank1 = torch.ones(5, 3)
    assert 1e5 < kappa_v(rank1).item() < math.inf  # large but finite thanks to the ridge
    assert kappa_v(torch.zeros(4, 3)).item() == 1.0
    assert kappa_v(rank1, ridge=0.0).item() == math.inf
    assert kappa_v(torch.randn(1, 4)).item() == 1.0 and kappa_v(torch.randn(4, 1)).item() == 1.0
    assert kappa_v(torch.tensor([[float("inf"), 1.0]])).item() == math.inf
    with pytest.raises(ValueError, match="ridge"):
        kappa_v(v, ridge=-1.0)


def test_attention_entropy() -> None:
    g = gen(10)
    p = torch.softmax(torch.randn(2, 5, 6, generator=g), -1)
    mask = torch.rand(2, 5, 6, generator=g) > 0.3
    mask[0, 1] = False
    got = attention_entropy(p, mask)
    for b in range(2):
        hs = [-(p[b, i][mask[b, i]].double() * p[b, i][mask[b, i]].double().log()).sum().item()
              for i in range(5) if mask[b, i].any()]
        assert math.isclose(got[b].item(), sum(hs) / len(hs), rel_tol=1e-12)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert attention_entropy(one_hot).item() == 0.0
    assert attention_entropy(one_hot, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    assert attention_entropy(torch.tensor([[float("nan"), 1.0]])).item() == math.inf


# ------------------------------------------------------------------ attention_diagnostics
@pytest.mark.parametrize("masked", [False, True])
def test_attention_diagnostics_consistent(masked: bool) -> None:
    g = gen(11)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    v = torch.randn(2, 3, 11, 5, generator=g)
    bias = torch.randn(1, 3, 9, 11, generator=g)
    mask = (torch.rand(2, 1, 9, 11, generator=g) > 0.3) if masked else None
    if mask is not None:
        mask[1, 0, 4] = False  # a row without keys
    d = attention_diagnostics(q, k, v, mask=mask, scale=0.3, bias=bias)
    s = 0.3 * q.double() @ k.double().transpose(-1, -2) + bias.double()
    ref_ksm = ksm_ref(s, mask)
    assert (d.kappa_softmax - ref_ksm).abs().max().item() <= 1e-5 * ref_ksm.max().item()
    assert torch.allclose(d.kappa_score, kappa_score(q, k, mask), rtol=1e-5)
    assert torch.allclose(d.kappa_v, kappa_v(v), rtol=1e-12)
    p = torch.softmax(s if mask is None else s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
    assert torch.allclose(d.entropy, attention_entropy(p, mask), atol=1e-5)
    chunked = attention_diagnostics(q, k, v, mask=mask, scale=0.3, bias=bias, chunk_size=1)
    for name in ("kappa_score", "kappa_softmax", "kappa_v", "entropy"):
        assert torch.allclose(getattr(chunked, name), getattr(d, name), rtol=1e-12, atol=0)
        assert getattr(d, name).shape == (2, 3)


def test_attention_diagnostics_default_scale_and_degenerate() -> None:
    g = gen(12)
    q, k, v = (torch.randn(1, 2, 4, 16, generator=g).half() for _ in range(3))
    d = attention_diagnostics(q, k, v)
    s = q.double() @ k.double().transpose(-1, -2) / 4.0
    assert torch.allclose(d.kappa_softmax, ksm_ref(s), rtol=1e-5)
    q2 = q.clone()
    q2[0, 1, 0, 0] = float("inf")
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 0] = False
    d2 = attention_diagnostics(q2, k, v, mask=mask)
    assert d2.kappa_softmax[0, 0].item() == 0.0 and d2.entropy[0, 0].item() == 0.0
    assert d2.kappa_score[0, 0].item() == 1.0
    assert d2.kappa_softmax[0, 1].item() == math.inf and d2.kappa_score[0, 1].item() == math.inf
    assert d2.entropy[0, 1].item() == math.inf


def test_attention_diagnostics_errors() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"q must have at least 4 dims, got shape \(2, 4, 8\)"):
        attention_diagnostics(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        attention_diagnostics(q, torch.randn(1, 2, 4, 7), q)
    with pytest.raises(ValueError, match="mask"):
        attention_diagnostics(q, q, q, mask=torch.ones(1, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias"):
        attention_diagnostics(q, q, q, bias=torch.ones(3, 4))

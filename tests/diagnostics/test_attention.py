"""Per-call attention diagnostics: kappa_score, the logit maximum, the entropy and
attention_diagnostics, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.diagnostics.conftest import F64, entropy_ref, gen, ksm_ref

from lightning_stability.diagnostics import (
    attention_diagnostics,
    attention_entropy,
    attention_logit_max,
    kappa_score,
    kappa_softmax,
    kappa_v,
)


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


def test_attention_diagnostics_kappa_v_excludes_padded_keys() -> None:
    g = gen(4)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False  # example 1: two padded keys
    v[1, :, 4:] = 50.0
    d = attention_diagnostics(q, k, v, mask=mask)
    for h in range(2):
        sv = torch.linalg.svdvals(v[1, h, :4].double())
        assert math.isclose(d.kappa_v[1, h].item(), (sv[0] / (sv[-1] + 1e-6)).item(), rel_tol=1e-9)
    assert torch.allclose(d.kappa_v[0], kappa_v(v[0]), rtol=1e-12)


def test_entropy_tiny_value_is_resolved() -> None:
    # one dominant key: H = log Z + Σ p_i (max − s_i) ≈ 6.5e-7 nats
    s = torch.tensor([[[[18.3, 0.0, 0.0, 0.0]]]])
    ref = entropy_ref(s, None).item()
    assert 6e-7 < ref < 7e-7
    d = attention_diagnostics(None, None, torch.randn(1, 1, 4, 2), scores=s)
    assert math.isclose(d.entropy.item(), ref, rel_tol=1e-6)  # float32 terms, no cancellation
    # the former float32 formula (max − log p1 − Σ p s) lost it entirely
    p = torch.softmax(s, -1)
    old = (s.amax(-1) - p.amax(-1).log() - (p * s).sum(-1)).clamp_min(0).item()
    assert old == 0.0


def test_entropy_matches_reference_with_mask() -> None:
    g = gen(5)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) * 2 for _ in range(3))
    mask = torch.rand(2, 3, 7, 7, generator=g) > 0.4
    mask[0, 1, 2] = False
    d = attention_diagnostics(q, k, v, mask=mask)
    s = q.double() @ k.double().mT / math.sqrt(8)
    assert torch.allclose(d.entropy, entropy_ref(s, mask), rtol=1e-6, atol=0)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logit_max_exact_and_softcap(softcap: float | None) -> None:
    g = gen(6)
    q, k = torch.randn(2, 3, 9, 16, generator=g) * 3, torch.randn(2, 3, 11, 16, generator=g) * 3
    v = torch.randn(2, 3, 11, 4, generator=g)
    bias = torch.randn(1, 3, 9, 11, generator=g)
    mask = torch.rand(2, 1, 9, 11, generator=g) > 0.3
    mask[1, 0, :, :] = False  # a fully masked example
    d = attention_diagnostics(q, k, v, mask=mask, scale=0.25, bias=bias, softcap=softcap)
    logits = 0.25 * q.double() @ k.double().mT + bias.double()
    ref = logits.abs().masked_fill(~mask, 0).amax((-2, -1))
    assert torch.allclose(d.logit_max, ref, rtol=1e-14, atol=0)  # recomputed in float64
    assert d.logit_max[1].eq(0).all()
    s = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    ref_ksm = kappa_softmax(s, mask)  # float64 input: float64 throughout
    assert torch.allclose(d.kappa_softmax, ref_ksm, rtol=1e-5, atol=0)
    assert torch.allclose(d.entropy, entropy_ref(s, mask), rtol=1e-6, atol=1e-12)
    if softcap is not None:  # capping changes the numbers
        plain = attention_diagnostics(q, k, v, mask=mask, scale=0.25, bias=bias)
        assert not torch.allclose(plain.kappa_softmax, d.kappa_softmax, rtol=1e-3)


def test_logit_max_nonfinite() -> None:
    q, k, v = (torch.ones(1, 1, 3, 2) for _ in range(3))
    q[0, 0, 1, 0] = math.inf
    assert attention_diagnostics(q, k, v).logit_max.item() == math.inf


def test_scores_only_equals_qk_form() -> None:
    g = gen(7)
    q, k, v = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    bias = torch.randn(4, 8, 8, generator=g)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    full = attention_diagnostics(q, k, v, mask=mask, scale=0.5, bias=bias)
    s = (0.5 * q.double() @ k.double().mT + bias.double()).float()
    only = attention_diagnostics(None, None, v, mask=mask, scores=s)
    assert only.kappa_score.isnan().all()  # unknown without Q, K
    for name in ("kappa_softmax", "entropy", "logit_max"):
        assert torch.allclose(getattr(only, name), getattr(full, name), rtol=1e-5, atol=0), name
    assert torch.equal(only.kappa_v, full.kappa_v)
    both = attention_diagnostics(q, k, v, mask=mask, scores=s)
    assert torch.equal(both.kappa_score, full.kappa_score)
    assert torch.equal(both.kappa_softmax, only.kappa_softmax)
    ref = s.double().abs().masked_fill(~mask, 0).amax((-2, -1))
    assert torch.allclose(only.logit_max, ref, rtol=1e-14, atol=0)


def test_extras_errors() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="both q and k"):
        attention_diagnostics(q, None, q)
    with pytest.raises(ValueError, match="q and k, or scores"):
        attention_diagnostics(None, None, q)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        attention_diagnostics(None, None, q, scores=torch.randn(1, 2, 4, 5))
    with pytest.raises(ValueError, match="softcap"):
        attention_diagnostics(q, q, q, softcap=0.0)


def test_attention_logit_max_function_equals_field() -> None:
    g = gen(9)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) * 4 for _ in range(3))
    bias = torch.randn(3, 7, 7, generator=g)
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.5
    d = attention_diagnostics(q, k, v, mask=mask, scale=0.2, bias=bias)
    assert torch.equal(attention_logit_max(q, k, mask, 0.2, bias), d.logit_max)
    ref = (0.2 * q.double() @ k.double().mT + bias.double()).abs().masked_fill(~mask, 0).amax((-2, -1))
    assert torch.allclose(d.logit_max, ref, rtol=1e-14, atol=0)


def test_inputs_that_require_grad_give_the_detached_values() -> None:
    g = gen(5)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 2, 7, 7, generator=g) > 0.3
    d = attention_diagnostics(q, k, v, mask)
    ref = attention_diagnostics(q.detach(), k.detach(), v.detach(), mask)
    for name in ("kappa_score", "kappa_softmax", "kappa_v", "entropy", "logit_max"):
        assert torch.equal(getattr(d, name), getattr(ref, name))
    s = (q @ k.transpose(-1, -2)).requires_grad_(True)
    assert torch.equal(kappa_softmax(s, mask), kappa_softmax(s.detach(), mask))


def test_logit_max_unmasked_two_reductions_match_float64() -> None:
    g = gen(12)
    q, k = torch.randn(2, 2, 9, 5, generator=g), torch.randn(2, 2, 11, 5, generator=g)
    k[1, 0] *= -40.0  # the largest |logit| is negative
    d = attention_diagnostics(q, k, torch.randn(2, 2, 11, 3, generator=g), scale=0.7)
    ref = ((q.to(F64) @ k.to(F64).transpose(-1, -2)) * 0.7).abs().flatten(-2).amax(-1)
    assert torch.allclose(d.logit_max, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inputs_are_left_untouched(dtype: torch.dtype) -> None:
    # float64 (and float32) inputs reach the helpers as views: nothing may write into them.
    g = gen(14)
    q, k, v = (torch.randn(2, 2, 10, 4, generator=g, dtype=dtype) for _ in range(3))
    s = torch.randn(2, 2, 10, 10, generator=g, dtype=dtype) * 5
    mask = torch.rand(2, 2, 10, 10, generator=g) > 0.3
    bias = torch.randn(1, 2, 10, 10, generator=g, dtype=dtype)
    before = [t.clone() for t in (q, k, v, s, bias)]
    attention_diagnostics(q, k, v, mask, bias=bias, softcap=3.0)
    attention_diagnostics(q, k, v, None, scores=s)
    kappa_softmax(s, mask)
    for t, b in zip((q, k, v, s, bias), before, strict=True):
        assert torch.equal(t, b)


def test_kappa_score_is_inf_when_qk_overflows_float32_with_finite_q_and_k() -> None:
    """Finite q, k whose scores overflow float32: kappa_score stays inf (never a 0 that a max
    over heads would hide)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 4, generator=g) for _ in range(3))
    d = attention_diagnostics(q * 1e18, k * 1e18, v)
    assert torch.isinf(d.kappa_score).all() and torch.isinf(d.kappa_softmax).all()
    ok = attention_diagnostics(q, k, v)
    assert (ok.kappa_score >= 1).all() and torch.isfinite(ok.kappa_score).all()


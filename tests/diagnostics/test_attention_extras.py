"""attention_diagnostics extras of issue 10: logit_max, soft-capping, scores-only calls,
kappa_v over attended keys, float64 entropy — each against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stability.diagnostics import attention_diagnostics, attention_logit_max, kappa_softmax, kappa_v

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def entropy_ref(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean row entropy over rows with a kept key, float64, written out per row."""
    s = s.to(F64)
    flat = s.reshape(-1, *s.shape[-2:])
    m = None if mask is None else mask.expand(s.shape).reshape(flat.shape)
    out = torch.zeros(flat.shape[0], dtype=F64)
    for g in range(flat.shape[0]):
        hs = []
        for i in range(flat.shape[1]):
            row = flat[g, i] if m is None else flat[g, i][m[g, i]]
            if row.numel():
                p = torch.softmax(row, -1)
                hs.append(-torch.special.xlogy(p, p).sum().item())
        out[g] = sum(hs) / len(hs) if hs else 0.0
    return out.reshape(s.shape[:-2])


# ------------------------------------------------------------------ kappa_v over attended keys
@pytest.mark.parametrize(("n", "d", "kept"), [(12, 4, 7), (12, 8, 5), (5, 8, 3), (6, 6, 6), (9, 4, 1)])
def test_kappa_v_drops_masked_rows(n: int, d: int, kept: int) -> None:
    g = gen(n * 100 + d * 10 + kept)
    v = torch.randn(3, n, d, generator=g)
    v[:, -1] *= 1e3  # the padded rows hold huge values: they must not count
    keys = torch.zeros(3, n, dtype=torch.bool)
    for b in range(3):
        keys[b, torch.randperm(n - 1, generator=g)[:kept]] = True
    got = kappa_v(v, key_mask=keys)
    for b in range(3):
        sv = torch.linalg.svdvals(v[b][keys[b]].double())  # min(kept, d) values, rows dropped
        assert math.isclose(got[b].item(), max(1.0, (sv[0] / (sv[-1] + 1e-6)).item()), rel_tol=1e-9)
    assert torch.equal(kappa_v(v, key_mask=torch.ones(n, dtype=torch.bool)), kappa_v(v))


def test_kappa_v_key_mask_ill_conditioned_and_degenerate() -> None:
    g = gen(3)
    u, _ = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=F64))
    v = u @ torch.diag(torch.tensor([1.0, 1e-1, 1e-3, 1e-5], dtype=F64))  # κ = 1e5: SVD fallback
    keys = torch.ones(10, dtype=torch.bool)
    keys[[2, 7]] = False
    sv = torch.linalg.svdvals(v[keys])
    assert math.isclose(kappa_v(v, key_mask=keys).item(), (sv[0] / (sv[-1] + 1e-6)).item(), rel_tol=1e-9)
    keys3 = torch.zeros(10, dtype=torch.bool)
    keys3[:3] = True  # 3 kept rows < d = 4: σmin is the 3rd singular value, not a 0
    sv3 = torch.linalg.svdvals(v[:3])
    assert math.isclose(kappa_v(v, key_mask=keys3).item(), (sv3[0] / (sv3[-1] + 1e-6)).item(), rel_tol=1e-9)
    assert kappa_v(v, key_mask=torch.zeros(10, dtype=torch.bool)).item() == 1.0
    v_inf = v.clone()
    v_inf[2, 0] = math.inf  # non-finite only in a masked row: ignored
    assert math.isfinite(kappa_v(v_inf, key_mask=keys).item())
    assert kappa_v(v_inf).item() == math.inf
    with pytest.raises(ValueError, match="key_mask"):
        kappa_v(v, key_mask=torch.ones(3, dtype=torch.bool))


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


# ------------------------------------------------------------------ entropy without cancellation
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


# ------------------------------------------------------------------ logit_max
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


# ------------------------------------------------------------------ scores-only calls
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


def test_kappa_v_sigma_min_below_rounding_counts_as_zero() -> None:
    """Two equal token rows (a repeated token): σmin is rounding noise, κ = σmax/ridge exactly."""
    g = gen(8)
    v = torch.randn(6, 8, generator=g)
    v[3] = v[2]
    noisy = v.clone()
    noisy[3] = torch.nextafter(v[3], torch.full_like(v[3], math.inf))  # one ulp apart
    smax = torch.linalg.svdvals(v.double())[0].item()
    for x in (v, noisy):
        sv = torch.linalg.svdvals(x.double())
        assert sv[-1].item() <= math.sqrt(6) * 2**-24 * sv[0].item()  # below V's own rounding
        assert math.isclose(kappa_v(x).item(), max(1.0, sv[0].item() / 1e-6), rel_tol=1e-12)
    assert math.isclose(kappa_v(noisy).item(), smax / 1e-6, rel_tol=1e-6)
    # float64 input keeps a σmin of 1e-9 (far above float64 rounding)
    w = torch.diag(torch.tensor([1.0, 1e-9], dtype=F64))
    assert math.isclose(kappa_v(w).item(), 1.0 / (1e-9 + 1e-6), rel_tol=1e-12)


def test_attention_logit_max_function_equals_field() -> None:
    g = gen(9)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) * 4 for _ in range(3))
    bias = torch.randn(3, 7, 7, generator=g)
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.5
    d = attention_diagnostics(q, k, v, mask=mask, scale=0.2, bias=bias)
    assert torch.equal(attention_logit_max(q, k, mask, 0.2, bias), d.logit_max)
    ref = (0.2 * q.double() @ k.double().mT + bias.double()).abs().masked_fill(~mask, 0).amax((-2, -1))
    assert torch.allclose(d.logit_max, ref, rtol=1e-14, atol=0)

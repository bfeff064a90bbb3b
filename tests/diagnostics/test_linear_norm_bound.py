"""Linear conditioning, norm diagnostics, the ε bump and the unified bound (SPEC §2–§4, §6, §8)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stability.diagnostics import (
    UnifiedBound,
    combined_predictor,
    condition_from_singular_values,
    condition_number,
    eps_mach,
    kappa_wkwq,
    ln_error_coefficient,
    ln_error_coefficient_from_variance,
    propose_ln_eps,
    propose_ln_eps_from_variance,
    residual_gain,
    rho_ln,
    rho_ln_from_variance,
    spectral_norm,
    token_variance,
    unified_bound,
    wkwq_norm,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_eps_mach() -> None:
    assert eps_mach(torch.float32) == 2.0**-23
    assert eps_mach(torch.float16) == 2.0**-10
    with pytest.raises(ValueError, match="dtype"):
        eps_mach(torch.int32)


# ------------------------------------------------------------------ linear
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


# ------------------------------------------------------------------ norms
def test_token_variance_and_rho() -> None:
    x = torch.randn(4, 6, 32, generator=gen(3)).half()
    var = token_variance(x)
    assert var.dtype == F64 and torch.allclose(var, x.double().var(-1, unbiased=False))
    assert torch.allclose(token_variance(x, rms=True), x.double().square().mean(-1))
    r = rho_ln(x, 1e-5, 2.0**-10)
    assert torch.allclose(r, var / 1e-5 * 32 * 2.0**-10)
    assert rho_ln_from_variance(1e-3, 32, 1e-5, 2.0**-7) == pytest.approx(1e-3 / 1e-5 * 32 * 2.0**-7)


def test_ln_error_coefficient_regimes() -> None:
    x = torch.randn(9, 16, generator=gen(4), dtype=F64) * 1e-3
    var = token_variance(x).median().item()
    expect = math.sqrt(var / 1e-5) + var / 1e-5 + 1.0
    assert ln_error_coefficient(x, 1e-5) == pytest.approx(expect, rel=1e-12)
    assert ln_error_coefficient(x, 1e-5, 2.0, 3.0, 0.5) == pytest.approx(
        2 * math.sqrt(var / 1e-5) + 3 * var / 1e-5 + 0.5, rel=1e-12)
    # rho < 1 (ε-dominated): Proposition 1 applies
    assert ln_error_coefficient(x, 1e-5, eps_mach=2.0**-10) == pytest.approx(expect, rel=1e-12)
    big = x * 1e3  # rho ≥ 1: c3 alone
    assert ln_error_coefficient(big, 1e-5, c3=0.7, eps_mach=2.0**-10) == 0.7
    assert ln_error_coefficient_from_variance(float("inf"), 1e-5) == math.inf
    with pytest.raises(ValueError, match="d is required"):
        ln_error_coefficient_from_variance(1.0, 1e-5, eps_mach=1e-3)
    with pytest.raises(ValueError, match="eps"):
        ln_error_coefficient_from_variance(1.0, 0.0)


def test_propose_ln_eps_algorithm_1() -> None:
    em, d = 2.0**-10, 64
    # rho = var·d·em/eps
    assert propose_ln_eps_from_variance(1.0, d, 1e-5, em) == 1e-5  # rho ≥ 1: unchanged
    var = 0.8 * 1e-5 / (d * em)  # rho = 0.8 → eps_new = eps·0.8/0.6
    assert propose_ln_eps_from_variance(var, d, 1e-5, em) == pytest.approx(1e-5 * 0.8 / 0.6)
    var = 0.3 * 1e-5 / (d * em)  # rho = 0.3 → candidate smaller: unchanged (monotone)
    assert propose_ln_eps_from_variance(var, d, 1e-5, em) == 1e-5
    def bump(rho: float, eps: float, **kw: float) -> float:
        return propose_ln_eps_from_variance(rho * eps / (d * em), d, eps, em, **kw)

    assert bump(0.95, 0.09) == 0.09  # candidate 0.1425 clipped to eps_max 0.01 < eps: unchanged
    assert bump(0.9, 5e-3) == pytest.approx(7.5e-3)
    assert bump(0.99, 5e-3, target_rho=0.1) == 1e-2  # clipped at eps_max
    assert bump(0.9, 1e-8) == 1e-6  # clipped at eps_min
    x = torch.randn(5, d, generator=gen(5), dtype=F64)
    v = token_variance(x).median().item()
    eps = v * d * em / 0.8
    assert propose_ln_eps(x, eps, em) == propose_ln_eps_from_variance(v, d, eps, em)
    with pytest.raises(ValueError, match="eps_min"):
        propose_ln_eps_from_variance(1.0, d, 1e-5, em, eps_min=1.0, eps_max=0.1)


# ------------------------------------------------------------------ predictor and bound
def test_combined_predictor_floats_and_tensors() -> None:
    assert combined_predictor(0.5, 1.0, 2.0, 3.0, 4.0, 1.0) == 11.0
    t = torch.tensor([0.5, 1.0])
    assert combined_predictor(t, t, t, t, t, t).tolist() == [1.1875, 4.0]


def _dense_sigma(f: torch.nn.Module, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(f, x).reshape(x.numel(), -1)
    return torch.linalg.svdvals(jac.double())[0].item()


def test_residual_gain_linear_and_mlp_under_no_grad() -> None:
    g = gen(6)
    a = torch.randn(6, 6, generator=g, dtype=F64)
    u, _, vh = torch.linalg.svd(a)
    a = u @ torch.diag(torch.tensor([3.0, 1.5, 1.0, 0.5, 0.2, 0.1], dtype=F64)) @ vh
    x = torch.randn(6, generator=g, dtype=F64)
    state = torch.get_rng_state()
    with torch.no_grad():
        est = residual_gain(lambda z: z @ a.T, x, iters=40, generator=gen(7))
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert est == pytest.approx(3.0, rel=1e-10)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).double()
    for p in mlp.parameters():
        p.requires_grad_(True)
    xm = torch.randn(3, 8, generator=g, dtype=F64)
    ref = _dense_sigma(mlp, xm)
    with torch.no_grad():
        est = residual_gain(mlp, xm, iters=200, generator=gen(8))
        est3 = residual_gain(mlp, xm, generator=gen(8))
    assert est == pytest.approx(ref, rel=1e-6)
    assert est3 <= ref * (1 + 1e-9) and est3 > 0.5 * ref  # power iteration: a lower bound
    assert residual_gain(lambda z: z * 0.0, x) == 0.0
    assert residual_gain(mlp, xm, generator=gen(8)) == est3  # reproducible from the generator
    with pytest.raises(ValueError, match="iters"):
        residual_gain(mlp, xm, iters=0)


def _bound_loops(terms: list[float], rho: list[float], em: float, rigorous: bool) -> float:
    total = 0.0
    for layer, t in enumerate(terms):
        prod = 1.0
        for k in range(layer + 1, len(rho)):
            prod *= (1 + rho[k]) / (1 - rho[k]) if rigorous else (1 + rho[k])
        total += t * prod
    return em * total


def test_unified_bound_matches_loops() -> None:
    g = gen(9)
    n = 5
    ke, wo, ks, sc, kv, cl = (torch.rand(n, generator=g, dtype=F64) * 3 + 0.5 for _ in range(6))
    rho = torch.rand(n, generator=g, dtype=F64) * 0.9
    b = unified_bound(ke, wo, ks, sc, kv, cl, rho, 2.0**-7, c=0.5)
    terms = (ke + wo + ks * (1 + 0.5 * sc) * kv + cl).tolist()
    assert isinstance(b, UnifiedBound) and b.small_gain
    assert torch.allclose(b.per_layer, torch.tensor(terms, dtype=F64))
    assert b.first_order == pytest.approx(_bound_loops(terms, rho.tolist(), 2.0**-7, False), rel=1e-12)
    assert b.rigorous == pytest.approx(_bound_loops(terms, rho.tolist(), 2.0**-7, True), rel=1e-12)
    # ρ ≥ 1 for a layer entering a product: rigorous is inf, first order finite, small gain off
    rho2 = rho.clone()
    rho2[2] = 1.5
    b2 = unified_bound(ke, wo, ks, sc, kv, cl, rho2, 2.0**-7)
    assert b2.rigorous == math.inf and math.isfinite(b2.first_order) and not b2.small_gain
    # ρ_0 never enters a product
    rho3 = rho.clone()
    rho3[0] = 2.0
    b3 = unified_bound(ke.tolist(), wo, ks, sc, kv, cl, rho3, 2.0**-7)
    assert math.isfinite(b3.rigorous) and not b3.small_gain
    nan = ke.clone()
    nan[1] = float("nan")
    assert unified_bound(nan, wo, ks, sc, kv, cl, rho, 1e-3).first_order == math.inf
    with pytest.raises(ValueError, match="kappa_wo has 4 layers, expected 5"):
        unified_bound(ke, wo[:4], ks, sc, kv, cl, rho, 1e-3)


@pytest.mark.parametrize("cond", [1.0, 50.0, 1e3, 1e5, 1e9, math.inf])
def test_extreme_singular_values_match_svdvals_at_any_conditioning(cond: float) -> None:
    from lightning_stability.diagnostics import extreme_singular_values

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

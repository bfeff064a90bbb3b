"""The combined predictor, residual gains and the unified bound."""

from __future__ import annotations

import math

import pytest
import torch
from tests.diagnostics.conftest import F64, gen

from lightning_stability.diagnostics import (
    UnifiedBound,
    combined_predictor,
    residual_gain,
    unified_bound,
)


def _dense_sigma(f: torch.nn.Module, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(f, x).reshape(x.numel(), -1)
    return torch.linalg.svdvals(jac.double())[0].item()


def _bound_loops(terms: list[float], rho: list[float], em: float, rigorous: bool) -> float:
    total = 0.0
    for layer, t in enumerate(terms):
        prod = 1.0
        for k in range(layer + 1, len(rho)):
            prod *= (1 + rho[k]) / (1 - rho[k]) if rigorous else (1 + rho[k])
        total += t * prod
    return em * total


def test_combined_predictor_floats_and_tensors() -> None:
    assert combined_predictor(0.5, 1.0, 2.0, 3.0, 4.0, 1.0) == 11.0
    t = torch.tensor([0.5, 1.0])
    assert combined_predictor(t, t, t, t, t, t).tolist() == [1.1875, 4.0]


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


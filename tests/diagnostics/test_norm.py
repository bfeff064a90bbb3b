"""Normalization-layer diagnostics: token variance, ρ_LN, C_LN and the proposed ε."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from tests.diagnostics.conftest import F64, gen

from lightning_stability.diagnostics import (
    ln_error_coefficient,
    ln_error_coefficient_from_variance,
    propose_ln_eps,
    propose_ln_eps_from_variance,
    rho_ln,
    rho_ln_from_variance,
    token_variance,
)


def exact_variance(row: list[float], rms: bool) -> float:
    """The biased variance (or mean square) of float values, in exact rational arithmetic."""
    vals = [Fraction(v) for v in row]
    mean = Fraction(0) if rms else sum(vals) / len(vals)
    return float(sum((v - mean) ** 2 for v in vals) / len(vals))


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


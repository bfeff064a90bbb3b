"""θ(p) = 4m(1−m) and the ∞→1 softmax-Jacobian norm against brute force (Emadi 2026, SPEC §8)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.diagnostics.conftest import F64, gen

from lightning_stability.diagnostics import (
    balanced_mass_per_head,
    softmax_jacobian_inf1_norm,
    theta_balanced_mass,
)


def theta_brute(p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """max over all 2ⁿ subsets of 4m(1−m), m = Σ_{i∈S} p_i over the kept entries (float64)."""
    p = p.to(F64)
    if mask is not None:
        p = torch.where(mask, p, 0.0)
    n = p.shape[-1]
    subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=F64)
    m = p @ subsets.T
    return (4.0 * m * (1.0 - m)).amax(-1)


def inf1_brute(p: torch.Tensor, tau: float) -> float:
    """‖(Diag(p) − ppᵀ)/τ‖_{∞→1}: max of ‖Jx‖₁ over the vertices x ∈ {±1}ⁿ of the ∞-ball."""
    j = (torch.diag(p) - torch.outer(p, p)) / tau
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=p.shape[0])), dtype=F64)
    return (signs @ j.T).abs().sum(-1).max().item()


def check_against_brute(p: torch.Tensor, mask: torch.Tensor | None = None, half_bits: int = 12) -> None:
    r = theta_balanced_mass(p, mask, half_bits=half_bits)
    ref = theta_brute(p, mask)
    assert bool((r.theta <= ref + 1e-14).all()), (r.theta, ref)
    assert bool((r.upper >= ref - 1e-14).all()), (r.upper, ref)
    assert bool((r.upper >= r.theta).all())
    if bool(r.exact.any()):
        assert (r.theta[r.exact] - ref[r.exact]).abs().max().item() <= 1e-12


# --------------------------------------------------------------------------- small rows: brute force
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0, 50.0])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 13])
def test_theta_matches_brute_force(scale: float, n: int) -> None:
    p = torch.softmax(torch.randn(100, n, generator=gen(n), dtype=F64) * scale, -1)
    check_against_brute(p)
    # n ≤ 2·half_bits: the top entries are all of the row, so every row is enumerated exactly.
    assert bool(theta_balanced_mass(p).exact.all())


@pytest.mark.parametrize("half_bits", [1, 2, 3])
def test_bounds_hold_when_enumeration_is_partial(half_bits: int) -> None:
    # Top 2·half_bits entries enumerated, the rest only as a block: bounds must still hold.
    p = torch.cat(
        [torch.softmax(torch.randn(200, 12, generator=gen(half_bits), dtype=F64) * s, -1) for s in (0.3, 3.0)]
    )
    check_against_brute(p, half_bits=half_bits)
    r = theta_balanced_mass(p, half_bits=half_bits)
    assert r.exact.float().mean().item() > 0.3  # partial enumeration still settles many rows


@settings(max_examples=150, deadline=None)
@given(
    w=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=11),
    keep=st.lists(st.booleans(), min_size=11, max_size=11),
    half_bits=st.sampled_from([1, 2, 12]),
)
def test_theta_hypothesis(w: list[float], keep: list[bool], half_bits: int) -> None:
    x = torch.tensor(w, dtype=F64)
    p = x / x.sum() if x.sum() > 0 else x
    mask = torch.tensor(keep[: len(w)])
    check_against_brute(p.unsqueeze(0), half_bits=half_bits)
    check_against_brute(p.unsqueeze(0), mask.unsqueeze(0), half_bits=half_bits)


def test_special_rows() -> None:
    rows = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # one-hot → 0
            [0.25, 0.25, 0.25, 0.25],  # uniform, even n → a half exists → 1
            [0.7, 0.1, 0.1, 0.1],  # p_max ≥ ½ → 4·0.7·0.3
            [0.5, 0.3, 0.2, 0.0],  # {0.5} → 1
            [0.0, 0.0, 0.0, 0.0],  # no mass → 0 (empty set)
        ],
        dtype=F64,
    )
    r = theta_balanced_mass(rows)
    assert torch.allclose(r.theta, torch.tensor([0.0, 1.0, 0.84, 1.0, 0.0], dtype=F64), atol=1e-15, rtol=0)
    assert bool(r.exact.all())
    third = theta_balanced_mass(torch.full((3,), 1.0 / 3.0))  # uniform, odd n → m = 1/3 → 8/9
    assert third.theta.item() == pytest.approx(8.0 / 9.0, abs=1e-7)
    bad = theta_balanced_mass(torch.tensor([[0.5, float("nan")], [0.5, float("inf")], [1.5, -0.5]]))
    assert torch.isinf(bad.theta).all() and not bool(bad.exact.any())


def test_mask_drops_entries_and_matches_shorter_row() -> None:
    p = torch.softmax(torch.randn(4, 3, 8, generator=gen(3)) * 2.0, -1)
    mask = torch.rand(4, 1, 8, generator=gen(4)) > 0.3
    r = theta_balanced_mass(p, mask)
    for b in range(4):
        kept = p[b][:, mask[b, 0]]
        assert torch.allclose(r.theta[b], theta_balanced_mass(kept).theta, atol=1e-15, rtol=0)
    check_against_brute(p.reshape(-1, 8), mask.expand(4, 3, 8).reshape(-1, 8))
    # A NaN on a masked position does not matter.
    p_nan = p.clone()
    p_nan[~mask.expand_as(p)] = float("nan")
    assert torch.equal(theta_balanced_mass(p_nan, mask).theta, r.theta)


# --------------------------------------------------------------------------- long rows
@pytest.mark.parametrize(
    ("n", "scale", "share"),
    [
        (65, 0.1, 0.95),
        (65, 1.0, 1.0),
        (65, 5.0, 1.0),
        (256, 1.0, 1.0),
        (256, 4.0, 1.0),
        (1024, 1.0, 1.0),
        (1024, 4.0, 1.0),
    ],
)
def test_long_softmax_rows_exact(n: int, scale: float, share: float) -> None:
    p = torch.softmax(torch.randn(64, n, generator=gen(n), dtype=F64) * scale, -1)
    r = theta_balanced_mass(p)
    assert bool((r.upper >= r.theta).all()) and bool(((r.theta >= 0) & (r.upper <= 1)).all())
    assert r.exact.float().mean().item() >= share
    assert (r.upper - r.theta).max().item() <= 1e-9
    # p_max ≥ ½ has the closed form 4·p_max·(1 − p_max) (every sum is ≥ p_max or ≤ 1 − p_max).
    pm = p.amax(-1)
    big = pm >= 0.5
    assert torch.allclose(r.theta[big], 4 * pm[big] * (1 - pm[big]), atol=1e-12, rtol=0)
    assert bool(r.exact[big].all())


def test_long_row_with_known_half() -> None:
    # Two identical copies of a random row: the first copy holds half of the mass, θ = 1.
    w = torch.rand(8, 1024, generator=gen(7), dtype=F64) ** 3
    p = torch.cat([w, w], -1)
    p = p / p.sum(-1, keepdim=True)
    r = theta_balanced_mass(p)
    assert bool(r.exact.all()) and (1.0 - r.theta).abs().max().item() <= 1e-12


def test_long_peaked_row_gap_is_exact() -> None:
    # Two large entries and a thin tail: ½ lies in a gap between reachable sums.
    tail = torch.full((1000,), 0.02 / 1000, dtype=F64)
    p = torch.cat([torch.tensor([0.62, 0.36], dtype=F64), tail])
    r = theta_balanced_mass(p)
    # closest sums to ½: 0.36 + 0.02 = 0.38 (d = 0.12) or 0.62 (d = 0.12)
    assert r.exact.item() and r.theta.item() == pytest.approx(1 - 4 * 0.12**2, abs=1e-12)


def test_near_uniform_odd_row_is_exact_from_subset_sizes() -> None:
    # n = 101 nearly equal entries: 50 of them hold < ½, 51 hold > ½, so no subset is closer
    # than the 50 largest or the 51 smallest.
    z = torch.randn(6, 101, generator=gen(9), dtype=F64)
    p = torch.softmax(1e-3 * z, -1)
    s = p.sort(-1, descending=True).values
    d = torch.minimum(0.5 - s[:, :50].sum(-1), s[:, 50:].sum(-1) - 0.5)
    assert bool((d > 0).all())
    r = theta_balanced_mass(p)
    assert bool(r.exact.all()) and torch.allclose(r.theta, 1 - 4 * d * d, atol=1e-13, rtol=0)


# --------------------------------------------------------------------------- ∞→1 norm and per-head
@pytest.mark.parametrize("tau", [0.5, 1.0, 8.0])
def test_inf1_norm_matches_sign_vector_brute_force(tau: float) -> None:
    p = torch.softmax(torch.randn(30, 7, generator=gen(11), dtype=F64) * 2.0, -1)
    got = softmax_jacobian_inf1_norm(p, tau=tau)
    ref = torch.tensor([inf1_brute(row, tau) for row in p], dtype=F64)
    assert (got - ref).abs().max().item() <= 1e-12
    assert bool((got <= 1.0 / tau + 1e-15).all())


def test_per_head_reductions() -> None:
    p = torch.softmax(torch.randn(2, 3, 5, 6, generator=gen(5)) * 3.0, -1)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, 0, 2] = False  # an all-masked query row drops out of the reduction
    mask[1, 0, :, 4:] = False
    rows = theta_balanced_mass(p, mask).theta
    valid = mask.any(-1).expand(2, 3, 5)
    for red, fn in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        got = balanced_mass_per_head(p, mask, reduction=red)  # type: ignore[arg-type]
        for b, h in itertools.product(range(2), range(3)):
            assert got[b, h].item() == pytest.approx(fn(rows[b, h][valid[b, h]]).item(), abs=1e-15)
    empty = balanced_mass_per_head(p, torch.zeros(1, 1, 1, 6, dtype=torch.bool), reduction="min")
    assert torch.equal(empty, torch.zeros(2, 3, dtype=F64))


def test_bad_arguments() -> None:
    p = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="half_bits"):
        theta_balanced_mass(p, half_bits=0)
    with pytest.raises(ValueError, match="tau"):
        softmax_jacobian_inf1_norm(p, tau=0.0)
    with pytest.raises(ValueError, match="reduction"):
        balanced_mass_per_head(p, reduction="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        theta_balanced_mass(p, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating"):
        theta_balanced_mass(torch.ones(2, 4, dtype=torch.long))

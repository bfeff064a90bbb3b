"""Extreme singular values with error bounds (``diagnostics.extremal``) against float64 ``svdvals``.

Every route is checked on the same cases: the value is within its reported bound of the true
singular value, the bound meets the tolerance where the route claims it, and κ = σmax/σmin is
within the package's documented 1e-4 of the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stability.diagnostics import extremal
from lightning_stability.diagnostics.extremal import (
    KRYLOV_MIN_N,
    MIXED_MIN_N,
    RTOL,
    certify,
    gram,
    largest_singular_value,
    singular_value_bounds,
)

F64 = torch.float64
KAPPA_TOL = 1e-4  # the package's documented tolerance on κ and ‖W‖₂


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(s: torch.Tensor, m: int, seed: int, batch: int = 1) -> torch.Tensor:
    """``(batch, m, n)`` matrices ``U diag(s) Vᵀ`` with random orthonormal ``U``, ``V`` (``n = len(s)``)."""
    n = s.shape[-1]
    u = torch.linalg.qr(torch.randn(batch, m, n, generator=gen(seed), dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(batch, n, n, generator=gen(seed + 1), dtype=F64)).Q
    return (u * s) @ v.mT


@pytest.fixture(params=["dense", "iterative"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the dense routes, and again with every matrix of 16+ columns on the
    iterative ones (Krylov σmax, mixed σmin), so small matrices exercise both."""
    low = 10**9 if request.param == "dense" else 16
    monkeypatch.setattr(extremal, "KRYLOV_MIN_N", low)
    monkeypatch.setattr(extremal, "MIXED_MIN_N", low)
    monkeypatch.setattr(extremal, "SQUARE_MIN_N", low)
    return str(request.param)


def check_both(w: torch.Tensor, certified: bool = True) -> None:
    """``singular_value_bounds(w)`` against ``svdvals``: within the bounds, κ within KAPPA_TOL."""
    ref = torch.linalg.svdvals(w)
    hi, lo, e_hi, e_lo = singular_value_bounds(w)
    assert ((hi - ref[:, 0]).abs() <= e_hi).all(), (hi, ref[:, 0], e_hi)
    assert ((lo - ref[:, -1]).abs() <= e_lo).all(), (lo, ref[:, -1], e_lo)
    if certified:
        assert (e_hi <= RTOL * hi).all() and (e_lo <= RTOL * lo).all()
        kappa, ref_kappa = hi / lo, ref[:, 0] / ref[:, -1]
        assert ((kappa - ref_kappa).abs() <= KAPPA_TOL * ref_kappa).all()


def check_top(w: torch.Tensor) -> None:
    ref = torch.linalg.svdvals(w)[:, 0]
    smax, err = largest_singular_value(w)
    assert ((smax - ref).abs() <= err).all(), (smax, ref, err)
    assert (err <= RTOL * smax).all()
    assert ((smax - ref).abs() <= KAPPA_TOL * ref).all()


@pytest.mark.parametrize(("m", "n"), [(96, 40), (40, 96), (300, 200), (200, 300), (250, 250)])
def test_gaussian_matrices(route: str, m: int, n: int) -> None:
    """Random Gaussian stacks: tall, wide and square."""
    w = torch.randn(3, m, n, generator=gen(m * 7 + n), dtype=F64) / math.sqrt(max(m, n))
    check_both(w)
    check_top(w)


def test_gaussian_matrices_at_the_default_thresholds() -> None:
    """Sizes past the default thresholds (Krylov σmax, mixed σmin) without patching them."""
    n = MIXED_MIN_N
    assert n >= KRYLOV_MIN_N
    w = torch.randn(1, n + 200, n, generator=gen(1), dtype=F64) / math.sqrt(n)
    check_both(w)
    check_both(w.mT)
    check_top(w)


@pytest.mark.parametrize("kappa", [10.0, 100.0, 1e3, 1e4, 1e6])
@pytest.mark.parametrize("n", [40, 150])
def test_ill_conditioned_log_spectra(route: str, kappa: float, n: int) -> None:
    """Singular values spread evenly in log from 1 to 1/κ (dense near the bottom: small gaps)."""
    s = torch.logspace(0, -math.log10(kappa), n, dtype=F64)
    w = with_spectrum(s, int(1.4 * n), seed=int(kappa) + n, batch=2)
    check_both(w)
    check_both(w.mT)
    check_top(w)


def test_rank_deficient_matrices_report_a_zero_smallest_value_within_the_bound(route: str) -> None:
    for n in (60, 200):
        s = torch.linspace(1.0, 0.5, n, dtype=F64)
        s[-3:] = 0.0
        w = with_spectrum(s, n + 40, seed=n)
        ref = torch.linalg.svdvals(w)
        hi, lo, e_hi, e_lo = singular_value_bounds(w)
        assert (lo <= e_lo).all() and (e_lo <= 1e-12 * hi).all()  # σmin = 0 within the bound
        assert (hi / lo > 1e10).all()
        assert ((hi - ref[:, 0]).abs() <= e_hi).all()
        check_top(w)


def test_batched_agrees_with_one_by_one_and_falls_back_per_matrix(route: str) -> None:
    """A stack mixing well- and ill-conditioned matrices: each falls back (or not) on its own, and
    agrees with the result of solving it alone within their bounds (a batch iterates until its
    slowest member converges, so the others may take a few more steps: not bitwise equal)."""
    good = torch.randn(1, 260, 200, generator=gen(5), dtype=F64) / 16
    bad = with_spectrum(torch.logspace(0, -6, 200, dtype=F64), 260, seed=6)
    both = torch.cat([good, bad, good.flip(-1)])
    hi, lo, e_hi, e_lo = singular_value_bounds(both)
    smax, err = largest_singular_value(both)
    for k in range(3):
        a_hi, a_lo, a_e_hi, a_e_lo = singular_value_bounds(both[k : k + 1])
        assert (hi[k] - a_hi[0]).abs() <= e_hi[k] + a_e_hi[0]
        assert (lo[k] - a_lo[0]).abs() <= e_lo[k] + a_e_lo[0]
        a_smax, a_err = largest_singular_value(both[k : k + 1])
        assert (smax[k] - a_smax[0]).abs() <= err[k] + a_err[0]
    check_both(both)
    check_top(both)


def test_adversarial_spectra(route: str) -> None:
    n, m = 200, 280
    cases = {
        "all equal (Krylov breaks down at once)": torch.full((n,), 0.7, dtype=F64),
        "top pair 1e-9 apart": torch.cat([torch.tensor([1.0 + 1e-9, 1.0]), torch.linspace(0.9, 0.1, n - 2)]),
        "bottom pair 1e-9 apart": torch.cat(
            [torch.linspace(1.0, 0.2, n - 2), torch.tensor([0.1 + 1e-9, 0.1])]
        ),
        "one outlier on top": torch.cat([torch.tensor([1e6]), torch.linspace(1.0, 0.5, n - 1)]),
        "one outlier at the bottom": torch.cat([torch.linspace(1.0, 0.5, n - 1), torch.tensor([1e-3])]),
        "two clusters": torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), 1e-2)]),
    }
    for k, s in enumerate(cases.values()):
        w = with_spectrum(s.to(F64), m, seed=100 + k)
        check_both(w)
        check_top(w)
    check_both(torch.eye(n, dtype=F64)[None] * 3.0)  # an exact invariant subspace from any start
    zero = torch.zeros(2, 200, 150, dtype=F64)
    assert all((t == 0).all() for t in singular_value_bounds(zero))
    assert all((t == 0).all() for t in largest_singular_value(zero))


def test_a_singular_vector_orthogonal_to_a_fixed_start_block_is_still_found(route: str) -> None:
    """Krylov never finds a direction its start block has no component along; the start block is
    seeded by a hash of the matrix, so a matrix built against any fixed block is still solved
    (the top singular vector here is orthogonal to the block a fixed seed would give)."""
    n = 300
    fixed = torch.randn(extremal.BLOCK, n, generator=gen(extremal.SEED), dtype=F64)
    basis = torch.linalg.qr(fixed.T).Q
    v1 = torch.randn(n, generator=gen(1), dtype=F64)
    v1 = v1 - basis @ (basis.T @ v1)
    v = torch.linalg.qr(torch.cat([v1[:, None], torch.randn(n, n - 1, generator=gen(2), dtype=F64)], 1)).Q
    s = torch.linspace(1.0, 0.1, n, dtype=F64)
    s[0] = 1.01
    u = torch.linalg.qr(torch.randn(n, n, generator=gen(3), dtype=F64)).Q
    w = ((u * s) @ v.T)[None]
    assert (v[:, 0] @ basis).abs().max() < 1e-12
    check_top(w)
    check_both(w)


def test_tiny_and_degenerate_shapes(route: str) -> None:
    for m, n in [(1, 1), (1, 5), (5, 1), (2, 3), (8, 8)]:
        w = torch.randn(4, m, n, generator=gen(m + n), dtype=F64)
        check_both(w)
        check_top(w)
    hi, lo, *_ = singular_value_bounds(torch.empty(0, 5, 4, dtype=F64))
    assert hi.shape == lo.shape == (0,)
    assert singular_value_bounds(torch.empty(2, 0, 4, dtype=F64))[0].tolist() == [0.0, 0.0]


def test_float32_weights(route: str) -> None:
    """Weights stored in float32 (as a model's are): the reference is their exact float64 value."""
    w = (torch.randn(2, 260, 200, generator=gen(9)) / 16).to(torch.float32)
    check_both(w.to(F64))
    hi, lo, _, _ = singular_value_bounds(w)
    ref = torch.linalg.svdvals(w.to(F64))
    assert ((hi / lo - ref[:, 0] / ref[:, -1]).abs() <= KAPPA_TOL * ref[:, 0] / ref[:, -1]).all()


def test_certify_bounds_hold_for_poor_subspaces() -> None:
    """The certificate bounds the distance to SOME singular value even for an unconverged
    subspace (it is only small when the subspace is good)."""
    s = torch.linspace(2.0, 0.5, 200, dtype=F64)
    w = with_spectrum(s, 260, seed=11)
    ref = torch.linalg.svdvals(w)[0]
    for p in (2, 5, 20):
        x = torch.randn(1, 200, p, generator=gen(p), dtype=F64)
        hi, lo, e_hi, e_lo = certify(w, x)
        assert (ref - hi).abs().min() <= e_hi[0] and (ref - lo).abs().min() <= e_lo[0]
        assert ref[0] >= hi[0] - 1e-12 and ref[-1] <= lo[0] + 1e-12  # Rayleigh–Ritz never passes the ends


def test_gram_equals_the_full_product() -> None:
    w = torch.randn(3, 300, 257, generator=gen(4), dtype=F64)
    for blocks in (1, 2, 3, 4):
        g = gram(w, blocks)
        torch.testing.assert_close(g, w.mT @ w, rtol=1e-13, atol=1e-11)
        assert torch.equal(g, g.mT)


def test_llama_weights_from_a_config() -> None:
    """A transformers Llama at random init: every FFN κ and ‖W_O‖₂ (the probe's weight terms)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    layer = transformers.LlamaForCausalLM(cfg).model.layers[0]
    ffn = torch.stack([p.weight.detach() for p in (layer.mlp.gate_proj, layer.mlp.up_proj)]).to(F64)
    check_both(ffn)
    check_both(layer.mlp.down_proj.weight.detach()[None].to(F64))
    check_top(layer.self_attn.o_proj.weight.detach()[None].to(F64))


@pytest.mark.parametrize("kappa", [None, 10.0, 30.0])
def test_iterative_routes_certify_without_falling_back(
    monkeypatch: pytest.MonkeyPatch, kappa: float | None
) -> None:
    """Gaussian and moderately conditioned matrices are certified by the iterative routes
    themselves: the dense and SVD fallbacks are never called."""
    monkeypatch.setattr(extremal, "KRYLOV_MIN_N", 16)
    monkeypatch.setattr(extremal, "MIXED_MIN_N", 16)

    def forbidden(x: torch.Tensor) -> None:
        raise AssertionError(f"fell back on {tuple(x.shape)}")

    if kappa is None:
        w = torch.randn(3, 400, 300, generator=gen(21), dtype=F64) / 20
    else:
        w = with_spectrum(torch.logspace(0, -math.log10(kappa), 300, dtype=F64), 400, seed=22, batch=3)
    check = (w, w.mT)
    monkeypatch.setattr(extremal, "_dense", forbidden)
    monkeypatch.setattr(extremal, "_svd", forbidden)
    for x in check:
        check_both(x)
        check_top(x)


def test_weight_extremes_many_mixed_shapes_needs_and_non_finite_weights() -> None:
    """The probe's entry point: mixed shapes (wide ones taken tall), σmin only where asked,
    non-finite weights flagged as (inf, 0), float32 weights as their exact float64 values."""
    from lightning_stability.diagnostics.linear import weight_extremes_many

    g = gen(30)
    mats = [
        torch.randn(300, 200, generator=g) / 15,
        torch.randn(200, 300, generator=g) / 15,
        torch.randn(200, 200, generator=g, dtype=F64) / 15,
        torch.randn(40, 30, generator=g),
        torch.randn(300, 200, generator=g) / 15,
    ]
    bad = mats[0].clone()
    bad[3, 4] = float("nan")
    mats.append(bad)
    need = [True, True, False, True, False, True]
    out = weight_extremes_many(mats, need)
    for (hi, lo), m, want in zip(out[:-1], mats[:-1], need[:-1], strict=True):
        ref = torch.linalg.svdvals(m.to(F64))
        assert abs(hi - ref[0]) <= RTOL * ref[0]
        if want:
            assert abs(lo - ref[-1]) <= RTOL * ref[-1]
        else:
            assert lo.isnan()
    assert out[-1][0] == math.inf and out[-1][1] == 0.0
    assert weight_extremes_many([], []) == []


@pytest.mark.parametrize("spectrum", ["gaussian", "power", "log1e6"])
def test_lu_route_certifies_ill_conditioned_square_matrices(
    monkeypatch: pytest.MonkeyPatch, spectrum: str
) -> None:
    """Square matrices the dense route cannot certify (a Gaussian square matrix, a trained-like
    power law with a few tiny values, κ = 1e6 log-spaced) are certified by the LU route itself, at the
    default threshold, with neither fallback called."""
    n = extremal.SQUARE_MIN_N
    if spectrum == "gaussian":
        w = torch.randn(2, n, n, generator=gen(31), dtype=F64) * 0.02
    elif spectrum == "power":
        s = torch.arange(1, n + 1, dtype=F64) ** -0.6
        s[-3:] *= 1e-3
        w = with_spectrum(s, n, seed=32, batch=2)
    else:
        w = with_spectrum(torch.logspace(0, -6, n, dtype=F64), n, seed=33, batch=2)

    def forbidden(x: torch.Tensor) -> None:
        raise AssertionError(f"fell back on {tuple(x.shape)}")

    monkeypatch.setattr(extremal, "_dense", forbidden)
    monkeypatch.setattr(extremal, "_svd", forbidden)
    check_both(w)
    check_both(w.mT)


def test_lu_route_leaves_well_conditioned_and_singular_square_matrices_to_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A square matrix of κ = 10 goes to the dense route (cheaper there), an exactly singular one
    to the dense and SVD routes, one of κ = 1e5 stays on the LU route; each matrix of the
    stack within its bound."""
    n = 64
    monkeypatch.setattr(extremal, "SQUARE_MIN_N", n)
    calls: list[int] = []
    dense = extremal._dense

    def counted(x: torch.Tensor) -> extremal.Extremes:
        calls.append(x.shape[0])
        return dense(x)

    monkeypatch.setattr(extremal, "_dense", counted)
    good = with_spectrum(torch.logspace(0, -1, n, dtype=F64), n, seed=41)
    singular = torch.randn(1, n, n, generator=gen(42), dtype=F64)
    singular[0, :, -1] = singular[0, :, 0]  # two equal columns: σmin = 0
    bad = with_spectrum(torch.logspace(0, -5, n, dtype=F64), n, seed=43)
    zero = torch.zeros(1, n, n, dtype=F64)  # LU fails outright (no usable pivots)
    w = torch.cat([good, singular, bad, zero])
    hi, lo, e_hi, e_lo = singular_value_bounds(w)
    ref = torch.linalg.svdvals(w)
    assert ((hi - ref[:, 0]).abs() <= e_hi).all() and ((lo - ref[:, -1]).abs() <= e_lo).all()
    assert calls == [3]  # good, singular and zero; bad certified by LU
    assert hi[3] == lo[3] == 0.0
    assert lo[1] <= e_lo[1] <= 1e-12 * hi[1]
    check_both(w[[0, 2]])

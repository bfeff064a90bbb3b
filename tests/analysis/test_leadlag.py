"""Lead–lag and its permutation test, against direct formulas and planted structure."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from lightning_stability.analysis import LeadLag, lead_lag, lead_lag_permutation_test


def _planted(lag: int, T: int = 200, noise: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """signal = white noise; target[t] = signal[t - lag] + noise (signal leads by `lag`)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T + abs(lag), generator=g, dtype=torch.float64)
    if lag >= 0:
        signal, target = base[lag:], base[:T]
    else:
        signal, target = base[:T], base[-lag:]
    return signal, target + noise * torch.randn(T, generator=g, dtype=torch.float64)


def _np_curve(s: np.ndarray, y: np.ndarray, max_lag: int) -> dict[int, float]:
    """Direct definition: Pearson of (s[t], y[t+L]) over the overlap, pairwise-finite."""
    T = len(s)
    out = {}
    for L in range(-max_lag, max_lag + 1):
        t = np.arange(max(0, -L), min(T, T - L))
        a, b = s[t], y[t + L]
        ok = np.isfinite(a) & np.isfinite(b)
        out[L] = float(np.corrcoef(a[ok], b[ok])[0, 1])
    return out


@pytest.mark.parametrize("lag", [17, -9, 0])
def test_planted_lag_found_exactly(lag: int) -> None:
    s, y = _planted(lag)
    r = lead_lag(s, y, max_lag=60)
    assert isinstance(r, LeadLag)
    assert r.lag == lag
    assert r.corr > 0.9
    assert len(r.lags) == len(r.curve) == len(r.n_pairs) == 121
    assert r.n_pairs[r.lags.index(lag)] == 200 - abs(lag)


def test_planted_lag_is_significant() -> None:
    s, y = _planted(17)
    res = lead_lag_permutation_test(s, y, max_lag=60, n_permutations=200, seed=3)
    assert res.lag == 17
    assert res.p_value < 0.01
    assert res.p_value == pytest.approx(1 / 201)
    assert float(res) == res.p_value
    assert res.null.shape == (200,)


def test_curve_matches_numpy_with_nonfinite_values() -> None:
    rng = np.random.default_rng(5)
    s = rng.standard_normal(150)
    y = np.roll(s, 4) + 0.5 * rng.standard_normal(150)
    s[[3, 50, 51]] = np.nan
    y[[10, 99]] = np.inf
    y[120] = -np.inf
    r = lead_lag(s, y, max_lag=20)
    ref = _np_curve(s, y, 20)
    np.testing.assert_allclose(r.curve, [ref[L] for L in r.lags], atol=1e-10)
    assert r.lag == 4
    assert r.n_pairs[r.lags.index(0)] == 150 - 6


def test_input_types_agree() -> None:
    s, y = _planted(5, T=80)
    a = lead_lag(s, y, max_lag=10)
    b = lead_lag(s.numpy(), y.numpy(), max_lag=10)
    c = lead_lag(s.tolist(), y.tolist(), max_lag=10)
    d = lead_lag(s.float(), y.float(), max_lag=10)
    assert a == b == c
    assert d.lag == a.lag and d.corr == pytest.approx(a.corr, abs=1e-6)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`signal` is too short"):
        lead_lag(np.arange(50.0), np.arange(50.0), max_lag=60)
    with pytest.raises(ValueError, match="equal length"):
        lead_lag(np.arange(100.0), np.arange(99.0))
    with pytest.raises(ValueError, match="`target` is constant"):
        lead_lag(np.random.default_rng(0).standard_normal(100), np.ones(100), max_lag=10)
    with pytest.raises(ValueError, match="`signal` must be 1-D"):
        lead_lag(np.zeros((10, 10)), np.zeros(100))
    with pytest.raises(ValueError, match="`n_permutations`"):
        lead_lag_permutation_test(np.arange(100.0), np.arange(100.0), max_lag=5, n_permutations=0)


def test_null_reselects_lag_matches_loop_and_leaves_global_rng_alone() -> None:
    rng = np.random.default_rng(11)
    s, y = rng.standard_normal(90), rng.standard_normal(90)
    state = torch.get_rng_state()
    res = lead_lag_permutation_test(s, y, max_lag=15, n_permutations=25, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    # brute force with the same permutations: best corr over all lags of each permuted signal
    g = torch.Generator().manual_seed(7)
    perms = torch.argsort(torch.rand(25, 90, generator=g, dtype=torch.float64), dim=1).numpy()
    loop = [lead_lag(s[p], y, max_lag=15).corr for p in perms]
    np.testing.assert_allclose(res.null.numpy(), loop, atol=1e-10)
    assert res.p_value == (1 + sum(v >= res.corr for v in loop)) / 26
    again = lead_lag_permutation_test(s, y, max_lag=15, n_permutations=25, seed=7)
    assert torch.equal(again.null, res.null)
    chunked = lead_lag_permutation_test(s, y, max_lag=15, n_permutations=25, seed=7, chunk_size=4)
    assert chunked.p_value == pytest.approx(res.p_value, abs=0.5)  # different draws, same scheme


@pytest.fixture
def one_thread():
    """Tiny batched ops are ~8x faster single-threaded on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("one_thread")
def test_false_discovery_rate_on_independent_noise() -> None:
    """Under H0 (independent white noise) P(p ≤ 0.05) ≈ 5%: the scan is paid for."""
    n_seeds, alpha = 200, 0.05
    pvals = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(1000 + seed)
        s, y = rng.standard_normal(120), rng.standard_normal(120)
        pvals.append(lead_lag_permutation_test(s, y, max_lag=30, n_permutations=200, seed=seed).p_value)
    rejections = sum(p <= alpha for p in pvals)
    sd = math.sqrt(n_seeds * alpha * (1 - alpha))
    assert n_seeds * alpha - 3 * sd <= rejections <= n_seeds * alpha + 3 * sd, rejections
    assert abs(float(np.mean(pvals)) - 0.5) < 4 * 0.289 / math.sqrt(n_seeds)
    # a naive per-lag p (no re-selection) would reject far more often: the best of 61 lags
    # of noise has |corr| well above the single-lag 5% critical value 1.96/sqrt(T)
    naive = sum(
        lead_lag(*np.random.default_rng(1000 + s).standard_normal((2, 120)), max_lag=30).corr
        > 1.645 / math.sqrt(120)
        for s in range(50)
    )
    assert naive > 25


@pytest.mark.usefixtures("one_thread")
def test_permutation_test_is_fast() -> None:
    s, y = _planted(20, T=200)
    lead_lag_permutation_test(s, y, max_lag=60, n_permutations=50)  # warm-up
    t0 = time.perf_counter()
    res = lead_lag_permutation_test(s, y, max_lag=60, n_permutations=1000)
    elapsed = time.perf_counter() - t0
    assert res.p_value == pytest.approx(1 / 1001)
    assert elapsed < 2.0, elapsed  # ~0.1-0.3 s on one core; slack for shared CI machines

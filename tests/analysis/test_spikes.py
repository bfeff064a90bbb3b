"""Rolling z-scores (batch vs online vs brute force) and Spike Precision@K on planted spikes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_stability.analysis import RollingZScore, rolling_zscore, spike_precision_at_k


def _brute_zscore(x: list[float], window: int) -> list[float]:
    """Definition, written out: against the previous `window` finite values, population std."""
    out, hist = [], []
    for v in x:
        if math.isnan(v) or len(hist) < 2:
            z = math.nan
        elif math.isinf(v):
            z = v
        else:
            w = hist[-window:]
            m = sum(w) / len(w)
            sd = math.sqrt(sum((h - m) ** 2 for h in w) / len(w))
            z = (v - m) / sd if sd > 0 else (0.0 if v == m else math.copysign(math.inf, v - m))
        out.append(z)
        if math.isfinite(v):
            hist.append(v)
    return out


def _online(x: list[float], window: int) -> list[float]:
    rz = RollingZScore(window)
    return [math.nan if (z := rz.update(v)) is None else z for v in x]


def test_rolling_zscore_matches_definition_with_nonfinite() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(120).tolist()
    x[5], x[40], x[41], x[77] = math.nan, math.inf, -math.inf, math.nan
    x[90:95] = [3.0] * 5
    ref = _brute_zscore(x, 20)
    np.testing.assert_allclose(rolling_zscore(x, 20).numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_online(x, 20), ref, rtol=1e-10, atol=1e-12)
    assert rolling_zscore(torch.tensor(x), 20).shape == (120,)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([math.nan, math.inf, 0.0]), max_size=40),
    st.integers(2, 8),
)
def test_online_equals_vectorised(x: list[float], window: int) -> None:
    vec = rolling_zscore(x, window).numpy()
    np.testing.assert_allclose(_online(x, window), vec, rtol=1e-7, atol=1e-7)


def test_constant_window_and_warmup() -> None:
    rz = RollingZScore(window=3)
    assert rz.update(1.0) is None
    assert rz.update(1.0) is None
    assert rz.update(1.0) == 0.0
    assert rz.update(2.0) == math.inf
    assert rz.update(math.nan) is None
    assert len(rz) == 3
    z = rolling_zscore([1.0, 1.0, 1.0, 0.0], 3)
    assert z[2] == 0.0 and z[3] == -math.inf


def test_state_dict_roundtrip_resumes_identically() -> None:
    x = np.random.default_rng(1).standard_normal(50).tolist()
    a = RollingZScore(10)
    for v in x[:30]:
        a.update(v)
    b = RollingZScore(10)
    b.load_state_dict(a.state_dict())
    assert [a.update(v) for v in x[30:]] == [b.update(v) for v in x[30:]]
    short = RollingZScore(4)
    short.load_state_dict(a.state_dict())
    assert short.state_dict()["history"] == a.state_dict()["history"][-4:]
    with pytest.raises(ValueError, match="window"):
        RollingZScore(1)


def _alternating(T: int) -> list[float]:
    """Baseline with |rolling z| ≤ ~1: never a spike at Z = 1.5."""
    return [0.1 * (-1) ** t for t in range(T)]


def test_precision_at_k_planted_three_of_four() -> None:
    T = 200
    sig, tgt = _alternating(T), _alternating(T)
    for t in (40, 80, 120, 160):
        sig[t] = 10.0
    for t in (50, 90, 130):  # the alarms at 40, 80, 120 are followed; 160 is not
        tgt[t] = 10.0
    assert spike_precision_at_k(sig, tgt, k=4) == 0.75
    # the baseline itself never spikes
    assert np.nanmax(rolling_zscore(_alternating(T), 20).numpy()) < 1.5
    # a target spike 41 steps after the alarm is outside the horizon; 40 is inside
    sig2, tgt2 = _alternating(T), _alternating(T)
    sig2[40] = sig2[140] = 10.0
    tgt2[40 + 41] = tgt2[140 + 40] = 10.0
    assert spike_precision_at_k(sig2, tgt2, k=2) == 0.5
    tgt2[40 + 41], tgt2[40 + 40] = 0.1 * (-1) ** 81, 10.0
    assert spike_precision_at_k(sig2, tgt2, k=2) == 1.0
    # simultaneous is not "followed"
    tgt3 = _alternating(T)
    tgt3[40] = 10.0
    assert spike_precision_at_k(sig, tgt3, k=4) == 0.0


def _brute_precision(sig: np.ndarray, tgt: np.ndarray, k: int, horizon: int, window: int, z: float) -> float:
    zs = np.array(_brute_zscore(sig.tolist(), window))
    zt = np.array(_brute_zscore(tgt.tolist(), window))
    cand = [t for t in range(len(sig)) if not np.isnan(zs[t])]
    cand.sort(key=lambda t: (-zs[t], t))
    alarms = cand[:k]
    hits = [any(zt[u] > z for u in range(t + 1, min(len(sig), t + horizon + 1))) for t in alarms]
    return sum(hits) / len(alarms)


@pytest.mark.parametrize("seed", range(5))
def test_precision_matches_brute_force_default_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sig = np.cumsum(rng.standard_normal(195)) + rng.standard_normal(195)
    tgt = np.roll(sig, 18) + 0.5 * rng.standard_normal(195)
    got = spike_precision_at_k(sig, tgt)  # K = ceil(19.5) = 20
    assert got == pytest.approx(_brute_precision(sig, tgt, 20, 40, 20, 1.5))
    assert got * 20 == pytest.approx(round(got * 20))


def test_precision_errors() -> None:
    with pytest.raises(ValueError, match="equal length"):
        spike_precision_at_k([1.0] * 30, [1.0] * 31)
    with pytest.raises(ValueError, match="`signal` is too short"):
        spike_precision_at_k([1.0] * 10, [1.0] * 10)
    with pytest.raises(ValueError, match="`k`"):
        spike_precision_at_k(_alternating(50), _alternating(50), k=0)

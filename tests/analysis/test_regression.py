"""predictor_regression against direct formulas and exact power laws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_stability.analysis import Regression, predictor_regression


def test_exact_linear_law_recovers_slope() -> None:
    x = np.logspace(-5, -2, 40)
    r = predictor_regression(x, 0.827 * x)
    assert isinstance(r, Regression)
    assert r.slope == pytest.approx(0.827)
    assert r.intercept == pytest.approx(0.0, abs=1e-12)
    assert r.r2 == pytest.approx(1.0)
    assert r.pearson_log == pytest.approx(1.0)
    assert r.spearman == pytest.approx(1.0)
    assert r.log_slope == pytest.approx(1.0)
    assert (r.n, r.n_dropped) == (40, 0)


def test_exact_power_law_recovers_exponent() -> None:
    x = np.logspace(-4, 0, 30)
    r = predictor_regression(x, 3.0 * x**0.7)
    assert r.log_slope == pytest.approx(0.7)
    assert r.pearson_log == pytest.approx(1.0)
    assert r.spearman == pytest.approx(1.0)
    assert r.r2 < 1.0  # not a straight line in linear space


def test_matches_direct_formulas_at_mismatch_scale() -> None:
    """Noisy data of magnitude ~1e-4 (where torchmetrics' raw r2_score would say 1.0)."""
    rng = np.random.default_rng(0)
    x = 1e-4 * np.exp(rng.standard_normal(200))
    y = 0.8 * x * np.exp(0.3 * rng.standard_normal(200))
    r = predictor_regression(x, y)
    lx, ly = np.log10(x), np.log10(y)
    assert r.pearson_log == pytest.approx(np.corrcoef(lx, ly)[0, 1], abs=1e-6)
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (no ties)
    assert r.spearman == pytest.approx(np.corrcoef(rank(x), rank(y))[0, 1], abs=1e-6)
    slope, intercept = np.polyfit(x, y, 1)
    assert r.slope == pytest.approx(slope, rel=1e-8)
    assert r.intercept == pytest.approx(intercept, rel=1e-6, abs=1e-12)
    fit = slope * x + intercept
    r2 = 1 - np.sum((y - fit) ** 2) / np.sum((y - y.mean()) ** 2)
    assert r.r2 == pytest.approx(r2, abs=1e-6)
    assert 0.3 < r.r2 < 0.99
    assert r.log_slope == pytest.approx(np.polyfit(lx, ly, 1)[0], rel=1e-8)


def test_nonpositive_and_nonfinite_dropped() -> None:
    x = np.array([1.0, 2.0, -1.0, 0.0, math.nan, 4.0, 8.0])
    y = np.array([2.0, 4.0, 1.0, 1.0, 1.0, math.inf, 16.0])
    r = predictor_regression(x, y)
    assert (r.n, r.n_dropped) == (3, 4)
    assert r.slope == pytest.approx(2.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="`predictor_scaled`"):
        predictor_regression([1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="`mismatch`"):
        predictor_regression([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="equal length"):
        predictor_regression([1.0, 2.0, 3.0], [1.0, 2.0])


def test_constant_predictor_gives_nan_not_crash() -> None:
    r = predictor_regression([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert math.isnan(r.slope) and math.isnan(r.r2)

"""The public API of `lightning_stability.analysis`."""

from __future__ import annotations

import lightning_stability.analysis as analysis


def test_public_api() -> None:
    assert set(analysis.__all__) == {
        "LeadLag",
        "PermutationTest",
        "Regression",
        "RollingZScore",
        "lead_lag",
        "lead_lag_permutation_test",
        "predictor_regression",
        "rolling_zscore",
        "spike_precision_at_k",
    }

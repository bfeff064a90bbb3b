"""Reading the logs back: lead–lag, spikes, regression.

Only light, pure-tensor functions are re-exported here (the monitor imports
:class:`RollingZScore` from this package); the report and the command line live
in :mod:`lightning_stability.analysis.report` and
:mod:`lightning_stability.analysis.cli` and import matplotlib / tensorboard lazily.
"""

from .leadlag import LeadLag, PermutationTest, lead_lag, lead_lag_permutation_test
from .regression import Regression, predictor_regression
from .spikes import RollingZScore, rolling_zscore, spike_precision_at_k

__all__ = [
    "LeadLag",
    "PermutationTest",
    "Regression",
    "RollingZScore",
    "lead_lag",
    "lead_lag_permutation_test",
    "predictor_regression",
    "rolling_zscore",
    "spike_precision_at_k",
]

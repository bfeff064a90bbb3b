"""Predictor-vs-mismatch regression (paper, Exp-1 Table 2).

Table 2 reports, per proxy, ``Pearson_log``, ``Spearman``, ``R²`` and ``slope``.
Which space the R²/slope fit lives in is not stated; the numbers decide it: for
the ε-scaled predictor ``Pearson_log = 0.984`` but ``R² = 0.78``, and for
``κ_score`` ``|Pearson_log| = 0.100`` but ``R² = 0.027``. A least-squares line in
log–log space would have ``R² = Pearson_log²`` (0.968 and 0.010), so the fit is
**in linear space**: ``mismatch ≈ slope · predictor + intercept`` by ordinary
least squares, ``R²`` the coefficient of determination of that line. This also
fits the paper's reading that the ε-scaled predictor has slope ≈ 0.83 *against
the mismatch itself*. The log–log slope (the power-law exponent) is reported
as an extra, :attr:`Regression.log_slope`.

Pearson, Spearman and R² come from :mod:`torchmetrics.functional`. (R² is
computed on values rescaled to unit spread: ``torchmetrics.functional.r2_score``
treats sums of squares below an absolute ``1e-4`` as zero and would return 1.0
for mismatches of order 1e-3.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ._series import SeriesLike, as_series

__all__ = ["Regression", "predictor_regression"]


@dataclass(frozen=True)
class Regression:
    """Result of :func:`predictor_regression` (one row of a Table-2-like table).

    Attributes:
        pearson_log: Pearson correlation of ``log10(predictor)`` with ``log10(mismatch)``.
        spearman: Spearman rank correlation (the same in linear and log space).
        r2: R² of the linear-space least-squares line ``mismatch ~ predictor``.
        slope: Slope of that line.
        intercept: Intercept of that line.
        log_slope: Slope of the least-squares line in log10–log10 space (power-law exponent).
        n: Number of pairs used.
        n_dropped: Pairs dropped (non-finite or non-positive value on either side).
    """

    pearson_log: float
    spearman: float
    r2: float
    slope: float
    intercept: float
    log_slope: float
    n: int
    n_dropped: int


def _ols(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Slope and intercept of the least-squares line ``y ≈ a·x + b`` (NaN when x is constant)."""
    xc = x - x.mean()
    sxx = float((xc * xc).sum())
    if not sxx > 0:
        return math.nan, math.nan
    a = float((xc * (y - y.mean())).sum()) / sxx
    return a, float(y.mean()) - a * float(x.mean())


def predictor_regression(predictor_scaled: SeriesLike, mismatch: SeriesLike) -> Regression:
    """Regress the observed forward mismatch on a predictor, as in the paper's Table 2.

    * ``pearson_log``: ``torchmetrics`` Pearson on ``log10`` of both.
    * ``spearman``: ``torchmetrics`` Spearman (rank-based).
    * ``slope``, ``intercept``, ``r2``: ordinary least squares of ``mismatch`` on
      ``predictor`` **in linear space** (see the module docstring for why),
      ``r2`` = ``torchmetrics`` ``r2_score`` of the fitted line.
    * ``log_slope``: least-squares slope in log10–log10 space.

    A pair is dropped (from every statistic, so all of them describe the same
    points) when either value is non-finite or ``≤ 0`` (no logarithm). Statistics
    that are undefined (a constant side) are NaN.

    Args:
        predictor_scaled: Predictor values, e.g. ``stability/predictor_scaled``
            (any proxy works: the table's rows use several).
        mismatch: Observed mismatch at the same steps, e.g. ``stability/r_block``.

    Returns:
        A :class:`Regression`.

    Raises:
        ValueError: On length mismatch, or fewer than 3 usable pairs (named).

    Example:
        >>> x = [1e-3, 2e-3, 5e-3, 1e-2, 3e-2]
        >>> r = predictor_regression(x, [0.5 * v for v in x])
        >>> round(r.slope, 6), round(r.r2, 6), round(r.pearson_log, 6), round(r.log_slope, 6)
        (0.5, 1.0, 1.0, 1.0)
        >>> predictor_regression([1.0, -1.0, 2.0, 3.0], [1.0, 1.0, 4.0, 9.0]).n_dropped
        1
    """
    from torchmetrics.functional import pearson_corrcoef, r2_score, spearman_corrcoef

    x = as_series(predictor_scaled, "predictor_scaled")
    y = as_series(mismatch, "mismatch")
    if x.numel() != y.numel():
        raise ValueError(
            f"`predictor_scaled` and `mismatch` must have equal length, got {x.numel()} and {y.numel()}"
        )
    keep = torch.isfinite(x) & torch.isfinite(y) & (x > 0) & (y > 0)
    n = int(keep.sum())
    if n < 3:
        bad = "predictor_scaled" if int((torch.isfinite(x) & (x > 0)).sum()) < 3 else "mismatch"
        raise ValueError(f"`{bad}`: only {n} usable (finite, positive) pairs, need >= 3")
    x, y = x[keep], y[keep]
    lx, ly = x.log10(), y.log10()
    with warnings.catch_warnings():
        # torchmetrics warns on (near-)constant input; the result is NaN then, which we report.
        warnings.simplefilter("ignore")
        pearson_log = float(pearson_corrcoef(lx, ly))
        spearman = float(spearman_corrcoef(x, y))
        slope, intercept = _ols(x, y)
        r2 = math.nan
        if math.isfinite(slope):
            # R² is scale-free, but torchmetrics treats sums of squares below an absolute 1e-4 as
            # zero (→ R² = 1): mismatches are ~1e-3, so rescale both sides to unit spread first.
            scale = float(y.std()) or 1.0
            r2 = float(r2_score((slope * x + intercept) / scale, y / scale))
    log_slope, _ = _ols(lx, ly)
    return Regression(
        pearson_log=pearson_log,
        spearman=spearman,
        r2=r2,
        slope=slope,
        intercept=intercept,
        log_slope=log_slope,
        n=n,
        n_dropped=int(keep.numel() - n),
    )

"""Spike Precision@K (paper, Exp-2).

The rolling z-score it scores spikes with is defined once, in
:mod:`lightning_stability.diagnostics.rolling` (shared with the monitor's online
early-warning alarm), and re-exported here.
"""

from __future__ import annotations

import math

import torch

from lightning_stability.diagnostics.rolling import RollingZScore, rolling_zscore
from lightning_stability.rules.thresholds import PAPER_WINDOW, PAPER_Z

from ._series import SeriesLike, as_series

__all__ = ["RollingZScore", "rolling_zscore", "spike_precision_at_k"]


def spike_precision_at_k(
    signal: SeriesLike,
    target: SeriesLike,
    k: int | None = None,
    horizon: int = 40,
    window: int = PAPER_WINDOW,
    z: float = PAPER_Z,
) -> float:
    """Spike Precision@K: how often the signal's strongest spikes are followed by a target spike.

    The paper (Exp-2) states "Spike Precision@K with K = ⌈0.1T⌉, horizon H = 40,
    rolling window 20, threshold Z = 1.5". Precisely, with ``T = len(signal)``:

    1. ``zs = rolling_zscore(signal, window)``, ``zt = rolling_zscore(target, window)``
       (z against the **previous** ``window`` finite values; see the module docstring).
    2. A **target spike** is a step ``u`` with ``zt[u] > z``.
    3. The **alarms** are the ``K`` steps with the highest ``zs`` (default
       ``K = ⌈0.1·T⌉``), among steps where ``zs`` is defined (not NaN); ties go
       to the earlier step. No threshold is applied to the signal and no
       non-maximum suppression: adjacent steps of one broad peak may all be
       alarms, as in a plain top-K. If fewer than ``K`` steps are defined, all
       defined steps are the alarms.
    4. An alarm at ``t`` is a **hit** when some ``u`` with ``t < u ≤ t + horizon``
       (strictly after it, within the series) is a target spike.
    5. Precision@K = hits / number of alarms.

    An alarm in the last steps has a truncated horizon and is simply a miss if
    no spike follows before the end. (The paper's values 0.895 = 17/19 and
    0.947 = 18/19 for T = 195 suggest it effectively used 19 alarms; its exact
    alignment is not stated.)

    Args:
        signal: Early-warning series (e.g. ``stability/kappa_softmax_max``).
        target: Series whose spikes should follow (e.g. ``stability/r_block``);
            same length as ``signal``, same step grid.
        k: Number of alarms; ``None`` → ``⌈0.1·T⌉``.
        horizon: Steps after an alarm in which a target spike counts.
        window: Rolling window (number of previous values) for both z-scores.
        z: Target spike threshold on the target's rolling z-score.

    Returns:
        The precision in ``[0, 1]``; NaN when no step of ``signal`` has a defined z-score.

    Raises:
        ValueError: On length mismatch, ``k < 1``, ``horizon < 1`` or series
            shorter than ``window`` + 1 (named in the message).

    Example:
        >>> base = [0.1 * (-1) ** t for t in range(100)]
        >>> sig = list(base); sig[30] = sig[70] = 5.0
        >>> tgt = list(base); tgt[40] = 5.0
        >>> spike_precision_at_k(sig, tgt, k=2, horizon=20)
        0.5
    """
    s = as_series(signal, "signal")
    y = as_series(target, "target")
    if s.numel() != y.numel():
        raise ValueError(f"`signal` and `target` must have equal length, got {s.numel()} and {y.numel()}")
    T = s.numel()
    if window + 1 > T:
        raise ValueError(f"`signal` is too short: {T} steps, need at least window + 1 = {window + 1}")
    if horizon < 1:
        raise ValueError(f"`horizon` must be >= 1, got {horizon}")
    if k is None:
        k = math.ceil(0.1 * T)
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    zs = rolling_zscore(s, window)
    zt = rolling_zscore(y, window)
    defined = torch.nonzero(~torch.isnan(zs)).flatten()
    if defined.numel() == 0:
        return math.nan
    # stable sort descending → ties resolved towards the earlier step
    order = torch.sort(zs[defined], descending=True, stable=True).indices
    alarms = defined[order[: min(k, defined.numel())]]
    spikes = torch.nan_to_num(zt, nan=-math.inf) > z
    # hits via a prefix count of spikes: any spike in (t, t + horizon]
    csum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(spikes.long(), 0)])
    hi = torch.clamp(alarms + horizon, max=T - 1)
    n_spikes_after = csum[hi + 1] - csum[alarms + 1]
    return float((n_spikes_after > 0).double().mean())

"""The events the alarm is scored against, defined on the loss only (never on the alarm's quantities).

Written down before the held-out runs were looked at (docs/HELDOUT.md, "Events"). With ``ℓ_t`` the
FP32 training loss of step ``t``, ``ℓ̃_t`` the same batch's loss from the low-precision what-if
forward, and ``m_t`` the mean of the last ``WINDOW`` = 10 values of ``ℓ`` (fewer in the first steps):

* **divergence** — ``ℓ_t`` non-finite, or the first step ``t`` from which ``m_s ≥ min_{u≤s} m_u +
  RISE`` (0.5 nats) holds for ``SUSTAIN`` = 10 consecutive steps ``s = t … t+9``;
* **gap** (a failing arm against its matched control, same seed) — the first ``t`` from which
  ``m_s(run) − m_s(control) ≥ GAP`` (0.3 nats) holds for ``GAP_SUSTAIN`` = 20 consecutive steps;
* **low precision** — ``ℓ̃_t`` non-finite, or the first ``t`` from which ``|ℓ̃_s − ℓ_s| ≥ LP_ERR``
  (0.1 nats) holds for ``LP_SUSTAIN`` = 3 consecutive steps.

A run's event is the earliest of those that happen. The lead of a rule on a run is ``event −
first firing check`` (positive: it warned before; negative: after), ``None`` when it never fired.

Pure Python/numpy on lists: importable without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WINDOW = 10
RISE = 0.5
SUSTAIN = 10
GAP = 0.3
GAP_SUSTAIN = 20
LP_ERR = 0.1
LP_SUSTAIN = 3


@dataclass(frozen=True)
class Event:
    """The earliest event of a run: its step and which definition (``"divergence"``, ``"gap"``,
    ``"low precision"``) gave it."""

    step: int
    kind: str


def trailing_mean(values: Sequence[float], window: int = WINDOW) -> np.ndarray:
    """Mean of the last ``window`` values at each position (partial window at the start).

    Example:
        >>> trailing_mean([1.0, 3.0, 5.0, 7.0], window=2).tolist()
        [1.0, 2.0, 4.0, 6.0]
    """
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def first_sustained(condition: Sequence[bool] | np.ndarray, length: int) -> int | None:
    """Index of the first run of ``length`` consecutive ``True`` values (a run cut by the end counts
    when it reaches the end), else ``None``.

    Example:
        >>> first_sustained([False, True, True, False, True, True, True], 3)
        4
        >>> first_sustained([False, True, True], 3)
        1
    """
    run = 0
    for i, c in enumerate(condition):
        run = run + 1 if c else 0
        if run >= length:
            return i - length + 1
    n = len(condition)
    return n - run if run else None


def divergence(steps: Sequence[float], loss: Sequence[float]) -> int | None:
    """Step of the divergence event (non-finite loss, or a sustained rise of the trailing mean).

    Example:
        >>> loss = [3.0] * 20 + [4.0] * 30
        >>> divergence(range(50), loss)
        24
        >>> divergence(range(4), [3.0, 2.0, float("nan"), 1.0])
        2
    """
    v = np.asarray(loss, dtype=np.float64)
    bad = np.nonzero(~np.isfinite(v))[0]
    end = int(bad[0]) if bad.size else v.size
    m = trailing_mean(v[:end])
    rise = m >= np.minimum.accumulate(m) + RISE
    t = first_sustained(rise, SUSTAIN)
    if t is not None:
        return int(steps[t])
    return int(steps[end]) if bad.size else None


def gap(steps: Sequence[float], loss: Sequence[float], control_loss: Sequence[float]) -> int | None:
    """Step of the sustained-gap event against the matched control (same steps assumed).

    Example:
        >>> gap(range(40), [2.0] * 10 + [4.0] * 30, [2.0] * 40)
        11
    """
    n = min(len(loss), len(control_loss))
    a = np.nan_to_num(np.asarray(loss[:n], dtype=np.float64), nan=np.inf, posinf=np.inf)
    b = np.asarray(control_loss[:n], dtype=np.float64)
    d = trailing_mean(np.minimum(a, 1e30)) - trailing_mean(b)
    t = first_sustained(d >= GAP, GAP_SUSTAIN)
    return None if t is None else int(steps[t])


def low_precision(steps: Sequence[float], loss: Sequence[float], whatif_loss: Sequence[float]) -> int | None:
    """Step of the low-precision event (what-if loss non-finite, or off by ≥ 0.1 nats 3 steps running).

    Example:
        >>> low_precision(range(6), [2.0] * 6, [2.0, 2.0, 2.2, 2.2, 2.2, 2.0])
        2
        >>> low_precision(range(3), [2.0] * 3, [2.0, float("inf"), 2.0])
        1
    """
    a = np.asarray(loss, dtype=np.float64)
    b = np.asarray(whatif_loss, dtype=np.float64)
    bad = np.nonzero(~np.isfinite(b) & np.isfinite(a))[0]
    off = np.abs(b - a) >= LP_ERR
    t = first_sustained(off & np.isfinite(b), LP_SUSTAIN)
    cands = [x for x in (t, int(bad[0]) if bad.size else None) if x is not None]
    return int(steps[min(cands)]) if cands else None


def run_event(
    steps: Sequence[float],
    loss: Sequence[float],
    whatif_loss: Sequence[float],
    control_loss: Sequence[float] | None = None,
) -> Event | None:
    """The earliest event of one run (``control_loss``: the matched control's, for failing arms)."""
    found = {
        "divergence": divergence(steps, loss),
        "low precision": low_precision(steps, loss, whatif_loss),
        "gap": gap(steps, loss, control_loss) if control_loss is not None else None,
    }
    hits = [(s, k) for k, s in found.items() if s is not None]
    if not hits:
        return None
    s, k = min(hits)
    return Event(s, k)


def lead(event: Event | None, fired_steps: Sequence[int]) -> int | None:
    """``event − first firing`` (``None`` without an event or without a firing).

    Example:
        >>> lead(Event(100, "divergence"), [40, 42]), lead(Event(100, "gap"), [])
        (60, None)
    """
    if event is None or not fired_steps:
        return None
    return event.step - int(fired_steps[0])


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided ``1 − alpha`` confidence interval of a binomial proportion ``k / n``.

    Example:
        >>> lo, hi = clopper_pearson(0, 2000)
        >>> lo, round(hi * 1000, 2)
        (0.0, 1.84)
    """
    from scipy.stats import beta

    if n <= 0:
        return (math.nan, math.nan)
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi

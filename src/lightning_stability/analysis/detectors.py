"""Loss-based spike detectors, replayed offline on logged series: the baselines of "Does it warn?".

Two rules that practitioners run today, re-implemented from their source so they can
be run on the *same* logs as the stability alarm:

* :func:`lightning_spike_steps` — Lightning Fabric's ``SpikeDetection``
  (``lightning/fabric/utilities/spike.py``; defaults ``mode="min"``, ``window=10``,
  ``warmup=1``, ``atol=None``, ``rtol=2``, ``finite_only=True``). At step ``t`` (the
  ``t``-th value, 0-based, ``t ≥ warmup``) the value is a spike when it is non-finite,
  or when it is **not better** than the previous accepted value and
  ``|x − m| ≥ rtol·m`` (and ``≥ atol`` when given), ``m`` the mean of the last
  ``window`` accepted values (the running mean starts empty, i.e. ``m = 0`` before the
  first value; the check is then ``|x| ≥ 0``). Accepted values are the finite values
  that were not spikes. Lightning stops training at the first spike; here the replay
  goes on so every step it *would* flag is returned.
* :func:`olmo_spike_steps` — OLMo-core's ``StabilityMonitorCallback``
  (``olmo_core/train/callbacks/stability_monitor.py``; ``window_size=128``,
  ``threshold_std=6``), applied separately to the loss and to the gradient norm. A value
  is a spike when the history already holds ``window`` values and
  ``x > mean + k·std`` (population std of the last ``window`` values; no spike when
  ``std < 1e-10``). Every value, spike or not, joins the history. NaN never exceeds the
  threshold, so a NaN is not a spike under this rule.

Both take the values in step order, one per optimizer step (the rules count values,
not step numbers), and return the **step numbers** at which they fire.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

__all__ = ["first_step", "lightning_spike_steps", "olmo_spike_steps"]


def _as_arrays(
    steps: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"`steps` and `values` must be 1-D of the same length, got {s.shape} and {v.shape}")
    return s, v


def lightning_spike_steps(
    steps: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    window: int = 10,
    rtol: float | None = 2.0,
    atol: float | None = None,
    warmup: int = 1,
    mode: str = "min",
    finite_only: bool = True,
) -> list[int]:
    """Steps Lightning's ``SpikeDetection`` flags (see the module docstring for the exact rule).

    Args:
        steps: Step of each value (ascending).
        values: The tracked metric (the training loss) in step order.
        window: Running-mean window (Lightning's default 10).
        rtol: Relative tolerance (default 2: a spike is at least 3× the running mean).
        atol: Absolute tolerance (``None``: not checked).
        warmup: Values (batches) before tracking starts.
        mode: ``"min"`` (lower is better) or ``"max"``.
        finite_only: ``True`` (Lightning's default): a non-finite value is a spike.

    Returns:
        The steps flagged as spikes.

    Example:
        >>> lightning_spike_steps(range(6), [4.0, 3.9, 3.8, 3.7, 12.0, 3.6])
        [4]
    """
    if window < 1:
        raise ValueError(f"`window` must be >= 1, got {window}")
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}")
    s, v = _as_arrays(steps, values)
    accepted: deque[float] = deque(maxlen=window)
    last = 0.0
    out: list[int] = []
    for i, x in enumerate(v.tolist()):
        spike = i >= warmup and _lightning_is_spike(x, last, accepted, rtol, atol, mode, finite_only)
        if spike:
            out.append(int(s[i]))
        elif finite_only or math.isfinite(x):
            if math.isfinite(x):  # torchmetrics' MeanMetric drops NaN by default
                accepted.append(x)
            last = x
    return out


def _lightning_is_spike(
    x: float,
    last: float,
    accepted: deque[float],
    rtol: float | None,
    atol: float | None,
    mode: str,
    finite_only: bool,
) -> bool:
    mean = sum(accepted) / len(accepted) if accepted else 0.0
    if finite_only and not math.isfinite(x):
        return True
    diff = x - last
    if (mode == "min" and diff <= 0.0) or (mode == "max" and diff >= 0.0):
        return False
    ok_atol = atol is None or abs(x - mean) >= abs(atol)
    ok_rtol = rtol is None or abs(x - mean) >= abs(rtol * mean)
    return ok_atol and ok_rtol


def olmo_spike_steps(
    steps: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    window: int = 128,
    threshold_std: float = 6.0,
) -> list[int]:
    """Steps OLMo-core's stability monitor flags on one series (loss or gradient norm).

    Args:
        steps: Step of each value (ascending).
        values: The series in step order.
        window: History length; nothing fires before it is full (OLMo's 128).
        threshold_std: Standard deviations above the history mean (OLMo's 6).

    Returns:
        The steps flagged as spikes.

    Example:
        >>> vals = [1.0, 1.1] * 64 + [5.0]
        >>> olmo_spike_steps(range(129), vals)
        [128]
    """
    if window < 1:
        raise ValueError(f"`window` must be >= 1, got {window}")
    s, v = _as_arrays(steps, values)
    history: deque[float] = deque(maxlen=window)
    out: list[int] = []
    for i, x in enumerate(v.tolist()):
        if len(history) >= window:
            h = np.fromiter(history, dtype=np.float64)
            std = float(h.std())
            if std >= 1e-10 and x > float(h.mean()) + threshold_std * std:
                out.append(int(s[i]))
        history.append(x)
    return out


def first_step(steps: Sequence[int]) -> int | None:
    """The first flagged step, or ``None``.

    Example:
        >>> first_step([]), first_step([7, 9])
        (None, 7)
    """
    return int(steps[0]) if len(steps) else None

"""Rolling z-scores, batch and online: the spike detector of the early warning (SPEC §7).

The rolling z-score of a value is taken **against the previous values only**
(the current value is not part of its own reference window), so a spike is
measured against the regime that preceded it, and the online form
(:class:`RollingZScore`, used by the monitor's early-warning alarm) and the
vectorised form (:func:`rolling_zscore`) give the same numbers.

Definition shared by both forms, for a series ``x`` and a window ``w``:

* Non-finite values are never part of a reference window. The window of step
  ``t`` is the last ``min(w, m)`` **finite** values before ``t`` (``m`` = number
  of finite values before ``t``); early steps use the partial window.
* ``z[t] = (x[t] − mean(window)) / std(window)``, ``std`` the **population**
  standard deviation (``ddof=0``; for a full window of 20 this is
  ``sqrt(19/20)`` of pandas' default ``ddof=1``, i.e. z-scores 2.6 % larger).
* Undefined (NaN / ``None``) while the window holds fewer than 2 values, and
  when ``x[t]`` is NaN. ``x[t] = ±inf`` gives ``z = ±inf``.
* A constant window (``std == 0``): ``z = 0`` when ``x[t]`` equals the window
  mean, otherwise ``±inf`` (a jump off a perfectly flat baseline is an
  unbounded spike).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch


def _as_series(x: Sequence[float] | torch.Tensor) -> torch.Tensor:
    t = x.detach().to("cpu", torch.float64).clone() if isinstance(x, torch.Tensor) else torch.as_tensor(
        x, dtype=torch.float64
    )
    if t.dim() != 1:
        raise ValueError(f"`x` must be 1-D, got shape {tuple(t.shape)}")
    return t


def _zscore_against(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise ``(value − mean)/std`` with the module's conventions for ``std == 0``."""
    diff = value - mean
    z = diff / torch.where(std > 0, std, torch.ones_like(std))
    flat = std == 0
    z = torch.where(flat & (diff == 0), torch.zeros_like(z), z)
    z = torch.where(flat & (diff != 0), torch.sign(diff) * math.inf, z)
    return z


def rolling_zscore(x: Sequence[float] | torch.Tensor, window: int = 20) -> torch.Tensor:
    """Rolling z-score of each value against the previous ``window`` finite values.

    See the module docstring for the exact definition (partial windows at the
    start, population std ``ddof=0``, non-finite handling, ``std == 0``). Vectorised: one
    ``unfold`` over the finite values, no Python loop over steps.

    Args:
        x: 1-D series (sequence, tensor or array).
        window: Number of previous finite values forming the reference (≥ 2).

    Returns:
        float64 tensor of the same length as ``x``; NaN where undefined.

    Raises:
        ValueError: If ``window < 2`` or ``x`` is not 1-D.

    Example:
        >>> z = rolling_zscore([1.0, 2.0, 1.0, 2.0, 10.0], window=3)
        >>> [round(v, 3) for v in z.tolist()[2:]]
        [-1.0, 1.414, 17.678]
        >>> bool(z[:2].isnan().all())
        True
    """
    if window < 2:
        raise ValueError(f"`window` must be >= 2, got {window}")
    xs = _as_series(x)
    out = torch.full_like(xs, math.nan)
    finite = torch.isfinite(xs)
    f = xs[finite]
    n = f.numel()
    if n > 0:
        # windows[j] = the `window` finite values before finite position j (NaN-padded).
        padded = torch.cat([torch.full((window,), math.nan, dtype=f.dtype), f[:-1]])
        windows = padded.unfold(0, window, 1)  # (n, window)
        valid = ~torch.isnan(windows)
        count = valid.sum(dim=1)
        w0 = torch.where(valid, windows, torch.zeros_like(windows))
        mean = w0.sum(dim=1) / count.clamp(min=1)
        dev = torch.where(valid, windows - mean[:, None], torch.zeros_like(windows))
        var = (dev * dev).sum(dim=1) / count.clamp(min=1)
        z = _zscore_against(f, mean, var.sqrt())
        z = torch.where(count >= 2, z, torch.full_like(z, math.nan))
        out[finite] = z
    # ±inf values are infinitely far from any finite window (once a window exists).
    inf_idx = torch.nonzero(torch.isinf(xs)).flatten()
    if inf_idx.numel() > 0:
        n_before = torch.cumsum(finite.long(), 0) - finite.long()
        defined = n_before[inf_idx] >= 2
        out[inf_idx] = torch.where(defined, xs[inf_idx], torch.full_like(xs[inf_idx], math.nan))
    return out


class RollingZScore:
    """Online rolling z-score: the streaming twin of :func:`rolling_zscore`.

    ``update(v)`` returns the z-score of ``v`` against the previous ``window``
    finite values and then adds ``v`` to the window (non-finite values are not
    added). Feeding a series value by value gives exactly
    ``rolling_zscore(series, window)`` (``None`` where that is NaN).
    ``state_dict()`` / ``load_state_dict()`` make it resumable from a checkpoint.

    Args:
        window: Number of previous finite values forming the reference (≥ 2).

    Example:
        >>> rz = RollingZScore(window=3)
        >>> [rz.update(v) for v in [1.0, 2.0]]
        [None, None]
        >>> round(rz.update(1.0), 3), round(rz.update(2.0), 3), round(rz.update(10.0), 3)
        (-1.0, 1.414, 17.678)
        >>> rz2 = RollingZScore(window=3)
        >>> rz2.load_state_dict(rz.state_dict())
        >>> rz2.update(5.0) == rz.update(5.0)
        True
    """

    def __init__(self, window: int = 20) -> None:
        if window < 2:
            raise ValueError(f"`window` must be >= 2, got {window}")
        self.window = int(window)
        self._values: deque[float] = deque(maxlen=self.window)

    def __len__(self) -> int:
        """Number of values currently in the reference window."""
        return len(self._values)

    def update(self, value: float) -> float | None:
        """Score ``value`` against the window, then push it into the window.

        Args:
            value: The new observation (a Python number or 0-d tensor).

        Returns:
            The z-score, or ``None`` while the window has fewer than 2 values or
            when ``value`` is NaN. ``±inf`` when ``value`` is ``±inf`` or when the
            window is constant and ``value`` differs from it.
        """
        v = float(value)
        n = len(self._values)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return v if n >= 2 else None
        z: float | None = None
        if n >= 2:
            w = torch.tensor(list(self._values), dtype=torch.float64)
            mean = w.mean()
            std = w.std(correction=0)
            z = float(_zscore_against(torch.tensor(v, dtype=torch.float64), mean, std))
        self._values.append(v)
        return z

    def reset(self) -> None:
        """Forget all values."""
        self._values.clear()

    def state_dict(self) -> dict[str, Any]:
        """Return a picklable snapshot: ``{"window": int, "history": list[float]}``."""
        return {"window": self.window, "history": list(self._values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; keeps this object's window length.

        Args:
            state: A dict from :meth:`state_dict`. When its window differs from
                ``self.window`` only the most recent ``self.window`` values are kept.
        """
        values = [float(v) for v in state.get("history", state.get("values", []))]
        self._values = deque(values[-self.window :], maxlen=self.window)

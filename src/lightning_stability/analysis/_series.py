"""Input coercion shared by the analysis functions (internal)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: What the analysis functions accept as a 1-D series: a sequence of numbers, a
#: ``torch.Tensor`` or anything ``torch.as_tensor`` understands (e.g. a NumPy array).
SeriesLike = Sequence[float] | torch.Tensor | Any


def as_series(x: SeriesLike, name: str) -> torch.Tensor:
    """Return ``x`` as a 1-D float64 CPU tensor (a copy), or raise naming the argument.

    Args:
        x: A 1-D sequence, tensor or array.
        name: The argument's name, used in error messages.

    Returns:
        A detached, contiguous float64 tensor on the CPU.

    Raises:
        ValueError: If ``x`` is not one-dimensional.

    Example:
        >>> as_series([1, 2, 3], "signal")
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64).clone()
    else:
        try:
            t = torch.as_tensor(x, dtype=torch.float64).clone()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"`{name}` must be a 1-D sequence of numbers: {exc}") from exc
    if t.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {tuple(t.shape)}")
    return t.contiguous()

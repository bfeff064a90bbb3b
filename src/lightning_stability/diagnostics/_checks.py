"""Shared argument validation (private)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(name: str, x: object, min_dim: int, fn: str) -> Tensor:
    """Raise ``ValueError`` unless ``x`` is a floating tensor with at least ``min_dim`` dims."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{fn}: {name} must have at least {min_dim} dims, got shape {tuple(x.shape)}"
        )
    return x


def check_mask(mask: object, target: tuple[int, ...], fn: str, name: str = "mask") -> Tensor:
    """Raise ``ValueError`` unless ``mask`` is boolean and broadcastable to ``target``."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{fn}: {name} must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{fn}: {name} must be a boolean tensor (True = attended), got dtype {mask.dtype} "
            f"with shape {tuple(mask.shape)}"
        )
    ok = mask.dim() <= len(target)
    if ok:
        try:
            ok = tuple(torch.broadcast_shapes(tuple(mask.shape), target)) == tuple(target)
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"{fn}: {name} of shape {tuple(mask.shape)} is not broadcastable to {tuple(target)}"
        )
    return mask


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num/den`` with the package convention: 0/0 → 1, x/0 → inf, non-finite → inf."""
    out = num / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den > 0, out, torch.where(num > 0, torch.full_like(out, float("inf")), 1.0))
    return torch.where(torch.isfinite(num) & torch.isfinite(den), out, torch.full_like(out, float("inf")))


def all_finite(*tensors: Tensor) -> bool:
    """True only if every entry of every tensor is finite, from one float64 sum per tensor.

    A sum is finite only if no entry is NaN/±Inf, so ``True`` is exact; ``False`` may also mean a
    finite sum overflowed (float64 entries beyond ~1e300), and callers then take their
    entry-wise path, which is correct in both cases. This replaces a full-size ``isfinite``
    mask (the dearest elementwise op here) on the common all-finite path.
    """
    return all(bool(torch.isfinite(t.sum(dtype=torch.float64))) for t in tensors)

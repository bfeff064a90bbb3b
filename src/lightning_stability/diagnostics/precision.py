"""Machine epsilon of a floating dtype (SPEC notation)."""

from __future__ import annotations

import torch

__all__ = ["eps_mach"]


def eps_mach(dtype: torch.dtype) -> float:
    """Unit roundoff ``ε_mach`` of ``dtype`` as used throughout SPEC (``torch.finfo(dtype).eps``).

    Args:
        dtype: A floating-point torch dtype.

    Returns:
        ``torch.finfo(dtype).eps``: FP32 2⁻²³, BF16 2⁻⁷, FP16 2⁻¹⁰.

    Raises:
        ValueError: If ``dtype`` is not a floating-point dtype.

    Example:
        >>> eps_mach(torch.bfloat16) == 2.0**-7
        True
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"eps_mach: dtype must be a floating-point torch.dtype, got {dtype!r}")
    return float(torch.finfo(dtype).eps)

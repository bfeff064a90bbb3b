"""Argument checks shared by every entry point: each names the argument and the value it got.

They raise Lightning's ``MisconfigurationException`` (the one exception of a bad argument across
the package: callbacks, :class:`~lightning_stability.StabilityMeter` and
:func:`~lightning_stability.measure` alike).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = ["check_choice", "check_int", "check_number", "check_patterns"]


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """Raise ``MisconfigurationException`` naming ``name`` unless ``value`` is an int ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """Raise ``MisconfigurationException`` naming ``name`` unless ``value`` is a real number in the range."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        lo, hi = ("(" if open_low else "[") + f"{low}", f"{high}" + (")" if open_high else "]")
        raise MisconfigurationException(f"`{name}` must be a number in {lo}, {hi}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ``MisconfigurationException`` naming ``name`` unless ``value`` is one of ``choices``."""
    strict = isinstance(value, bool) or any(isinstance(c, bool) for c in choices)  # 1 == True
    if value not in choices or (strict and not any(c is value for c in choices)):
        raise MisconfigurationException(f"`{name}` must be one of {choices}, got {value!r}")


def check_flags(**flags: Any) -> None:
    """Raise ``MisconfigurationException`` naming the first flag that is not a ``bool``.

    A separate check from :func:`check_choice`, which would take ``1`` for ``True``.
    """
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise MisconfigurationException(f"`{name}` must be True or False, got {flag!r}")


def check_patterns(name: str, value: Any) -> None:
    """``None`` or a non-empty list of ``fnmatch`` pattern strings."""
    if value is not None and (
        isinstance(value, str) or not value or not all(isinstance(p, str) for p in value)
    ):
        raise MisconfigurationException(
            f"`{name}` must be None or a non-empty list of name patterns, got {value!r}"
        )

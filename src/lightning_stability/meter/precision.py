"""The low precision of a measurement: a name (an autocast), or the caller's own context.

A measurement runs the model once in exact FP32 and once in a low precision. That precision is
given by name (``"bf16"``, ``"fp16"``: that autocast on the model's device; ``"fp32"``: autocast
off; ``"fp8"``: the FP8 what-if, :class:`~lightning_stability.capture.probe.FP8Precision`), or as
a factory of context managers: a callable with no arguments returning a fresh
context each time it is called (the ``Trainer``'s precision context, Fabric's
``fabric.autocast``, a recipe of one's own).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_stability.capture.probe import FP8Precision
from lightning_stability.meter.options import ProbeOptions

__all__ = [
    "DTYPES",
    "PRECISIONS",
    "AutocastName",
    "LowPrecision",
    "Precision",
    "PrecisionName",
    "autocast_context",
    "low_precision",
]

#: The precisions that are an autocast (``"fp32"``: autocast off).
AutocastName = Literal["bf16", "fp16", "fp32"]
#: Every precision a measured pass can be given by name: the autocast ones and the FP8 what-if.
PrecisionName = Literal["bf16", "fp16", "fp32", "fp8"]
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS: tuple[str, ...] = (*DTYPES, "fp8")
#: A factory of the low-precision pass's context: called once per pass, returns a fresh context.
LowPrecision = Callable[[], AbstractContextManager[Any]]
#: A precision name, or a :data:`LowPrecision` factory.
Precision = PrecisionName | LowPrecision


def autocast_context(device_type: str, precision: AutocastName) -> AbstractContextManager[Any]:
    """The autocast of a precision name on ``device_type`` (``"fp32"``: autocast off)."""
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=DTYPES[precision])


def low_precision(
    model: nn.Module, precision: Precision, name: str = "precision", probe: ProbeOptions | None = None
) -> LowPrecision:
    """The factory of the low-precision pass's context for ``model``.

    Args:
        model: the measured model (a name's autocast runs on the device of its first parameter).
        precision: a name of :data:`PRECISIONS`, or a factory returned as it is.
        name: the argument's name in the error.
        probe: the probe's options (``"fp8"``: the recipe, ``fp8_recipe``, and ``fp8_attention``).
            The FP8 factory keeps state (delayed scaling's amax history): keep it across calls.

    Raises:
        MisconfigurationException: naming ``name`` and the value, for anything else.

    Example:
        >>> ctx = low_precision(nn.Linear(2, 2), "bf16")()
        >>> with ctx:
        ...     torch.get_autocast_dtype("cpu")
        torch.bfloat16
    """
    if precision == "fp8":
        opts = probe if probe is not None else ProbeOptions()
        return FP8Precision(model, opts.fp8_recipe or "current", attention=opts.fp8_attention)
    if isinstance(precision, str) and precision in DTYPES:
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        named: AutocastName = precision
        return lambda: autocast_context(device_type, named)
    if callable(precision):
        return precision
    raise MisconfigurationException(
        f"`{name}` must be one of {PRECISIONS} or a callable returning a context manager "
        f"(e.g. lambda: torch.autocast('cuda', dtype=torch.bfloat16)), got {precision!r}"
    )

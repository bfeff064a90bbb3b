"""lightning-stability: where and when a Transformer's low-precision forward pass is fragile.

Add :class:`StabilityMonitor` (and :class:`LNEpsilonBump`) to a ``Trainer``; the math
lives in :mod:`lightning_stability.diagnostics`, the log analysis in
:mod:`lightning_stability.analysis`, the metric table in :mod:`lightning_stability.metrics`.

The names below are imported lazily (module ``__getattr__``), so ``import
lightning_stability.analysis`` and the ``lightning-stability`` command do not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_stability.callbacks import (
        AlarmOptions,
        GuardAction,
        LNEpsilonBump,
        ProbeOptions,
        StabilityGuard,
        StabilityMonitor,
    )
    from lightning_stability.capture.attention import observe_attention
    from lightning_stability.stability_report import BlockReport, StabilityReport

__version__ = "0.1.0"

_LAZY = {
    "AlarmOptions": "lightning_stability.callbacks",
    "ProbeOptions": "lightning_stability.callbacks",
    "BlockReport": "lightning_stability.stability_report",
    "StabilityReport": "lightning_stability.stability_report",
    "GuardAction": "lightning_stability.callbacks",
    "LNEpsilonBump": "lightning_stability.callbacks",
    "StabilityGuard": "lightning_stability.callbacks",
    "StabilityMonitor": "lightning_stability.callbacks",
    "observe_attention": "lightning_stability.capture.attention",
}

__all__ = [
    "AlarmOptions",
    "BlockReport",
    "GuardAction",
    "LNEpsilonBump",
    "ProbeOptions",
    "StabilityGuard",
    "StabilityMonitor",
    "StabilityReport",
    "__version__",
    "observe_attention",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_stability' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""lightning-stability: where and when a Transformer's low-precision forward pass is fragile.

Add :class:`StabilityMonitor` (and :class:`LNEpsilonBump`) to a ``Trainer``; the math
lives in :mod:`lightning_stability.diagnostics`, the log analysis in
:mod:`lightning_stability.analysis`.
"""

from lightning_stability.callbacks import GuardAction, LNEpsilonBump, StabilityGuard, StabilityMonitor
from lightning_stability.capture.attention import observe_attention
from lightning_stability.report import BlockReport, StabilityReport

__version__ = "0.1.0"

__all__ = [
    "BlockReport",
    "GuardAction",
    "LNEpsilonBump",
    "StabilityGuard",
    "StabilityMonitor",
    "StabilityReport",
    "__version__",
    "observe_attention",
]

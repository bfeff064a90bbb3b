"""Lightning callbacks: the glue between the capture layer and a ``Trainer``."""

from lightning_stability.callbacks.guard import GuardAction, StabilityGuard
from lightning_stability.callbacks.ln_eps import LNEpsilonBump
from lightning_stability.callbacks.monitor import StabilityMonitor
from lightning_stability.callbacks.options import AlarmOptions, ProbeOptions

__all__ = [
    "AlarmOptions",
    "GuardAction",
    "LNEpsilonBump",
    "ProbeOptions",
    "StabilityGuard",
    "StabilityMonitor",
]

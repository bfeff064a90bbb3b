"""Measurement from any training loop: :func:`measure` (one call) and :class:`StabilityMeter` (a run).

No Lightning ``Trainer`` here: a Fabric loop, litgpt's scripts or a plain PyTorch loop call them
directly, and :class:`~lightning_stability.StabilityMonitor` is built on the same path.

- :mod:`~lightning_stability.meter.measurer`: :class:`Measurer`, the one path of a measurement
  (the probe found once, the sample, the two passes, the cross-rank reduction, the report).
- :mod:`~lightning_stability.meter.verdict`: :class:`ReportJudge`, reports judged by the rule book.
- :mod:`~lightning_stability.meter.stability_meter`: :class:`StabilityMeter`, both for a whole run.
- :mod:`~lightning_stability.meter.functional`: :func:`measure`.
- :mod:`~lightning_stability.meter.options`: :class:`ProbeOptions`, :class:`AlarmOptions`.
- :mod:`~lightning_stability.meter.precision`, :mod:`~lightning_stability.meter.inputs`,
  :mod:`~lightning_stability.meter.checks`: the arguments.
"""

from lightning_stability.meter.functional import measure
from lightning_stability.meter.measurer import Measurer
from lightning_stability.meter.options import AlarmOptions, ProbeOptions
from lightning_stability.meter.stability_meter import StabilityMeter
from lightning_stability.meter.verdict import ReportJudge, judge_reports

__all__ = [
    "AlarmOptions",
    "Measurer",
    "ProbeOptions",
    "ReportJudge",
    "StabilityMeter",
    "judge_reports",
    "measure",
]

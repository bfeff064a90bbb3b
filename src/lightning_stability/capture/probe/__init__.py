"""The measurement itself: an exact FP32 forward and a low-precision forward of one sample.

No Lightning here. :class:`StabilityProbe` knows a model's blocks, normalization
layers and attention; :meth:`StabilityProbe.measure` runs the two passes and returns
raw statistics as 0-d tensors still on the device (so a caller can reduce them across
ranks and move them to the host in one transfer); :func:`compose_report` turns those
numbers into a :class:`~lightning_stability.stability_report.StabilityReport` with the pure
functions of :mod:`lightning_stability.diagnostics`. Raw statistics are kept under
:class:`~lightning_stability.metrics.RawKey` records; the metric table
(:mod:`lightning_stability.metrics`) declares how each is reduced over heads, examples, calls
and ranks.
"""

from lightning_stability.capture.probe.compose import compose_report, predictor_warnings
from lightning_stability.capture.probe.fp8_pass import FP8Precision, fp8_statistics
from lightning_stability.capture.probe.raw import RawMeasurement, ReduceOp
from lightning_stability.capture.probe.spectra import WeightSpectra
from lightning_stability.capture.probe.stability_probe import (
    NO_ATTENTION_WARNING,
    StabilityProbe,
    first_nonfinite_module,
)

__all__ = [
    "NO_ATTENTION_WARNING",
    "FP8Precision",
    "RawMeasurement",
    "ReduceOp",
    "StabilityProbe",
    "WeightSpectra",
    "compose_report",
    "first_nonfinite_module",
    "fp8_statistics",
    "predictor_warnings",
]

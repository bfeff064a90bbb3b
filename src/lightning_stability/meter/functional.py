"""``measure(model, inputs)``: one measurement, from any training loop.

The functional form of :class:`~lightning_stability.StabilityMeter`: no state a caller sees. Per
model it remembers, weakly (nothing keeps the model alive), which warnings it gave and the
weight spectra kept for reuse; the blocks are found again at each call (a walk over the
modules: milliseconds, against the seconds of the two passes).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_stability.capture.probe.reduce import Group
from lightning_stability.meter.checks import check_int
from lightning_stability.meter.inputs import call_arguments
from lightning_stability.meter.measurer import Measurer, MeasurerMemory
from lightning_stability.meter.options import AlarmOptions, ProbeOptions
from lightning_stability.meter.precision import Precision, low_precision
from lightning_stability.meter.stability_meter import check_measure_arguments
from lightning_stability.meter.verdict import ReportJudge
from lightning_stability.meter.wrapped import measured_module
from lightning_stability.stability_report import StabilityReport

__all__ = ["measure"]

#: Per model (weakly) and per probe configuration: the warnings given, the spectra kept.
_MEMORY: weakref.WeakKeyDictionary[nn.Module, dict[Any, MeasurerMemory]] = weakref.WeakKeyDictionary()


def measure(
    model: nn.Module,
    inputs: Any,
    *,
    precision: Precision = "bf16",
    sample_size: int | None = None,
    blocks: Sequence[str] | None = None,
    log_per_head: bool = False,
    step: int = 0,
    seed: int = 0,
    probe: ProbeOptions = ProbeOptions(),  # noqa: B008 (frozen: one shared default is safe)
    alarm: AlarmOptions = AlarmOptions(),  # noqa: B008
    group: Group = None,
) -> StabilityReport:
    """Measure where and how much ``model``'s low-precision forward pass is fragile on ``inputs``.

    Runs the model twice without gradients — in the low precision and in exact FP32 — and returns
    what :class:`~lightning_stability.StabilityMonitor` logs at a sampled step: per block the
    forward mismatch ``r_block``, the block-local errors and the diagnostics that predict them
    (``docs/SPEC.md``), as a :class:`StabilityReport` (``report.metrics()``: the logged tags and
    values). Nothing about training changes: same parameters (bitwise), RNG stream, module modes,
    no hooks left.

    When ``torch.distributed`` is initialised, every rank of ``group`` must call it together: the
    values are reduced across ranks (one collective), and a rank that cannot measure makes every
    rank raise. For a whole run (one verdict at its end, the paper's rolling alarm), use
    :class:`~lightning_stability.StabilityMeter`; :func:`~lightning_stability.judge_reports` judges a
    sequence of reports of this function.

    Args:
        model: the model, called as ``model(*args, **kwargs)`` (a Fabric-wrapped model is measured
            as its original module; pass ``precision=fabric.autocast`` for Fabric's precision).
        inputs: what its forward takes: a tensor, a tuple of positional arguments, or a dict of
            keyword arguments.
        precision: ``"bf16"``, ``"fp16"`` (that autocast on the model's device), ``"fp32"``,
            ``"fp8"`` (the FP8 what-if, recipe from ``probe.fp8_recipe``; docs/FP8.md), or a
            callable returning a fresh context manager (``fabric.autocast``).
        sample_size: examples of ``inputs`` to measure (a seeded choice along the leading axis of
            every tensor of the batch size); ``None``: all of them.
        blocks: ``fnmatch`` patterns naming the blocks; ``None`` finds the repeated layers.
        log_per_head: also report per-head values.
        step: the report's step (your training step).
        seed: with ``step``, seeds the choice of examples (``seed + step``).
        probe: what the probe measures (:class:`ProbeOptions`).
        alarm: the early warning judging this report alone (its ``alarm`` fields; the paper's
            rolling z-score needs a history, so it leaves ``report.alarm`` ``None``).
        group: the process group to reduce over (default: the default group, when initialised).

    Raises:
        MisconfigurationException: a bad argument, named with its value.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> report = measure(model, torch.randn(4, 8, 16), step=3)
        >>> report.step, report.dtype, 0 < report.r_block < 0.05
        (3, 'bfloat16', True)
    """
    check_measure_arguments(model, sample_size, blocks, log_per_head, seed, probe, precision)
    check_int("step", step, minimum=0)
    model = measured_module(model)
    config = (tuple(blocks) if blocks is not None else None, bool(log_per_head), probe)
    memory = _MEMORY.setdefault(model, {}).setdefault(config, MeasurerMemory())
    if precision == "fp8":  # one FP8 factory per model and options: delayed scaling's history
        memory.fp8 = memory.fp8 or low_precision(model, precision, probe=probe)
        context = memory.fp8
    else:
        context = low_precision(model, precision)
    judge = ReportJudge(alarm)
    args, kwargs = call_arguments(inputs)
    measurer = Measurer(
        model,
        sample_size=None if sample_size is None else int(sample_size),
        blocks=blocks,
        log_per_head=log_per_head,
        probe=probe,
        group=group,
        owner="lightning_stability.measure",
        memory=memory,
    )
    report = measurer.measure(args, kwargs, step=step, seed=int(seed) + step, low_precision=context)
    judge.observe(report)
    return report

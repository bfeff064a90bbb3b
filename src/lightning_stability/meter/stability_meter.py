"""``StabilityMeter``: the measurement of :func:`~lightning_stability.measure`, kept for a whole run.

The stateful counterpart of the functional call, in the torchmetrics manner: it holds the model's
probe (blocks, norms and weights found once) and the rule book's judge, so every report gets the
early warning of the reports before it, and the run gets one verdict at its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_stability.capture.probe.reduce import Group
from lightning_stability.meter.checks import check_choice, check_int, check_patterns
from lightning_stability.meter.inputs import call_arguments
from lightning_stability.meter.measurer import Measurer
from lightning_stability.meter.options import AlarmOptions, ProbeOptions, check_probe
from lightning_stability.meter.precision import Precision, low_precision
from lightning_stability.meter.verdict import ReportJudge
from lightning_stability.meter.wrapped import measured_module
from lightning_stability.rules import Judgement
from lightning_stability.stability_report import StabilityReport

__all__ = ["StabilityMeter", "check_measure_arguments"]


def check_measure_arguments(
    model: Any, sample_size: Any, blocks: Any, log_per_head: Any, seed: Any, probe: Any, precision: Any
) -> None:
    """The arguments shared by :func:`~lightning_stability.measure` and :class:`StabilityMeter`,
    each named with its value in a ``MisconfigurationException`` when bad."""
    if not isinstance(model, nn.Module):
        raise MisconfigurationException(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if sample_size is not None:
        check_int("sample_size", sample_size)
    check_patterns("blocks", blocks)
    check_choice("log_per_head", log_per_head, (True, False))
    check_int("seed", seed, minimum=0)
    check_probe(probe, precision if isinstance(precision, str) else None)


class StabilityMeter:
    """Measure a model's low-precision fragility at the steps you choose, and judge the run.

    ``meter.measure(inputs, step=step)`` runs the model twice without gradients on ``inputs`` — in
    the low precision and in exact FP32 — and returns a :class:`StabilityReport` (what
    :class:`~lightning_stability.StabilityMonitor` logs: ``report.metrics()``), with the early
    warning's result in its ``alarm`` fields. Nothing about training changes: same parameters, RNG
    stream, module modes, no hooks left. When ``torch.distributed`` is initialised every rank of
    ``group`` must call :meth:`measure` together: the values are reduced across ranks, and a rank
    that cannot measure makes all of them raise.

    Args:
        model: the model, called as ``model(*args, **kwargs)`` (a Fabric-wrapped model is measured
            as its original module).
        precision: the low precision: ``"bf16"``, ``"fp16"`` (that autocast on the model's device),
            ``"fp32"``, or a callable returning a fresh context manager (``fabric.autocast``, the
            ``Trainer``'s precision context, ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``).
        sample_size: examples of the inputs to measure (a seeded choice along the leading axis);
            ``None``: all of them.
        blocks: ``fnmatch`` patterns naming the blocks (``["transformer.h.*"]``); ``None`` finds the
            repeated layers.
        log_per_head: also report per-head values (``stability/block{i}/head{h}/<name>``).
        seed: seeds the choice of examples (``seed + step``).
        probe: what the probe measures (:class:`ProbeOptions`).
        alarm: the early warning (:class:`AlarmOptions`).
        group: the ``torch.distributed`` process group to reduce over (default: the default group).

    Attributes:
        last_report: the last report measured.
        measured: how many reports were measured (the next default step).

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> meter = StabilityMeter(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
        >>> report = meter.measure(torch.randn(4, 8, 16), step=10)
        >>> report.step, [b.name for b in report.blocks], meter.judgement().steps
        (10, ['layers.0', 'layers.1'], 1)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        precision: Precision = "bf16",
        sample_size: int | None = None,
        blocks: Sequence[str] | None = None,
        log_per_head: bool = False,
        seed: int = 0,
        probe: ProbeOptions = ProbeOptions(),  # noqa: B008 (frozen: one shared default is safe)
        alarm: AlarmOptions = AlarmOptions(),  # noqa: B008
        group: Group = None,
    ) -> None:
        check_measure_arguments(model, sample_size, blocks, log_per_head, seed, probe, precision)
        model = measured_module(model)
        self.model = model
        self.low_precision = low_precision(model, precision, probe=probe)  # "fp8": one, kept
        self.seed = int(seed)
        self.verdict = ReportJudge(alarm)
        self.measurer = Measurer(
            model,
            sample_size=None if sample_size is None else int(sample_size),
            blocks=blocks,
            log_per_head=log_per_head,
            probe=probe,
            group=group,
            owner="StabilityMeter",
        )
        self.last_report: StabilityReport | None = None
        self.measured = 0

    def measure(self, inputs: Any, *, step: int | None = None) -> StabilityReport:
        """Measure ``inputs`` (a tensor, a tuple of positional arguments or a dict of keyword
        arguments of the model's forward) and judge the report.

        Args:
            inputs: what the model's forward takes.
            step: the report's step (your training step); ``None``: :attr:`measured`.

        Returns:
            The report, its ``alarm`` fields set by the early warning.
        """
        args, kwargs = call_arguments(inputs)
        return self.measure_call(args, kwargs, step=step)

    def measure_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, step: int | None = None
    ) -> StabilityReport:
        """:meth:`measure` of ``model(*args, **kwargs)``."""
        if step is None:
            step = self.measured
        check_int("step", step, minimum=0)
        report = self.measurer.measure(
            args, kwargs, step=step, seed=self.seed + step, low_precision=self.low_precision
        )
        self.verdict.observe(report)
        if self.verdict.episode_started:
            self.measurer.warn(
                f"StabilityMeter early warning at step {report.step}: {report.alarm_reason} "
                f"(alarm.rule={self.verdict.alarm.rule!r}; it stays quiet until the alarm stops firing)."
            )
        self.last_report = report
        self.measured += 1
        return report

    def judgement(self) -> Judgement:
        """The verdict of the reports measured so far (status, findings, advice; ``docs/RULES.md``)."""
        return self.verdict.judgement()

    def summary(self) -> str:
        """:meth:`judgement` in words, as the monitor prints it at the end of a fit."""
        return self.verdict.summary("StabilityMeter")

    def reset(self) -> None:
        """Forget the reports measured (the probe and what it found stay)."""
        self.verdict.reset()
        self.last_report = None
        self.measured = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint: the verdict so far, the open alarm episode, the count."""
        return {**self.verdict.state_dict(), "measured": self.measured}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run keeps its verdict and the z-scores' history)."""
        self.verdict.load_state_dict(state)
        self.measured = int(state.get("measured", 0))

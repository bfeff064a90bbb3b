"""``StabilityMonitor``: where and when the low-precision forward pass is fragile."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._common import (
    inputs_or_raise,
    lightning_log_step,
    low_precision_context,
    tensor_parallel_size,
    unsupported_strategy,
)
from lightning_stability.callbacks._dashboard import TensorBoardDashboard, custom_scalars_layout
from lightning_stability.capture.probe import FP8Precision
from lightning_stability.capture.sharding import UnsupportedSharding
from lightning_stability.meter._cli_types import NonNegativeInt, PositiveInt
from lightning_stability.meter.checks import check_choice, check_int, check_patterns
from lightning_stability.meter.measurer import Measurer
from lightning_stability.meter.options import AlarmOptions, ProbeOptions, check_alarm, check_probe
from lightning_stability.meter.precision import PRECISIONS, LowPrecision, PrecisionName
from lightning_stability.meter.verdict import ReportJudge
from lightning_stability.rules import Judgement
from lightning_stability.stability_report import StabilityReport

__all__ = ["StabilityMonitor", "custom_scalars_layout"]


class StabilityMonitor(Callback):
    r"""Measure the forward pass's low-precision fragility every every_n_steps training steps.

    At a sampled step it takes ``sample_size`` examples of the current batch and runs
    the model twice without gradients — in the training's low precision and in exact
    FP32 — and logs, per block and for the model, the forward mismatch ``r_block`` and
    the diagnostics that predict it (``docs/SPEC.md``): κ_score, κ_softmax, κ(V),
    ‖W_O‖₂, ρ_LN, C_LN, κ_eff, the combined predictor, optionally the residual gains and
    the unified bound. Training is not changed: same parameters, RNG stream, module
    modes, no hooks left behind; steps that are not sampled cost nothing.

    It is Lightning's glue around the one measurement of :func:`lightning_stability.measure`
    (:class:`~lightning_stability.meter.Measurer`) and the rule book's judge
    (:class:`~lightning_stability.ReportJudge`): when to measure, the batch's inputs, the
    trainer's precision context, the loggers and the dashboard, the warnings, :meth:`on_alarm`.

    Logged steps: a measurement made after optimizer step N (``trainer.global_step == N``,
    on the batch that step trained on) is logged at step N − 1, the step under which
    Lightning logs that batch's ``training_step`` values, so the two join on ``step``.

    (The Args below are plain text: ``LightningCLI --help`` prints them as written.)

    Args:
        every_n_steps: measure when trainer.global_step (optimizer steps) is a multiple of this (an
            integer >= 1); with gradient accumulation on the micro-batch after which the optimizer
            stepped, never on one inside an accumulation window (docs/DISTRIBUTED.md).
        sample_size: examples of the batch to measure (fewer if the batch is smaller).
        precision: low precision of the measured pass. None (default): the trainer's own;
            bf16 or fp16: that autocast, so an FP32 run can ask "what would BF16 do?";
            fp32: plain FP32; fp8: the FP8 what-if (every linear layer's GEMM on E4M3
            operands with FP32 accumulation, the rest in BF16 autocast; the recipe is
            probe.fp8_recipe), logging per-layer FP8 statistics (docs/FP8.md).
        blocks: name patterns of the blocks, e.g. [model.h.*] (* stays within one name
            segment, ** spans segments); None finds the repeated layers (docs/guide/models.md).
        log_per_head: also log stability/block{i}/head{h}/<name>.
        seed: seed of the private generator choosing the sampled examples.
        probe: what the probe measures (ProbeOptions: head_reduction, batch_reduction,
            residual_gain_iters, local_errors, balanced_mass, reuse_weight_spectra, weight_spectra,
            eps_mach, ln_c1, ln_c2, ln_c3, bound_c, fp8_recipe, fp8_attention).
        alarm: the early warning (AlarmOptions: rule default or paper, and its levels;
            docs/RULES.md).

    Attributes:
        last_report: the last sampled step's :class:`StabilityReport`.
        judgement: the verdict of the last fit (set at its end), structured: status, findings, advice.
        summary: the same verdict in words (set at the end of fit, printed on rank zero).
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 50,
        sample_size: PositiveInt = 16,
        precision: PrecisionName | None = None,
        blocks: list[str] | None = None,
        log_per_head: bool = False,
        seed: NonNegativeInt = 0,
        probe: ProbeOptions = ProbeOptions(),  # noqa: B008 (frozen: one shared default is safe)
        alarm: AlarmOptions = AlarmOptions(),  # noqa: B008
    ) -> None:
        check_int("every_n_steps", every_n_steps)
        check_int("sample_size", sample_size)
        check_choice("precision", precision, (None, *PRECISIONS))
        check_patterns("blocks", blocks)
        check_choice("log_per_head", log_per_head, (True, False))
        check_int("seed", seed, minimum=0)
        check_probe(probe, precision)
        check_alarm(alarm)
        self.every_n_steps = int(every_n_steps)  # plain ints also when LightningCLI passed PositiveInt
        self.sample_size = int(sample_size)
        self.precision = precision
        self.blocks = blocks
        self.log_per_head = log_per_head
        self.seed = seed
        self.probe = probe
        self.alarm = alarm
        self.last_report: StabilityReport | None = None
        self.judgement: Judgement | None = None
        self.summary: str | None = None
        self._verdict = ReportJudge(alarm)
        self._measurer: Measurer | None = None
        self._fp8: FP8Precision | None = None  # precision="fp8": the FP8 what-if's factory, kept
        self._fp8_state: dict[str, Any] = {}  # a checkpoint's FP8 state, until the factory exists
        self._last_step = -1
        self._warned: set[str] = set()
        #: why nothing is measured in this fit (an unsupported strategy), else None
        self._refusal: str | None = None
        self._dashboard = TensorBoardDashboard()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, precision=self.precision)

    # ----------------------------------------------------------------- inputs
    def inputs_from_batch(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model inputs in a training batch: ``model(*args, **kwargs)``.

        A tensor is the input; a tuple or list holds the input first (``(x, y)``); a dict
        is passed as keyword arguments, label keys (``labels``, ``label``, ``target``,
        ``targets``, ``y``, ``class_labels``) dropped. Override this for other batches.
        The monitor samples along the leading axis of every tensor of the batch size.
        """
        return inputs_or_raise(batch, "StabilityMonitor")

    def on_alarm(self, trainer: Trainer, pl_module: LightningModule, report: StabilityReport) -> None:
        """Called (on every rank) once per alarm episode, when the early warning starts firing.

        ``report.alarm_reason`` says which rule fired in which block. Override to act on it: for
        example save a checkpoint, tighten precision, or lower the learning rate. The default
        does nothing beyond the logged ``stability/alarm`` and the warning.
        """

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._refusal or step % self.every_n_steps or step == self._last_step:
            return
        if _inside_accumulation_window(trainer, batch_idx):  # the optimizer has not stepped on it
            return
        self._last_step = step
        args, kwargs = self.inputs_from_batch(batch)
        try:
            report = self.measure(trainer, pl_module, args, kwargs)
            report.batch_idx = batch_idx
            self._name_micro_batch(trainer, batch_idx)
        except UnsupportedSharding as err:  # FSDP1/DeepSpeed modules found in the model: say it once
            self._refuse(str(err))
            return
        except Exception as err:  # the monitor never stops training
            hint = ""
            if self._once("skip"):
                hint = (
                    " (if the model is not called as pl_module(*args, **kwargs) with the batch's inputs, "
                    "override `StabilityMonitor.inputs_from_batch(batch)`)"
                )
            rank_zero_warn(f"StabilityMonitor skipped step {step}: {type(err).__name__}: {err}{hint}")
            return
        self._log(trainer, pl_module, report)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit is judged afresh; a checkpoint's state is restored after this
            self._verdict.reset()
            self.judgement = self.summary = None
            self._refusal = None
            refusal = unsupported_strategy(trainer.strategy)
            if refusal is not None:
                self._refuse(refusal)

    def _name_micro_batch(self, trainer: Trainer, batch_idx: int) -> None:
        """Once, under gradient accumulation: which micro-batch a measurement samples."""
        n = trainer.accumulate_grad_batches
        if n > 1 and self._once("accumulation"):
            rank_zero_info(
                f"StabilityMonitor: with accumulate_grad_batches={n}, every_n_steps counts optimizer steps "
                "and each measurement samples the last micro-batch of the accumulation window, the one after "
                f"which the optimizer stepped (this time batch_idx {batch_idx}; report.batch_idx names it)."
            )

    def _refuse(self, reason: str) -> None:
        """Stop measuring in this fit, saying why once (rank zero)."""
        if self._refusal is None:
            rank_zero_warn(f"StabilityMonitor will not measure in this fit: {reason}")
        self._refusal = reason

    def _once(self, key: str) -> bool:
        """``True`` the first time ``key`` is asked (one message of each kind per monitor)."""
        first = key not in self._warned
        self._warned.add(key)
        return first

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The verdict: kept as :attr:`judgement` and in words as :attr:`summary`, printed on rank zero
        and written to TensorBoard as text.

        The rule book (``docs/RULES.md``) judges every sampled step: the status (healthy, watch,
        at risk), the findings (which rule, block, value and step), the most fragile block by
        ``r_local``, the FP16 headroom, the largest attention logit, the alarms that fired, and the
        advice that answers each finding.
        """
        self.judgement = self._verdict.judgement()
        self.summary = self._verdict.summary("StabilityMonitor")
        if not trainer.is_global_zero:
            return
        print(self.summary)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # two trailing spaces: a markdown line break in TensorBoard's text tab
                text = self.summary.replace("\n", "  \n")
                logger.experiment.add_text("stability/summary", text, global_step=trainer.global_step)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._dashboard.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        fp8 = self._fp8.state_dict() if self._fp8 is not None else dict(self._fp8_state)
        return {"last_step": self._last_step, **self._verdict.state_dict(), "fp8": fp8}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        # the z-scores' history only when written by the same rules, an open episode of the same alarm
        self._verdict.load_state_dict(state_dict)
        self._fp8_state = dict(state_dict.get("fp8") or {})  # delayed scaling's amax history
        if self._fp8 is not None:
            self._fp8.load_state_dict(self._fp8_state)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say once when the paper's rolling-z alarm cannot fire within this run's length.

        The default rule (absolute levels) can fire at the first sampled step; the paper's
        z-score needs a full window of history first.
        """
        if self.alarm.rule != "paper":
            return
        window, seen = self._verdict.judge.alarm.z_history("kappa_softmax_z")
        total = trainer.estimated_stepping_batches
        needed = window - seen + 1  # a full window, then the sample judged
        first = (trainer.global_step // self.every_n_steps + needed) * self.every_n_steps  # (resumed too)
        if math.isfinite(total) and first > total:
            rank_zero_warn(
                f"StabilityMonitor: the early-warning alarm cannot fire in this run: alarm.rule='paper' "
                f"needs alarm.window={window} sampled steps of history x every_n_steps="
                f"{self.every_n_steps} before it can judge one (first possible after training step "
                f"{first}, logged as step {first - 1}), but the run has {int(total)} training steps. "
                "Lower every_n_steps or alarm.window."
            )

    # ------------------------------------------------------------ measurement
    def measure(
        self, trainer: Trainer, pl_module: LightningModule, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StabilityReport:
        """Sample, run both passes, reduce across ranks and build :attr:`last_report`.

        The measurement of :func:`lightning_stability.measure`, in the trainer's precision
        context (or the forced ``precision``): the sample is seeded by ``seed + trainer.global_step``
        and the report's step is Lightning's logging step of the batch. Under DDP every rank
        measures; the ranks first agree that every one of them measured (one small collective),
        so a rank that failed makes all of them skip the step instead of leaving the others
        waiting in the reduction. Under sharding (FSDP2, tensor parallel) the passes themselves
        are collectives: the ranks also agree that all of them sampled their examples before any
        pass starts; under ``ModelParallelStrategy`` the ranks of one tensor-parallel group are
        combined by max before the data-parallel replicas (:class:`Measurer`).
        """
        # report.step is the logged step (joins Lightning's training_step rows); global_step seeds the sample
        report = self.measurer(trainer, pl_module).measure(
            args,
            kwargs,
            step=lightning_log_step(trainer),
            seed=self.seed + trainer.global_step,
            low_precision=self._low_precision(trainer, pl_module),
        )
        self.last_report = report
        return report

    def measurer(self, trainer: Trainer, pl_module: LightningModule) -> Measurer:
        """The :class:`Measurer` of ``pl_module`` (made at its first measurement, kept for the fit)."""
        if self._measurer is None or self._measurer.model is not pl_module:
            self._measurer = Measurer(
                pl_module,
                sample_size=self.sample_size,
                blocks=self.blocks,
                log_per_head=self.log_per_head,
                probe=self.probe,
                owner="StabilityMonitor",
            )
        self._measurer.tensor_parallel = tensor_parallel_size(trainer)
        return self._measurer

    def _low_precision(self, trainer: Trainer, pl_module: LightningModule) -> LowPrecision:
        """The context factory of the low-precision pass: the trainer's own or a forced autocast, or
        the FP8 what-if's (kept across steps and in the checkpoint: delayed scaling's history)."""
        if self.precision != "fp8":
            return lambda: low_precision_context(trainer, pl_module, self.precision)
        if self._fp8 is None or self._fp8.model is not pl_module:
            opts = self.probe
            self._fp8 = FP8Precision(pl_module, opts.fp8_recipe or "current", attention=opts.fp8_attention)
            self._fp8.load_state_dict(self._fp8_state)
        return self._fp8

    # ---------------------------------------------------------------- logging
    def _log(self, trainer: Trainer, pl_module: LightningModule, report: StabilityReport) -> None:
        """Judge the step (the report's ``alarm`` fields), log ``report.metrics()``, warn once per episode."""
        self._verdict.observe(report)
        metrics = report.metrics()
        for logger in trainer.loggers:
            if not (isinstance(logger, TensorBoardLogger) and trainer.is_global_zero):
                logger.log_metrics(metrics, step=report.step)
                continue
            # one event instead of one per tag; then, same step, layout, log10 copies, block sub-runs
            self._dashboard.log_metrics(logger, metrics, step=report.step)
            self._dashboard.write(logger, metrics, [b.name for b in report.blocks], step=report.step)
        if self._verdict.episode_started:  # warn once per episode, not at every firing check
            rank_zero_warn(
                f"StabilityMonitor early warning at step {report.step}: {report.alarm_reason} "
                f"(alarm.rule={self.alarm.rule!r}; it stays quiet until the alarm stops firing)."
            )
            self.on_alarm(trainer, pl_module, report)


def _inside_accumulation_window(trainer: Trainer, batch_idx: int) -> bool:
    """Whether the batch just trained is a micro-batch after which the optimizer did not step
    (``accumulate_grad_batches > 1``: not the last of its window, nor the epoch's last batch)."""
    k = trainer.accumulate_grad_batches
    return k > 1 and (batch_idx + 1) % k != 0 and not trainer.is_last_batch

"""One model measured: the probe (blocks, norms and weights found once), the sample, the two passes,
the cross-rank reduction and the report.

:class:`Measurer` is the one path of every measurement: :func:`~lightning_stability.measure`,
:class:`~lightning_stability.StabilityMeter` and :class:`~lightning_stability.StabilityMonitor`
all measure through it. It judges nothing (:class:`~lightning_stability.meter.verdict.ReportJudge`
does) and knows nothing of Lightning: the low precision arrives as a context factory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_stability.capture.batch import sample_inputs
from lightning_stability.capture.probe import (
    NO_ATTENTION_WARNING,
    RawMeasurement,
    StabilityProbe,
    WeightSpectra,
    compose_report,
    first_nonfinite_module,
    predictor_warnings,
)
from lightning_stability.capture.probe.reduce import (
    Group,
    all_ranks_agree,
    all_ranks_measured,
    rank,
    reduce_across_ranks,
    tensor_parallel_size,
)
from lightning_stability.capture.sharding import is_sharded, sharding_warnings
from lightning_stability.capture.stacks import unmatched_patterns
from lightning_stability.capture.structure import structure_warnings, unattended_blocks
from lightning_stability.meter.options import ProbeOptions
from lightning_stability.meter.precision import LowPrecision
from lightning_stability.metrics import RawKey
from lightning_stability.stability_report import StabilityReport

__all__ = ["Measurer", "MeasurerMemory"]


@dataclass
class MeasurerMemory:
    """What outlives one :class:`Measurer` of a model (kept by :func:`~lightning_stability.measure`
    per model, weakly): the warnings already given, the kept weight spectra.

    Attributes:
        warned: the kinds of warning already given (each is given once).
        spectra: the weight spectra kept for reuse (``ProbeOptions.reuse_weight_spectra``).
        fp8: the FP8 what-if's factory of ``precision="fp8"`` (delayed scaling's amax history).
    """

    warned: set[str] = field(default_factory=set)
    spectra: WeightSpectra | None = None
    fp8: LowPrecision | None = None


class Measurer:
    """Measures one model, on every rank of ``group`` alike.

    Args:
        model: the model; it is called as ``model(*args, **kwargs)``.
        sample_size: examples to measure (drawn from the leading axis of every tensor of the batch
            size); ``None``: all of them.
        blocks: ``fnmatch`` patterns naming the blocks; ``None`` finds the repeated layers.
        log_per_head: also keep per-head values.
        probe: what the probe measures.
        group: the process group to reduce over (``None``: the default one, when initialised).
        tensor_parallel: ranks of one tensor-parallel group (consecutive ranks of ``group`` holding
            one model replica, Lightning's ``ModelParallelStrategy`` layout); ``None``: read from the
            model's DTensor parameters (1 without tensor parallelism).
        owner: the name the warnings start with.
        memory: warnings given and spectra kept by an earlier measurer of the same model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sample_size: int | None = None,
        blocks: Sequence[str] | None = None,
        log_per_head: bool = False,
        probe: ProbeOptions = ProbeOptions(),  # noqa: B008 (frozen)
        group: Group = None,
        tensor_parallel: int | None = None,
        owner: str = "StabilityMeter",
        memory: MeasurerMemory | None = None,
    ) -> None:
        self.model = model
        self.sample_size = sample_size
        self.blocks = list(blocks) if blocks is not None else None
        self.log_per_head = log_per_head
        self.options = probe
        self.group = group
        self.tensor_parallel = tensor_parallel
        self.owner = owner
        self.memory = memory if memory is not None else MeasurerMemory()
        self._probe: StabilityProbe | None = None

    @property
    def probe(self) -> StabilityProbe:
        """The model's probe, built at the first measurement (a sharded model is set up by then)."""
        if self._probe is None:
            opts = self.options
            self._probe = StabilityProbe(
                self.model,
                self.blocks,
                opts.head_reduction,
                opts.batch_reduction,
                int(opts.residual_gain_iters),
                self.log_per_head,
                opts.local_errors,
                opts.balanced_mass,
                reuse_weight_spectra=opts.reuse_weight_spectra,
                weight_spectra=opts.weight_spectra,
            )
            if opts.reuse_weight_spectra:  # the copies kept at an earlier measurement of this model
                if self.memory.spectra is None:
                    self.memory.spectra = self._probe.spectra
                self._probe.spectra = self.memory.spectra
        return self._probe

    def measure(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        step: int,
        seed: int,
        low_precision: LowPrecision,
    ) -> StabilityReport:
        """Sample, run both passes, reduce across ranks and compose the report.

        When distributed, every rank calls this; the ranks first agree that every one of them
        measured the same statistics (one small collective), so a rank that failed makes all of
        them raise instead of leaving the others waiting in the reduction. Under sharding (FSDP2,
        tensor parallel) the passes themselves are collectives: the ranks also agree that all of
        them sampled their examples before any pass starts.

        Args:
            args: positional inputs of the model's forward.
            kwargs: keyword inputs.
            step: the report's step.
            seed: seeds the sample's choice of examples and the residual-gain start vectors.
            low_precision: the context factory of the low-precision pass.

        Raises:
            Exception: this rank's error when it could not measure; ``RuntimeError`` when another
                rank could not.
        """
        raw: RawMeasurement | None = None
        error: Exception | None = None
        try:
            if self.sample_size is not None:
                args, kwargs = sample_inputs(args, kwargs, self.sample_size, seed)
        except Exception as err:
            error = err
        if is_sharded(self.model) and not all_ranks_agree(error is None, self._device(), self.group):
            raise error or RuntimeError("another rank could not sample this step")
        if error is None:
            try:
                raw = self._measure_locally(args, kwargs, low_precision, seed)
            except Exception as err:
                error = err
        if not all_ranks_measured(raw, self._device(), self.group):
            raise error or RuntimeError("another rank could not measure this step")
        assert raw is not None
        values = self._reduce(raw)
        opts = self.options
        constants = (float(opts.ln_c1), float(opts.ln_c2), float(opts.ln_c3))
        report = compose_report(self.probe, raw, values, step, constants, float(opts.bound_c), opts.eps_mach)
        if report.nonfinite:
            report.first_nonfinite = first_nonfinite_module(self.model, args, kwargs, low_precision)
            self.warn(
                f"{self.owner}: the low-precision ({report.dtype}) forward went non-finite at step "
                f"{report.step} ({report.nonfinite} values in block outputs); first non-finite module: "
                f"{report.first_nonfinite!r}. r_block is inf; training goes on."
            )
        return report

    def _measure_locally(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], low_precision: LowPrecision, seed: int
    ) -> RawMeasurement:
        """Both passes on this rank's sample, with the one-time warnings (no collective of its own;
        the passes of a sharded model all-gather parameters, heads under tensor parallelism, on
        every rank alike)."""
        probe = self.probe
        if self.once("structure"):
            self._warn_structure(probe)
        if not probe.blocks and self.once("no_blocks"):
            self.warn(
                f"{self.owner} found no blocks (no repeated layers in an nn.ModuleList, or no module "
                f"matching blocks={self.blocks}); only model-level attention values are logged. "
                "Name the residual blocks with `blocks=[...]` patterns."
            )
        raw = probe.measure(args, kwargs, low_precision, seed=seed)
        if raw.attention_calls == 0 and self.once("no_attention"):
            self.warn(NO_ATTENTION_WARNING.replace("StabilityMonitor", self.owner, 1))
        if raw.fp8_unquantized and self.once("fp8_unquantized"):
            self.warn(
                f"{self.owner}: the FP8 what-if leaves {raw.fp8_unquantized} in BF16 autocast (a "
                "linear layer with its own forward, or one whose weight its parent uses directly, e.g. "
                "nn.MultiheadAttention's out_proj); they get no per-layer FP8 statistics."
            )
        if self.once("unattended"):  # after the first measured step: who saw attention is known
            unattended = unattended_blocks(probe.blocks, raw.attended)
            if unattended:
                self.warn(
                    f"{self.owner}: " + "; ".join(unattended) + " (their attention diagnostics are "
                    "absent; check the `blocks` patterns, or call lightning_stability.observe_attention "
                    "in the attention's forward)"
                )
        return raw

    def _reduce(self, raw: RawMeasurement) -> dict[RawKey, float]:
        """Every rank's values combined (:func:`reduce_across_ranks`); under tensor parallelism the
        ranks of one group measured the same examples and are combined by max first."""
        tp = self.tensor_parallel if self.tensor_parallel is not None else tensor_parallel_size(self.model)
        return reduce_across_ranks(raw, self.group, tensor_parallel=tp)

    def _warn_structure(self, probe: StabilityProbe) -> None:
        """Weights not found, fused layouts not understood, patterns matching nothing, what tensor
        parallelism leaves inexact."""
        lines = structure_warnings(probe.blocks) + predictor_warnings(probe.blocks)
        lines += sharding_warnings(probe.model, probe.blocks, probe.head_groups)
        unmatched = unmatched_patterns(probe.model, self.blocks or [])
        if unmatched:
            lines.append(f"blocks patterns {unmatched} match no module of the model")
        if lines:
            self.warn(f"{self.owner}: " + "\n".join(lines))

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def once(self, key: str) -> bool:
        """``True`` the first time ``key`` is asked (one warning of each kind per model)."""
        first = key not in self.memory.warned
        self.memory.warned.add(key)
        return first

    def warn(self, message: str) -> None:
        """A ``UserWarning`` on rank zero of the group (every rank decides alike, one rank speaks)."""
        if rank(self.group) == 0:
            warnings.warn(message, UserWarning, stacklevel=3)

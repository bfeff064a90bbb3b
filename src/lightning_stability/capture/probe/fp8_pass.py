"""The FP8 what-if as the probe's low precision (``precision="fp8"``), and its per-layer statistics.

The probe's passes take a context factory for their low-precision forwards
(:meth:`~.stability_probe.StabilityProbe.measure`'s ``low_precision``). :class:`FP8Precision` is
that factory for FP8: every forward runs under
:class:`~lightning_stability.capture.fp8.FP8WhatIf` — the linear layers' GEMMs on E4M3
operands with FP32 accumulation, everything else under BF16 autocast — so the propagated error
(``r_block``) and the block-local errors (``r_local``, ``r_attention_local``, ``r_ffn_local``)
are those of FP8 training. Two kinds of forward:

* :meth:`FP8Precision.measured` — the propagated low-precision pass: each layer call's output is
  also compared with the same call in FP32 and under BF16 autocast, the quantizers' statistics
  are kept (:func:`fp8_statistics` turns them into raw keys), and delayed scaling records this
  step's amaxes; the amax history then advances (one measurement is one step of the recipe).
* calling the factory — every other forward of the measurement (the teacher-forced re-runs, the
  non-finite finder): FP8 GEMMs alone, with the scales of the measured pass (delayed scaling
  reads a copy of the history as that pass found it and leaves the history alone).

The history of delayed scaling is the caller's across measurements (:meth:`FP8Precision.state_dict`):
it holds the amaxes of the sampled steps only, so its window counts sampled steps.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_stability.capture.fp8 import FP8Record, FP8WhatIf
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.sharding import UnsupportedSharding, is_sharded
from lightning_stability.diagnostics.fp8_recipe import AmaxHistory, FP8Recipe, RecipeName
from lightning_stability.metrics import RawKey

__all__ = ["FP8Precision", "fp8_statistics"]


class FP8Precision:
    """The low-precision context factory of FP8 passes (see the module docstring).

    Args:
        model: the measured model.
        recipe: an :class:`~lightning_stability.diagnostics.fp8_recipe.FP8Recipe` or its name
            (``"current"``, ``"delayed"``, ``"mxfp8"``).
        attention: also run the attention matmuls of every SDPA call in FP8 (TE's ``fp8_dpa``).
        autocast_dtype: autocast around everything that is not an FP8 GEMM.

    Raises:
        UnsupportedSharding: ``model`` is sharded (FSDP2, tensor parallel): the FP8 GEMMs read
            whole weights and are not emulated on shards.

    Example:
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> fp8 = FP8Precision(model, "delayed")
        >>> with fp8.measured() as step:
        ...     _ = model(torch.randn(8, 32))
        >>> sorted(step.records), fp8.dtype, float(fp8.history.scale("0/weight")) > 1
        (['0', '2'], torch.float8_e4m3fn, True)
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: FP8Recipe | RecipeName = "current",
        *,
        attention: bool = False,
        autocast_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if is_sharded(model):
            raise UnsupportedSharding(
                "precision='fp8' does not run on a sharded model (FSDP2 or tensor parallel): the FP8 "
                "what-if quantizes whole weights. Measure it on one process (a single-device fit "
                "or lightning_stability.measure on the same checkpoint)."
            )
        self.model = model
        self.recipe = recipe if isinstance(recipe, FP8Recipe) else FP8Recipe(recipe)
        self.attention = attention
        self.autocast_dtype = autocast_dtype
        #: delayed scaling's state across measurements (``None`` for the other recipes)
        self.history: AmaxHistory | None = None
        if self.recipe.name == "delayed":
            self.history = self.recipe.new_history()
        self._step_history: AmaxHistory | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The format the GEMM operands are rounded to (``torch.float8_e4m3fn``): the pass's dtype."""
        return self.recipe.fmt.dtype

    def measured(self) -> FP8WhatIf:
        """The context of the propagated pass: per-layer errors and statistics, the history advances."""
        self._step_history = copy.deepcopy(self.history)
        return FP8WhatIf(
            self.model,
            self.recipe,
            history=self.history,
            attention=self.attention,
            autocast_dtype=self.autocast_dtype,
            measure_error=True,
            update_history=True,
        )

    def __call__(self) -> FP8WhatIf:
        """The context of any other FP8 forward: the measured pass's scales, nothing recorded."""
        history = self._step_history if self._step_history is not None else copy.deepcopy(self.history)
        return FP8WhatIf(
            self.model,
            self.recipe,
            history=history,
            attention=self.attention,
            autocast_dtype=self.autocast_dtype,
            measure_error=False,
            update_history=False,
        )

    def state_dict(self) -> dict[str, Any]:
        """The recipe's name and delayed scaling's history (``None`` for the other recipes)."""
        return {
            "recipe": self.recipe.name,
            "history": None if self.history is None else self.history.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a history saved under another recipe is not taken."""
        saved = state.get("history")
        if self.history is not None and saved is not None and state.get("recipe") == self.recipe.name:
            self.history.load_state_dict(saved)
        self._step_history = None


def fp8_statistics(raw: RawMeasurement, records: Mapping[str, FP8Record]) -> None:
    """Keep each layer's FP8 statistics in ``raw`` as :class:`~lightning_stability.metrics.RawKey` records.

    Per layer (``module=`` its name): the parts of ``fp8_error`` / ``bf16_error`` (summed squares)
    and of ``fp8_error_token`` / ``bf16_error_token`` (token sums and counts); per operand
    (``operand=``): the counts of ``fp8_underflow`` and ``fp8_saturation``, ``fp8_amax`` and the
    extreme dequantization factors. Every part has its cross-rank reduction in the metric table.
    """
    for name, rec in records.items():
        ref_sq = rec.ref_sq
        if rec.err_sq is not None and ref_sq is not None and rec.token_err is not None:
            tokens = torch.tensor(float(rec.tokens), dtype=torch.float64, device=ref_sq.device)
            _error_parts(raw, name, "fp8", rec.err_sq, ref_sq, rec.token_err, tokens)
            if rec.err_sq_autocast is not None and rec.token_err_autocast is not None:
                _error_parts(raw, name, "bf16", rec.err_sq_autocast, ref_sq, rec.token_err_autocast, tokens)
        for operand, stats in rec.operands.items():
            parts = (
                ("underflow", "fp8_underflow", stats.underflow),
                ("nonzero", "fp8_underflow", stats.nonzero),
                ("saturated", "fp8_saturation", stats.saturated),
                ("numel", "fp8_saturation", stats.numel),
                ("fp8_amax", None, stats.amax),
                ("fp8_scale_inv_min", None, stats.scale_inv_min),
                ("fp8_scale_inv_max", None, stats.scale_inv_max),
            )
            for stat, metric, value in parts:
                raw.put(RawKey(stat, metric=metric, module=name, operand=operand), value)


def _error_parts(
    raw: RawMeasurement,
    name: str,
    precision: str,
    err_sq: torch.Tensor,
    ref_sq: torch.Tensor,
    token_err: torch.Tensor,
    tokens: torch.Tensor,
) -> None:
    raw.put(RawKey("err_sq", module=name, metric=f"{precision}_error"), err_sq)
    raw.put(RawKey("ref_sq", module=name, metric=f"{precision}_error"), ref_sq)
    raw.put(RawKey("token_sum", module=name, metric=f"{precision}_error_token"), token_err)
    raw.put(RawKey("token_count", module=name, metric=f"{precision}_error_token"), tokens)

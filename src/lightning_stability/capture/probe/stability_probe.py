"""The probe: a model's blocks, normalization layers and attention, measured in two passes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Literal

import torch
from torch import nn

from lightning_stability.capture.blocks import find_sublayers, first_tensor
from lightning_stability.capture.norms import NormLayer, find_norms
from lightning_stability.capture.probe.passes import _Collector
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.probe.spectra import WeightSpectra
from lightning_stability.capture.sharding import check_supported, head_groups
from lightning_stability.capture.side_forward import side_forward
from lightning_stability.capture.structure import Block, model_blocks

NO_ATTENTION_WARNING = (
    "StabilityMonitor found no attention in this model, so the attention diagnostics "
    "(kappa_score, kappa_softmax, kappa_v) are not reported; the forward mismatch still is. "
    "Supported: F.scaled_dot_product_attention, nn.MultiheadAttention / nn.Transformer*Layer, "
    "transformers' 'sdpa' and 'eager' attention. For attention written with an explicit softmax, "
    "call lightning_stability.observe_attention(q, k, v, attn_mask) from its forward."
)


class StabilityProbe:
    """Two-pass measurement of one model.

    Args:
        model: the model (usually the ``LightningModule``).
        blocks: ``fnmatch`` patterns naming the blocks; ``None`` finds the repeated layers.
        head_reduction: ``"max"`` or ``"sum"`` over heads of ``kappa_softmax`` (SPEC §1: the paper
            sums the softmax term); ``kappa_score`` and ``kappa_v`` are always the max over heads.
        batch_reduction: ``"max"`` or ``"mean"`` over the sampled examples.
        residual_gain_iters: power-iteration steps for ``ρ_ℓ``; 0 skips it (and the bound).
        log_per_head: also keep per-head values.
        local_errors: run every block (and its attention / FFN sub-layers) a second time in the
            low precision on its exact FP32 input (``r_local``…); ``False`` skips that cost.
        balanced_mass: also compute the balanced-mass factor ``θ(p)`` of every attention row
            (``theta``); exact subset-mass search, costly (see README), so off by default.
        reuse_weight_spectra: keep a copy of every conditioned weight and reuse its spectrum
            (``‖W_O‖₂``, ``κ``, ``κ(W_Kᵀ W_Q)``) at a later measurement if the weight is bitwise
            equal to the copy (exact: the same numbers as recomputing). Pays off only for weights
            that do not move (frozen layers, a base model under adapters): in training every
            step moves every weight (README, *Cost of the probe's own work*). Costs one copy of
            those weights in memory, so off by default.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str] | None = None,
        head_reduction: Literal["max", "sum"] = "max",
        batch_reduction: Literal["max", "mean"] = "max",
        residual_gain_iters: int = 0,
        log_per_head: bool = False,
        local_errors: bool = True,
        balanced_mass: bool = False,
        reuse_weight_spectra: bool = False,
    ) -> None:
        check_supported(model)  # FSDP1, DeepSpeed ZeRO-3: UnsupportedSharding
        self.model = model
        self.blocks: list[Block] = model_blocks(model, blocks)
        self.norms: list[NormLayer] = find_norms(model)
        self.norm_block: dict[str, int] = {}
        for norm in self.norms:
            for block in self.blocks:
                if block.contains(norm.name):
                    self.norm_block[norm.name] = block.index
        #: per block, its attention / FFN sub-layers: ``{index: {"attention": module, ...}}``
        self.sublayers: dict[int, dict[str, nn.Module]] = {
            b.index: {kind: m for kind, (_, m) in find_sublayers(b.module).items()} for b in self.blocks
        }
        self.head_reduction = head_reduction
        self.batch_reduction = batch_reduction
        self.residual_gain_iters = residual_gain_iters
        self.log_per_head = log_per_head
        self.local_errors = local_errors
        self.balanced_mass = balanced_mass
        self.spectra = WeightSpectra(reuse_weight_spectra)
        self._block_spectra: dict[int, WeightSpectra] = {}
        #: blocks whose attention heads tensor parallelism splits across ranks: their process group
        self.head_groups = head_groups(model, self.blocks)

    def spectra_of(self, blocks: list[Block]) -> WeightSpectra:
        """Where the spectra of ``blocks`` are kept for reuse: :attr:`spectra` for all blocks at once,
        one store per block when sharded weights are read a block at a time (reuse is keyed by
        position within a call of :func:`~lightning_stability.capture.probe.spectra.weight_statistics`)."""
        if len(blocks) != 1 or len(self.blocks) == 1:
            return self.spectra
        return self._block_spectra.setdefault(blocks[0].index, WeightSpectra(self.spectra.reuse))

    def block_of(self, module_name: str) -> int | None:
        """Index of the block containing the module ``module_name`` (``None``: outside every block)."""
        return next((b.index for b in self.blocks if b.contains(module_name)), None)

    def measure(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        low_precision: Callable[[], AbstractContextManager[Any]],
        forward: Callable[..., Any] | None = None,
        seed: int = 0,
    ) -> RawMeasurement:
        """Run the FP32 and the low-precision pass on one sample; nothing about training changes.

        The steps, in order (each a method of :class:`_Collector`): the exact FP32 pass
        (attention, norm statistics, block outputs, module maxima), the residual gains, the
        low-precision pass compared block by block as it runs, the local (teacher-forced)
        passes, then the statistics.

        Args:
            args: positional inputs of ``forward``.
            kwargs: keyword inputs of ``forward``.
            low_precision: returns the context of the low-precision pass (autocast, or the
                trainer's precision context).
            forward: what to call (default: the model).
            seed: seeds the residual-gain start vectors.
        """
        run = forward or self.model
        collector = _Collector(self)
        with side_forward(self.model) as same_stream:
            collector.exact_pass(run, args, kwargs, same_stream)
            if self.residual_gain_iters > 0:  # with the taps removed: its block calls are not recorded
                collector.residual_gains(seed)
            collector.low_precision_pass(run, args, kwargs, low_precision, same_stream)
            if self.local_errors:
                collector.local_passes(low_precision)
        return collector.finish()


def first_nonfinite_module(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    low_precision: Callable[[], AbstractContextManager[Any]],
) -> str | None:
    """Re-run the low-precision pass; name the first leaf module whose output is non-finite.

    Only called after a step found non-finite block outputs, so the per-module check (a host
    sync each) costs nothing in normal steps.
    """
    found: list[str] = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            out = first_tensor(output)
            if not found and out is not None and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)

        return fn

    with ExitStack() as stack:
        for name, module in model.named_modules():
            if not any(True for _ in module.children()):
                stack.enter_context(module.register_forward_hook(hook(name)))
        stack.enter_context(side_forward(model))
        stack.enter_context(low_precision())
        model(*args, **kwargs)
    return found[0] if found else None

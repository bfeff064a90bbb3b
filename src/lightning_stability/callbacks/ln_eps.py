"""``LNEpsilonBump``: raise the ε of ε-dominated normalization layers during training (Algorithm 1)."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._common import (
    check_eps_rule,
    inputs_or_raise,
    is_distributed,
    low_precision_context,
    low_precision_dtype,
)
from lightning_stability.capture.batch import sample_inputs
from lightning_stability.diagnostics import eps_mach as dtype_eps_mach
from lightning_stability.meter.checks import check_choice, check_int, check_number, check_patterns
from lightning_stability.mitigations.eps_bump import EpsilonBump, find_changeable_norms
from lightning_stability.rules.thresholds import (
    EPS_BUMP_MAX,
    EPS_BUMP_MIN,
    EPS_BUMP_TARGET_RHO,
    RHO_LN_WATCH,
)


def bump_norms(
    trainer: Trainer,
    pl_module: LightningModule,
    bump: EpsilonBump,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    eps_mach: float,
    owner: str,
) -> dict[str, float]:
    """Measure ``bump``'s norms on this rank's sample, gather every rank's statistics, apply Algorithm 1.

    A rank whose forward fails warns (naming ``owner``) and still takes part in the gather with an
    empty table, so no rank waits. Returns ``{layer name: new ε}`` for the layers whose ε rose.
    """
    step = trainer.global_step
    try:
        table = bump.measure(pl_module, args, kwargs, lambda: low_precision_context(trainer, pl_module, None))
    except Exception as err:  # never stop training; ranks still take part in the gather below
        rank_zero_warn(f"{owner} skipped step {step}: {type(err).__name__}: {err}")
        table = bump.table(None, pl_module.device)
    if is_distributed(trainer):
        table = trainer.strategy.all_gather(table).reshape(-1, len(bump.layers), 3)
    else:
        table = table.unsqueeze(0)
    return bump.apply(table.cpu().tolist(), eps_mach, step)  # the one device→host transfer


class LNEpsilonBump(Callback):
    r"""Raise the ε of ε-dominated LayerNorm/RMSNorm layers every every_n_steps steps (SPEC §6).

    At every ``every_n_steps``-th optimizer step (``trainer.global_step`` a multiple of it,
    once per step even with gradient accumulation, never at step 0) the callback takes
    ``sample_size`` examples of the current batch and runs one forward pass without
    gradients in the trainer's own precision context, in eval mode, with the RNG state
    and the fused-attention fast-path flag restored afterwards. For every normalization
    layer it takes the median per-token variance ``σ²`` of the layer's input (the mean
    square for RMS layers) and computes ``ρ_LN = σ²·d·ε_mach/ε``. When ``ρ_LN < 1`` the
    candidate ``ε_new = clip(σ²·d·ε_mach/ρ*, eps_min, eps_max)`` replaces ε **only if it
    is larger**: ε never decreases. Since ``ε_new/ε = ρ_LN/ρ*`` before clipping, a layer
    moves only when ``ρ* < ρ_LN < 1`` (it is brought to ``ρ_LN = ρ*``) or when its ε is
    below ``eps_min``; ``ρ_LN ≥ 1`` leaves it alone. The rule itself is
    :func:`~lightning_stability.diagnostics.propose_ln_eps_from_variance`.

    Layers: ``nn.LayerNorm``, ``nn.RMSNorm`` (``eps=None`` means ``finfo(input dtype).eps``;
    a bump stores a float, the restore puts ``None`` back) and third-party
    ``*LayerNorm``/``*RMSNorm`` modules whose ``eps`` or ``variance_epsilon`` attribute
    really acts. A norm whose ε cannot be changed (e.g. it calls ``F.layer_norm`` with a
    literal ε) is never touched; one rank-zero warning at fit start names such layers.

    Restore: the original ε values are put back at the end of fit and when fit raises
    (``on_exception``), unless ``restore_on_fit_end=False`` (:meth:`restore` does it by
    hand; calling it twice is harmless). The callback's checkpoint state holds the
    original and current ε per layer name, so a run resumed with ``ckpt_path=`` goes on
    with the bumped values and still restores the true originals at its end.

    Distributed: every rank measures its own sub-batch; the per-layer statistics are
    all-gathered and every rank takes the **maximum of the ranks' proposals**, so all
    ranks apply the same ε (the most conservative one any rank asked for), with no
    rank-zero broadcast.

    Logged at each bump step through ``logger.log_metrics(..., step=trainer.global_step)``:
    ``ln_eps/<layer name>`` (new ε, only for layers whose ε changed at that step) and
    ``ln_eps/bumped_layers`` (number of distinct layers bumped so far).

    Args:
        target_rho: ρ* in (0, 1): a bumped layer is brought to ρ_LN = ρ*.
        eps_min: lower clip of the proposed ε (> 0).
        eps_max: upper clip of the proposed ε (> eps_min).
        every_n_steps: bump when trainer.global_step is a multiple of this.
        sample_size: examples of the batch to measure (fewer if the batch is smaller).
        eps_mach: machine epsilon in ρ_LN; None uses the training's low precision
            (BF16 2⁻⁷, FP16 2⁻¹⁰, FP32 2⁻²³ for 32-true), the paper's choice; a number
            in (0, 1) overrides it (e.g. 0.0078125 = 2⁻⁷ asks an FP32 run what BF16 needs).
        include: fnmatch patterns of layer names to consider (None: all).
        exclude: fnmatch patterns of layer names to leave alone.
        restore_on_fit_end: put the original ε values back when fit ends or raises.
        seed: seed of the private generator choosing the sampled examples.

    Attributes:
        original_eps: ε attribute of each changeable layer before any bump (``None`` for
            ``nn.RMSNorm(eps=None)``); after a resume, the originals saved in the checkpoint.
        current_eps: the ε each changeable layer trains with (for a never-bumped
            ``nn.RMSNorm(eps=None)``, the ε implied by its last measured input dtype).
            It keeps the bumped values after the restore.
        bumped: names of the layers bumped so far.
        unchangeable: names of the normalization layers whose ε cannot be changed.
        min_rho: the smallest ρ_LN measured so far as ``(ρ_LN, layer name, step)`` (before
            any bump at that step), or ``None`` before the first measurement.
        summary: what the callback did, one line, printed on rank zero at the end of fit.
    """

    def __init__(
        self,
        target_rho: float = EPS_BUMP_TARGET_RHO,
        eps_min: float = EPS_BUMP_MIN,
        eps_max: float = EPS_BUMP_MAX,
        every_n_steps: int = 5,
        sample_size: int = 16,
        eps_mach: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        restore_on_fit_end: bool = True,
        seed: int = 0,
    ) -> None:
        check_eps_rule(target_rho, eps_min, eps_max, sample_size, seed)
        check_int("every_n_steps", every_n_steps)
        if eps_mach is not None:
            check_number("eps_mach", eps_mach, 0.0, 1.0, open_low=True, open_high=True)
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        check_choice("restore_on_fit_end", restore_on_fit_end, (True, False))
        self.target_rho = float(target_rho)
        self.eps_min = float(eps_min)
        self.eps_max = float(eps_max)
        self.every_n_steps = every_n_steps
        self.sample_size = sample_size
        self.eps_mach = None if eps_mach is None else float(eps_mach)
        self.include = include
        self.exclude = exclude
        self.restore_on_fit_end = restore_on_fit_end
        self.seed = seed
        self.unchangeable: list[str] = []
        self._eps = EpsilonBump((), self.target_rho, self.eps_min, self.eps_max)
        self._eps_mach_used: float | None = None
        self._last_step = -1
        self._pending: dict[str, Any] | None = None
        self._fitting = False
        self._warned = False
        self.summary = ""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def original_eps(self) -> dict[str, float | None]:
        """ε attribute of each changeable layer before any bump (see the class docstring)."""
        return self._eps.original_eps

    @property
    def current_eps(self) -> dict[str, float]:
        """The ε each changeable layer trains with (see the class docstring)."""
        return self._eps.current_eps

    @property
    def bumped(self) -> set[str]:
        """Names of the layers bumped so far."""
        return self._eps.bumped

    @property
    def min_rho(self) -> tuple[float, str, int] | None:
        """The smallest ρ_LN measured so far as ``(ρ_LN, layer name, step)``."""
        return self._eps.min_rho

    @property
    def resolved_eps_mach(self) -> float | None:
        """The ``ε_mach`` used in ``ρ_LN`` during the current (or last) fit; ``None`` before fit."""
        return self._eps_mach_used

    # ----------------------------------------------------------------- inputs
    def inputs_from_batch(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model inputs in a training batch: ``model(*args, **kwargs)``.

        A tensor is the input; a tuple or list holds the input first (``(x, y)``); a dict
        is passed as keyword arguments, label keys (``labels``, ``label``, ``target``,
        ``targets``, ``y``, ``class_labels``) dropped. Override this for other batches.
        """
        return inputs_or_raise(batch, "LNEpsilonBump")

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        changeable, unchangeable = find_changeable_norms(pl_module, self.include, self.exclude)
        self._eps.layers = changeable
        self.unchangeable = [layer.name for layer in unchangeable]
        if self.eps_mach is not None:
            self._eps_mach_used = self.eps_mach
        else:
            self._eps_mach_used = dtype_eps_mach(low_precision_dtype(trainer, pl_module, None))
        if not self._warned:
            self._warned = True
            if self.unchangeable:
                rank_zero_warn(
                    "LNEpsilonBump: the ε of these normalization layers cannot be changed (the module does"
                    " not use an `eps`/`variance_epsilon` attribute); they are left alone: "
                    f"{self.unchangeable}"
                )
            elif not changeable:
                rank_zero_warn("LNEpsilonBump found no normalization layers in the model; it does nothing.")
        self._eps.record_originals()
        self._fitting = True
        if self._pending is not None:
            self._eps.load_state_dict(self._pending)
            self._pending = None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step or not self._eps.layers:
            return
        self._last_step = step
        args, kwargs = self.inputs_from_batch(batch)
        changed = self.bump(trainer, pl_module, args, kwargs)
        metrics = {f"ln_eps/{name}": value for name, value in changed.items()}
        metrics["ln_eps/bumped_layers"] = float(len(self.bumped))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitting = False
        self.summary = self._fit_end_summary()
        if self._eps.layers:
            rank_zero_info(self.summary)
        if self.restore_on_fit_end:
            self.restore()

    def _fit_end_summary(self) -> str:
        """What changed, or why nothing did: the smallest ρ_LN seen against 1 and ρ*."""
        em = self._eps_mach_used
        em_text = "ε_mach = ?" if not em else (
            f"ε_mach = 2^{math.log2(em):.0f}" if math.log2(em).is_integer() else f"ε_mach = {em:.3g}"
        )
        if self.min_rho is None:
            return (
                f"LNEpsilonBump changed nothing: it never measured (every_n_steps={self.every_n_steps}; "
                "no sampled step ran or every measurement failed)."
            )
        rho, name, step = self.min_rho
        seen = f"smallest ρ_LN seen {rho:.3g} ({name}, step {step}; {em_text})"
        restored = " Original ε restored at fit end." if self.restore_on_fit_end else ""
        if self.bumped:
            moves = ", ".join(
                f"{n} {_fmt_eps(self.original_eps.get(n))}→{self.current_eps[n]:.2g}"
                for n in sorted(self.bumped)
            )
            return f"LNEpsilonBump raised ε of {len(self.bumped)} layer(s): {moves}; {seen}.{restored}"
        if rho >= RHO_LN_WATCH:
            why = "is ≥ 1, so no norm was ε-dominated: nothing to do"
        elif rho <= self.target_rho:
            why = (
                f"is < 1 but ≤ target_rho={self.target_rho}: Algorithm 1 would lower ε there, and it never "
                "lowers ε"
            )
        else:
            why = f"is in (target_rho={self.target_rho}, 1), but no clipped proposal exceeded the current ε"
        return f"LNEpsilonBump changed nothing: {seen} {why}."

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._fitting = False
        if self.restore_on_fit_end:
            self.restore()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._eps.state_dict(), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before ``on_fit_start`` for most strategies and after it
        # when ``strategy.restore_checkpoint_after_setup`` (e.g. DeepSpeed): apply whichever comes last.
        self._last_step = int(state_dict.get("last_step", -1))
        if self._fitting:
            self._eps.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)

    # ------------------------------------------------------------- the bump
    def bump(
        self, trainer: Trainer, pl_module: LightningModule, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, float]:
        """Measure the sampled sub-batch and apply Algorithm 1; returns ``{name: new ε}`` if changed."""
        step = trainer.global_step
        args, kwargs = sample_inputs(args, kwargs, self.sample_size, self.seed + step)
        em = self._eps_mach_used if self._eps_mach_used is not None else dtype_eps_mach(torch.float32)
        return bump_norms(trainer, pl_module, self._eps, args, kwargs, em, "LNEpsilonBump")

    def restore(self) -> None:
        """Put the original ε back into every bumped layer (``None`` for ``nn.RMSNorm(eps=None)``).

        Idempotent: calling it twice, or after a fit that bumped nothing, is harmless.
        """
        self._eps.restore()


def _fmt_eps(eps: float | None) -> str:
    return "None" if eps is None else f"{eps:.2g}"

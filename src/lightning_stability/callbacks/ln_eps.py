"""``LNEpsilonBump``: raise the ε of ε-dominated normalization layers during training (Algorithm 1)."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._common import (
    check_choice,
    check_int,
    check_number,
    check_patterns,
    inputs_or_raise,
    is_distributed,
    low_precision_context,
    low_precision_dtype,
)
from lightning_stability.capture.batch import sample_inputs
from lightning_stability.capture.guards import preserved_rng, side_forward
from lightning_stability.capture.norms import NormCapture, NormLayer, find_norms
from lightning_stability.diagnostics import eps_mach as dtype_eps_mach
from lightning_stability.diagnostics import propose_ln_eps_from_variance, rho_ln_from_variance


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
        target_rho: float = 0.6,
        eps_min: float = 1e-6,
        eps_max: float = 1e-2,
        every_n_steps: int = 5,
        sample_size: int = 16,
        eps_mach: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        restore_on_fit_end: bool = True,
        seed: int = 0,
    ) -> None:
        check_number("target_rho", target_rho, 0.0, 1.0, open_low=True, open_high=True)
        check_number("eps_min", eps_min, 0.0, math.inf, open_low=True, open_high=True)
        check_number("eps_max", eps_max, 0.0, math.inf, open_low=True, open_high=True)
        if eps_max <= eps_min:
            raise MisconfigurationException(
                f"`eps_max` must exceed `eps_min`, got eps_max={eps_max!r} <= eps_min={eps_min!r}"
            )
        check_int("every_n_steps", every_n_steps)
        check_int("sample_size", sample_size)
        if eps_mach is not None:
            check_number("eps_mach", eps_mach, 0.0, 1.0, open_low=True, open_high=True)
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        check_choice("restore_on_fit_end", restore_on_fit_end, (True, False))
        check_int("seed", seed, minimum=0)
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
        self.original_eps: dict[str, float | None] = {}
        self.current_eps: dict[str, float] = {}
        self.bumped: set[str] = set()
        self.unchangeable: list[str] = []
        self._layers: list[NormLayer] = []
        self._eps_mach_used: float | None = None
        self._last_step = -1
        self._pending: dict[str, Any] | None = None
        self._fitting = False
        self._warned = False
        self.min_rho: tuple[float, str, int] | None = None
        self.summary = ""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

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
        with preserved_rng():
            layers = find_norms(pl_module, self.include, self.exclude)
        self._layers = [layer for layer in layers if layer.eps_attr is not None]
        self.unchangeable = [layer.name for layer in layers if layer.eps_attr is None]
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
            elif not layers:
                rank_zero_warn("LNEpsilonBump found no normalization layers in the model; it does nothing.")
        self._record_originals()
        self._fitting = True
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step or not self._layers:
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
        if self._layers:
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
        if rho >= 1.0:
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
        return {
            "original_eps": dict(self.original_eps),
            "current_eps": dict(self.current_eps),
            "bumped": sorted(self.bumped),
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before ``on_fit_start`` for most strategies and after it
        # when ``strategy.restore_checkpoint_after_setup`` (e.g. DeepSpeed): apply whichever comes last.
        self._last_step = int(state_dict.get("last_step", -1))
        if self._fitting:
            self._apply_state(state_dict)
        else:
            self._pending = dict(state_dict)

    # ------------------------------------------------------------- the bump
    def bump(
        self, trainer: Trainer, pl_module: LightningModule, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, float]:
        """Measure the sampled sub-batch and apply Algorithm 1; returns ``{name: new ε}`` if changed."""
        step = trainer.global_step
        args, kwargs = sample_inputs(args, kwargs, self.sample_size, self.seed + step)
        capture = NormCapture(self._layers)
        try:
            with side_forward(pl_module), capture, low_precision_context(trainer, pl_module, None):
                pl_module(*args, **kwargs)
        except Exception as err:  # never stop training; ranks still take part in the gather below
            rank_zero_warn(f"LNEpsilonBump skipped step {step}: {type(err).__name__}: {err}")
            capture.stats = {}
        device = pl_module.device
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        medians, meta = [], []
        for layer in self._layers:
            stats = capture.stats.get(layer.name)
            if stats is None or not stats.variances:
                medians.append(nan)
                meta.append((math.nan, math.nan))
            else:
                medians.append(stats.median_variance().to(device))
                meta.append((float(stats.d), stats.eps))
        # (layers, 3): median σ², d, current ε
        meta_t = torch.tensor(meta, dtype=torch.float64, device=device)
        table = torch.cat([torch.stack(medians)[:, None], meta_t], 1)
        if is_distributed(trainer):
            table = trainer.strategy.all_gather(table).reshape(-1, len(self._layers), 3)
        else:
            table = table.unsqueeze(0)
        values: list[list[list[float]]] = table.cpu().tolist()  # the one device→host transfer

        em = self._eps_mach_used if self._eps_mach_used is not None else dtype_eps_mach(torch.float32)
        changed: dict[str, float] = {}
        for j, layer in enumerate(self._layers):
            proposals = []
            eps = math.nan
            for rank_rows in values:
                var, d, eps_r = rank_rows[j]
                if math.isfinite(var) and math.isfinite(eps_r) and eps_r > 0 and d > 0:
                    eps = eps_r
                    rho = float(rho_ln_from_variance(var, int(d), eps_r, em))  # for the fit-end summary
                    if self.min_rho is None or rho < self.min_rho[0]:
                        self.min_rho = (rho, layer.name, step)
                    proposals.append(
                        propose_ln_eps_from_variance(
                            var, int(d), eps_r, em, self.target_rho, self.eps_min, self.eps_max
                        )
                    )
            if not proposals:
                continue
            new = max(proposals)
            if new > eps:
                layer.set_eps(new)
                self.current_eps[layer.name] = new
                self.bumped.add(layer.name)
                changed[layer.name] = new
            elif layer.name not in self.bumped:
                self.current_eps[layer.name] = eps
        return changed

    def restore(self) -> None:
        """Put the original ε back into every bumped layer (``None`` for ``nn.RMSNorm(eps=None)``).

        Idempotent: calling it twice, or after a fit that bumped nothing, is harmless.
        """
        for layer in self._layers:
            if layer.name in self.bumped and layer.name in self.original_eps and layer.eps_attr is not None:
                setattr(layer.module, layer.eps_attr, self.original_eps[layer.name])

    # ---------------------------------------------------------------- helpers
    def _attr_value(self, layer: NormLayer) -> float | None:
        value = getattr(layer.module, layer.eps_attr or "eps", None)
        return None if value is None else float(value)

    def _record_originals(self) -> None:
        """Originals from the model, except for layers the model still holds at our bumped value."""
        for layer in self._layers:
            value = self._attr_value(layer)
            still_bumped = layer.name in self.bumped and value == self.current_eps.get(layer.name)
            if layer.name not in self.original_eps or not still_bumped:
                self.original_eps[layer.name] = value
                if not still_bumped:
                    self.bumped.discard(layer.name)
            if layer.name not in self.bumped:
                self.current_eps[layer.name] = layer.eps(_param_dtype(layer))

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Take the checkpoint's originals and put its bumped ε values into the model."""
        originals = state.get("original_eps", {})
        current = state.get("current_eps", {})
        bumped = set(state.get("bumped", ()))
        for layer in self._layers:
            if layer.name in originals:
                value = originals[layer.name]
                self.original_eps[layer.name] = None if value is None else float(value)
            if layer.name in bumped and layer.name in current:
                layer.set_eps(float(current[layer.name]))
                self.current_eps[layer.name] = float(current[layer.name])
                self.bumped.add(layer.name)


def _param_dtype(layer: NormLayer) -> torch.dtype:
    for p in layer.module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _fmt_eps(eps: float | None) -> str:
    return "None" if eps is None else f"{eps:.2g}"

"""``StabilityGuard``: act on what :class:`StabilityMonitor` measured, with the mitigation that answers it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._armed_clips import ArmedClips, own_clips
from lightning_stability.callbacks._common import (
    check_eps_rule,
    check_guard_levels,
    lightning_log_step,
    low_precision_dtype,
)
from lightning_stability.callbacks.ln_eps import bump_norms
from lightning_stability.callbacks.monitor import StabilityMonitor
from lightning_stability.capture.batch import sample_inputs
from lightning_stability.capture.structure import Block, model_blocks
from lightning_stability.meter.checks import check_choice, check_flags
from lightning_stability.mitigations import (
    EpsilonBump,
    FP32Override,
    QKClip,
    attention_module,
    find_changeable_norms,
    qk_clip_factors,
)
from lightning_stability.rules import RULE_BY_NAME, Evidence
from lightning_stability.rules.mitigation import block_findings
from lightning_stability.rules.render import condition
from lightning_stability.rules.thresholds import (
    EPS_BUMP_MAX,
    EPS_BUMP_MIN,
    EPS_BUMP_TARGET_RHO,
    FP16_HEADROOM_AT_RISK_BITS,
    QK_CLIP_TAU,
    R_LOCAL_AT_RISK_EPS,
    RHO_LN_WATCH,
)
from lightning_stability.stability_report import BlockReport, StabilityReport

#: The mitigations, by the name they are logged under (``stability/guard/block{i}/<action>``).
ActionName = Literal["qk_clip", "eps_bump", "fp32", "none"]


@dataclass
class GuardAction:
    """One decision of the guard: what it saw in a block and what it did (or would do).

    Attributes:
        step: the report's (logged) step: Lightning's step of the measured batch.
        block: block index in the report (``-1``: no block).
        block_name: qualified module name of the block.
        cause: the rule's test in words, e.g. ``"attn_logit_max 152 > 100"``.
        action: ``"qk_clip"``, ``"eps_bump"``, ``"fp32"`` or ``"none"`` (nothing matched).
        detail: what was changed (heads and factors, norms and ε, the module run in FP32).
        applied: whether the model was changed (``False`` in ``dry_run`` or when it could not be).
        value: the number logged for it (min QK-clip factor, norms bumped, 1 for FP32).
        heads: per-head maxima used by QK-clip (one value: the block maximum for every head).
        rule: the rule whose finding the action answers (the alarm's rule for ``"none"``).
    """

    step: int
    block: int
    block_name: str
    cause: str
    action: ActionName
    detail: str = ""
    applied: bool = False
    value: float = 0.0
    heads: list[float] = field(default_factory=list)
    rule: str = ""


class StabilityGuard(Callback):
    r"""Apply the mitigation that answers each finding, only in the block where it is found.

    List it **after** :class:`StabilityMonitor` on the same ``Trainer``. At every step where the
    monitor produced a report, every block is read with the rule book's guarded rules (the "guard
    acts at" column of ``docs/RULES.md``; :mod:`lightning_stability.rules.mitigation`); the report
    is already reduced across ranks, so every DDP rank decides the same. The mitigations are the
    objects of :mod:`lightning_stability.mitigations`:

    - ``attn_logit_max > tau`` → **QK-clip** that block's offending heads: ``η_h = τ/S_h``,
      ``W_Q^h ← η_h^α W_Q^h``, ``W_K^h ← η_h^{1−α} W_K^h`` (biases alike; Kimi K2's MuonClip and
      Megatron's ``clip_qk``), so the head's max logit on the measured sample becomes ``τ``.
      Per-head maxima come from ``per_head["attn_logit_max"]`` (``log_per_head=True``); without
      them every head is scaled by the block's ``η``. It changes weights: **not reversible**.
      By default the block is clipped again whenever a sampled step finds its logits past ``τ``
      again (the optimizer regrows them for ``every_n_steps`` steps in between). With
      ``qk_clip_every_step=True`` the first clip also **arms** the block: from the next step on,
      every training forward of the block is watched and, after each optimizer step, its heads
      whose largest logit in that forward passed ``τ`` are rescaled by ``τ/S_h`` (MuonClip's
      schedule: per-head maxima of the training forward itself), until fit ends; under DDP the
      maxima are first reduced by a maximum over the ranks. On the held-out runs of
      ``docs/HELDOUT.md`` the sampled schedule closed more of the loss gap (Llama, logit growth)
      and neither helped at a too-high learning rate (ViT), so it stays the default.
    - ``rho_ln < rho_ln_threshold`` (an ε-dominated norm; judged on FP16/BF16 passes only) → raise
      the ε of that block's norms by Algorithm 1 (:class:`~lightning_stability.mitigations.EpsilonBump`,
      the object :class:`LNEpsilonBump` uses), for those norms only, with the report's ``ε_mach``;
      restored at fit end. Once per block (the rule brings ``ρ_LN`` to ``target_rho``, still
      below 1; add :class:`LNEpsilonBump` itself to keep adjusting).
    - ``r_local > r_local_factor · ε_mach`` (the block's own rounding error far above its floor),
      or, when the measured precision is FP16, a block ``amax`` within ``min_fp16_headroom`` bits
      of 65504 → run that block (``fp32_scope="block"``) or its attention outside autocast, in
      FP32, from then on; restored at fit end. Once per block. Not applied when training already
      computes in FP32.
    - the monitor's alarm fired (``report.alarm_rule`` in ``report.alarm_block``) and nothing above
      matches there → nothing, and one warning says so.

    The signals are the monitor's own, reduced across ranks before the guard reads them:
    ``BlockReport.attn_logit_max`` and, with ``StabilityMonitor(log_per_head=True)``,
    ``per_head["attn_logit_max"]`` (each head's maximum over every rank's examples, so every rank
    clips the same heads by the same factors), ``r_local`` (needs ``ProbeOptions(local_errors=True)``, the
    default), ``amax`` and ``StabilityReport.fp16_headroom``. A signal that is absent (``None``)
    matches nothing; ``alarm_block`` is read when the alarm fired. Every action
    is logged (``stability/guard/block{i}/<action>``, ``stability/guard/actions``), warned once
    (block, cause, action), kept in :attr:`actions` and in the checkpoint: a run resumed with
    ``ckpt_path=`` keeps its FP32 blocks and raised ε.

    Args:
        tau: QK-clip threshold ``τ`` on the maximum attention logit (Megatron/Kimi: 100; the logit
            rule's watch level).
        qk_clip_alpha: share ``α`` of the QK-clip factor put on the queries (0.5: ``√η`` on each).
        qk_clip_every_step: once a block is QK-clipped, clip it after every optimizer step by its own
            training forward's per-head maxima (MuonClip's schedule); ``False`` (default): only at
            the monitor's sampled steps.
        rho_ln_threshold: a block with ``rho_ln`` below this has an ε-dominated norm.
        r_local_factor: ``r_local`` above this many ``ε_mach`` moves the block to FP32 (the r_local
            rule's at-risk level).
        min_fp16_headroom: FP16 headroom in bits (``log2(65504/amax)``) below which a block
            moves to FP32 (only when the measured precision is FP16).
        fp32_scope: ``"block"`` runs the whole block in FP32, ``"attention"`` only its attention.
        qk_clip: enable QK-clip.
        eps_bump: enable raising ε.
        fp32: enable the FP32 override.
        require_alarm: act only at steps where the monitor's alarm fired (and only in the
            block it names, when it names one); otherwise the guard's own matching suffices.
        dry_run: decide, log (under ``stability/guard/dry_run/``) and warn, change nothing.
        restore_on_fit_end: put precision and ε back when fit ends or raises.
        target_rho: ``ρ*`` of the ε rule (Algorithm 1, as :class:`LNEpsilonBump`).
        eps_min: lower clip of a proposed ε.
        eps_max: upper clip of a proposed ε.
        sample_size: examples the ε rule measures.
        seed: seed of the ε rule's sampled examples.

    Attributes:
        actions: every decision so far, in order (:class:`GuardAction`).
        fp32_blocks: names of the blocks running in FP32.
        armed: the blocks QK-clipped at every step (``armed.clips``), with their record
            (``armed.steps_clipped``, ``armed.max_seen``).
    """

    def __init__(
        self,
        tau: float = QK_CLIP_TAU,
        qk_clip_alpha: float = 0.5,
        qk_clip_every_step: bool = False,
        rho_ln_threshold: float = RHO_LN_WATCH,
        r_local_factor: float = R_LOCAL_AT_RISK_EPS,
        min_fp16_headroom: float = FP16_HEADROOM_AT_RISK_BITS,
        fp32_scope: Literal["block", "attention"] = "block",
        qk_clip: bool = True,
        eps_bump: bool = True,
        fp32: bool = True,
        require_alarm: bool = False,
        dry_run: bool = False,
        restore_on_fit_end: bool = True,
        target_rho: float = EPS_BUMP_TARGET_RHO,
        eps_min: float = EPS_BUMP_MIN,
        eps_max: float = EPS_BUMP_MAX,
        sample_size: int = 16,
        seed: int = 0,
    ) -> None:
        check_guard_levels(tau, qk_clip_alpha, rho_ln_threshold, r_local_factor, min_fp16_headroom)
        check_choice("fp32_scope", fp32_scope, ("block", "attention"))
        check_flags(
            qk_clip=qk_clip,
            eps_bump=eps_bump,
            fp32=fp32,
            require_alarm=require_alarm,
            dry_run=dry_run,
            restore_on_fit_end=restore_on_fit_end,
            qk_clip_every_step=qk_clip_every_step,
        )
        check_eps_rule(target_rho, eps_min, eps_max, sample_size, seed)
        self.tau = float(tau)
        self.qk_clip_alpha = float(qk_clip_alpha)
        self.qk_clip_every_step = qk_clip_every_step
        self.rho_ln_threshold = float(rho_ln_threshold)
        self.r_local_factor = float(r_local_factor)
        self.min_fp16_headroom = float(min_fp16_headroom)
        self.fp32_scope = fp32_scope
        self.enabled = {"qk_clip": qk_clip, "eps_bump": eps_bump, "fp32": fp32}
        self.require_alarm, self.dry_run, self.restore_on_fit_end = require_alarm, dry_run, restore_on_fit_end
        self.target_rho, self.eps_min, self.eps_max = float(target_rho), float(eps_min), float(eps_max)
        self.sample_size, self.seed = sample_size, seed
        self.actions: list[GuardAction] = []
        self.fp32_blocks: list[str] = []
        self._overrides: dict[str, FP32Override] = {}
        self._clips: dict[str, QKClip] = {}
        self.armed = ArmedClips()
        self._optimizer_stepped = False
        self._eps: dict[str, EpsilonBump] = {}
        self._eps_state: dict[str, dict[str, Any]] = {}
        self._blocks: dict[str, Block] = {}
        self._monitor: StabilityMonitor | None = None
        self._module: LightningModule | None = None
        self._trains_fp32 = False
        self._refused: set[tuple[str, str]] = set()  # (block, action) that could not apply: decided once
        self._last_step = -1
        self._pending: dict[str, Any] | None = None
        self._fitting = False

    @property
    def levels(self) -> dict[str, float]:
        """Rule name → the level this guard acts at (the rule table's, unless given otherwise)."""
        return {
            "attn_logit_max": self.tau,
            "fp16_headroom": self.min_fp16_headroom,
            "rho_ln": self.rho_ln_threshold,
            "r_local": self.r_local_factor,
        }

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, fp32_scope=self.fp32_scope)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks: list[Callback] = list(trainer.callbacks)  # type: ignore[attr-defined]
        monitors = [i for i, cb in enumerate(callbacks) if isinstance(cb, StabilityMonitor)]
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        if not monitors or monitors[0] > mine:
            raise MisconfigurationException(
                "StabilityGuard acts on StabilityMonitor's reports: list a StabilityMonitor before it in "
                f"`Trainer(callbacks=[...])`, got {[type(cb).__name__ for cb in callbacks]}"
            )
        monitor = callbacks[monitors[0]]
        assert isinstance(monitor, StabilityMonitor)
        self._monitor = monitor

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._monitor is not None
        self._module = pl_module
        self._blocks = {b.name: b for b in model_blocks(pl_module, self._monitor.blocks)}
        self._clips = own_clips(self._clips, self._blocks)  # none of another model (an earlier fit)
        self._trains_fp32 = low_precision_dtype(trainer, pl_module, None) == torch.float32
        self._fitting = True
        state = self._pending if self._pending is not None else self._current_state()
        self._pending = None
        self._apply_state(state)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        monitor = self._monitor
        report = monitor.last_report if monitor is not None else None
        step = lightning_log_step(trainer)  # the step the monitor's report of this batch carries
        if monitor is not None and report is not None and report.step == step and step != self._last_step:
            self._last_step = step
            decided = [self._act(trainer, pl_module, plan, monitor, batch) for plan in self.decide(report)]
            self.actions += decided
            self._log(trainer, step, decided)
        if self._optimizer_stepped:  # an optimizer step since the last batch end: clip the armed blocks
            self._optimizer_stepped = False
            index = {name: b.index for name, b in self._blocks.items()}
            metrics = self.armed.step(trainer, index)
            if metrics:
                for logger in trainer.loggers:
                    logger.log_metrics({f"stability/guard/{k}": v for k, v in metrics.items()}, step=step)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._optimizer_stepped = True

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitting = False
        self.armed.disarm_all()  # no hook outlives the fit; a next fit re-arms from the record
        if self.restore_on_fit_end:
            self.restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._fitting = False
        self.armed.disarm_all()
        if self.restore_on_fit_end:
            self.restore()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._current_state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # callbacks are restored before on_fit_start, or after it under
        # `strategy.restore_checkpoint_after_setup` (DeepSpeed): apply whichever comes last
        if self._fitting:
            self._apply_state(state_dict)
        else:
            self._pending = dict(state_dict)

    def restore(self) -> None:
        """Undo what can be undone: FP32 overrides removed, raised ε put back. QK-clip stays
        (its every-step watches are removed at fit end in any case).

        Idempotent. :attr:`fp32_blocks` and :attr:`actions` keep the record.
        """
        for override_ in self._overrides.values():
            override_.restore()
        for bump in self._eps.values():
            bump.restore()  # QK-clip (self._clips) changed weights for good: nothing to restore

    # --------------------------------------------------------------- decision
    def decide(self, report: StabilityReport) -> list[GuardAction]:
        """What the guard would do for ``report``: a pure function of the report and of what is done.

        Each plan has ``applied=False``; :meth:`on_train_batch_end` carries them out.
        """
        fired = bool(report.alarm_rule)
        alarm_block = report.alarm_block if fired and report.alarm_block is not None else None
        if alarm_block is not None and alarm_block >= len(report.blocks):
            alarm_block = None
        if self.require_alarm and not fired:
            return []
        ev = Evidence.from_tags(report.metrics(), report.step, [b.name for b in report.blocks])
        owner = _owner(report.amax_module, report)
        plans: list[GuardAction] = []
        for i, block in enumerate(report.blocks):
            if self.require_alarm and alarm_block is not None and i != alarm_block:
                continue
            plans += self._match_block(report, ev, i, block, owner)
        matched = [p for p in plans if alarm_block is None or p.block == alarm_block]
        where = report.blocks[alarm_block] if alarm_block is not None else None
        # an alarm that keeps firing in a block already acted on (or whose action was refused, and
        # said so once) is explained: not "unmatched"
        acted = {a.block_name for a in self.actions if a.applied and a.action != "none"} | {
            name for name, _ in self._refused
        }
        if fired and not matched and not (where is not None and where.name in acted):
            plans.append(
                GuardAction(
                    report.step,
                    -1 if alarm_block is None else alarm_block,
                    where.name if where is not None else "",
                    f"alarm: {report.alarm_reason or report.alarm_rule}",
                    "none",
                    "no mitigation matches the measured values"
                    + (f" ({_describe(where)})" if where is not None else "")
                    + "; nothing done",
                    rule=report.alarm_rule or "",
                )
            )
        return plans

    def _match_block(
        self, report: StabilityReport, ev: Evidence, i: int, block: BlockReport, owner: int | None
    ) -> list[GuardAction]:
        """One plan per finding of the guarded rules in block ``i`` (FP32 once, ε once per block)."""
        plans: list[GuardAction] = []
        name = block.name
        for found in block_findings(ev, i, self.levels, owner):
            action = found.mitigation
            done = name in self._eps if action == "eps_bump" else name in self.fp32_blocks
            once = (name, action) in self._refused or (action != "qk_clip" and done)
            armed = action == "qk_clip" and name in self.armed.clips  # clipped at every step already
            if not self.enabled[action] or once or armed or any(p.action == action for p in plans):
                continue
            cause = condition(RULE_BY_NAME[found.rule], found.value, found.threshold)
            heads: list[float] = []
            if action == "qk_clip":
                heads = list(block.per_head.get("attn_logit_max", [])) or [float(block.attn_logit_max or 0.0)]
            plans.append(GuardAction(report.step, i, name, cause, action, heads=heads, rule=found.rule))
        return plans

    # ------------------------------------------------------------------ acting
    def _act(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        plan: GuardAction,
        monitor: StabilityMonitor,
        batch: Any,
    ) -> GuardAction:
        block = self._blocks.get(plan.block_name)
        try:
            if plan.action == "none":
                pass
            elif block is None:
                plan.detail = f"block {plan.block_name!r} not found in the model; nothing done"
            elif self.dry_run:
                plan.detail = "dry run: would " + _would(plan, self)
            elif plan.action == "qk_clip":
                self._qk_clip(plan, block)
            elif plan.action == "eps_bump":
                args, kwargs = monitor.inputs_from_batch(batch)
                self._bump(trainer, pl_module, plan, block, args, kwargs)
            else:
                self._fp32(plan, block)
        except Exception as err:  # the guard never stops training
            plan.applied = False
            plan.detail = f"failed: {type(err).__name__}: {err}"
        verb = "" if plan.applied or plan.action == "none" or self.dry_run else "not applied: "
        rank_zero_warn(
            f"StabilityGuard at step {plan.step}: block {plan.block_name!r}: {plan.cause} -> "
            f"{plan.action}: {verb}{plan.detail}"
        )
        return plan

    def _qk_clip(self, plan: GuardAction, block: Block) -> None:
        if not block.qk:
            plan.detail = "no query/key projections found in the block"
            return
        clip = self._clips.setdefault(block.name, QKClip(block, self.tau, self.qk_clip_alpha))
        try:
            clipped = clip.apply(plan.heads)
        except ValueError as err:  # the block's weights cannot be QK-clipped (usefully): said once
            plan.detail = str(err)
            self._refused.add((block.name, "qk_clip"))
            return
        eta = qk_clip_factors(plan.heads, self.tau)
        if len(eta) == 1:
            what = f"every head rescaled by eta = {eta[0]:.4g} (per-head maxima not measured)"
        else:
            heads = sorted({h for hs in clipped.values() for h in hs})
            what = f"heads {heads} rescaled by eta = {[round(e, 4) for e in eta if e < 1.0]}"
        plan.detail = (
            f"{', '.join(clipped)}: {what}; QK-clip to tau {self.tau:g} changes weights (not reversible)"
        )
        plan.applied = any(clipped.values())
        plan.value = min(eta)
        if plan.applied and self.qk_clip_every_step and self.armed.can_arm(block.name):
            try:
                self.armed.arm(block.name, clip, self._module or block.module)
            except ValueError as err:
                plan.detail += f"; not armed for every step: {err}"
                return
            plan.detail += (
                "; armed: from the next step on, the heads past tau in each training forward are "
                "QK-clipped after every optimizer step"
            )

    def _bump(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        plan: GuardAction,
        block: Block,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        bump = self._eps.get(block.name) or self._new_bump(block.name, pl_module)
        assert self._monitor is not None and self._monitor.last_report is not None
        eps_mach = self._monitor.last_report.eps_mach  # the rule uses the ε_mach that measured rho_ln
        step = trainer.global_step
        args, kwargs = sample_inputs(args, kwargs, self.sample_size, self.seed + step)
        changed = bump_norms(trainer, pl_module, bump, args, kwargs, eps_mach, "StabilityGuard")
        plan.value = float(len(changed))
        plan.applied = bool(changed)
        plan.detail = (
            "raised ε (Algorithm 1, restored at fit end): "
            + ", ".join(f"{n} -> {v:.3g}" for n, v in changed.items())
            if changed
            else "ε unchanged: the rule proposes no larger ε (rho_ln already <= target_rho, or eps_max)"
        )

    def _new_bump(self, name: str, pl_module: LightningModule) -> EpsilonBump:
        """The ε-bump of one block's norms (its original ε recorded now)."""
        layers, _ = find_changeable_norms(pl_module, include=[f"{name}.*"])
        bump = EpsilonBump(layers, self.target_rho, self.eps_min, self.eps_max)
        bump.record_originals()
        self._eps[name] = bump
        return bump

    def _fp32(self, plan: GuardAction, block: Block) -> None:
        if self._trains_fp32:
            plan.detail = "training already computes in float32"
            self._refused.add((block.name, "fp32"))  # said once, not at every later check
            return
        target, label = self._fp32_target(block)
        if target is None:
            plan.detail = f"no attention module found in {block.name!r}"
            return
        try:
            self._overrides[block.name] = FP32Override(target).apply()
        except ValueError as err:
            plan.detail = str(err)
            return
        self.fp32_blocks.append(block.name)
        plan.applied, plan.value = True, 1.0
        plan.detail = f"{label} runs outside autocast in float32 from now on (restored at fit end)"

    def _fp32_target(self, block: Block) -> tuple[Any, str]:
        if self.fp32_scope == "block":
            return block.module, repr(block.name)
        found = attention_module(block.module)
        return (None, "") if found is None else (found[1], repr(f"{block.name}.{found[0]}"))

    # ------------------------------------------------------------- state, logs
    def _current_state(self) -> dict[str, Any]:
        eps = {name: bump.state_dict() for name, bump in self._eps.items()}
        return {
            "actions": [asdict(a) for a in self.actions],
            "fp32_blocks": list(self.fp32_blocks),
            "eps": {**self._eps_state, **eps},
            "last_step": self._last_step,
            "qk_every_step": self.armed.state_dict(),
        }

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's (or the previous fit's) record and re-apply FP32 blocks and ε."""
        assert self._module is not None
        self.actions = [GuardAction(**a) for a in state.get("actions", [])]
        self._last_step = int(state.get("last_step", -1))
        self.fp32_blocks = []
        for name in state.get("fp32_blocks", []):
            block = self._blocks.get(name)
            if block is None or self.dry_run:
                continue
            target, _ = self._fp32_target(block)
            if target is not None and not self._trains_fp32:
                self._overrides[name] = self._overrides.get(name) or FP32Override(target)
                self._overrides[name].apply()
            self.fp32_blocks.append(name)
        self._eps_state = {}
        for name, helper_state in state.get("eps", {}).items():
            if name not in self._blocks:
                self._eps_state[name] = helper_state  # kept for a later fit of the full model
                continue
            self._new_bump(name, self._module).load_state_dict(helper_state)
        self._apply_armed(state.get("qk_every_step", {}))

    def _apply_armed(self, state: dict[str, Any]) -> None:
        """Arm again the blocks the record has armed (those of this model; dry runs, and a guard
        without ``qk_clip_every_step``, arm nothing)."""
        clips = {}
        for name in state.get("armed", []):
            block = self._blocks.get(name)
            if block is not None and self.qk_clip_every_step and not self.dry_run:
                clips[name] = self._clips.setdefault(name, QKClip(block, self.tau, self.qk_clip_alpha))
        self.armed.load_state_dict(state, clips)
        self.armed.rearm(self._module)

    def _log(self, trainer: Trainer, step: int, decided: list[GuardAction]) -> None:
        prefix = "stability/guard/dry_run" if self.dry_run else "stability/guard"
        metrics: dict[str, float] = {
            f"{prefix}/actions": float(
                sum(1 for a in self.actions if a.applied or (self.dry_run and a.action != "none"))
            ),
            f"{prefix}/fp32_blocks": float(len(self.fp32_blocks)),
        }
        for a in decided:
            if a.action == "none":
                metrics[f"{prefix}/unmatched"] = 1.0
            elif a.applied or self.dry_run:
                metrics[f"{prefix}/block{a.block}/{a.action}"] = a.value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _owner(module_name: str | None, report: StabilityReport) -> int | None:
    """Index of the block containing ``module_name``."""
    if not module_name:
        return None
    for i, b in enumerate(report.blocks):
        if module_name == b.name or module_name.startswith(b.name + "."):
            return i
    return None


def _describe(block: BlockReport) -> str:
    names = ("attn_logit_max", "rho_ln", "r_local", "amax", "r_block", "kappa_softmax")
    values = [(n, getattr(block, n, None)) for n in names]
    return ", ".join(f"{n}={v:.3g}" for n, v in values if v is not None) or "no values measured"


def _would(plan: GuardAction, guard: StabilityGuard) -> str:
    if plan.action == "qk_clip":
        eta = qk_clip_factors(plan.heads, guard.tau)
        plan.value = min(eta)
        return f"QK-clip to tau {guard.tau:g} with eta = {', '.join(f'{e:.4g}' for e in eta)}"
    if plan.action == "eps_bump":
        plan.value = 1.0
        return f"raise the block's norm ε by Algorithm 1 (target_rho {guard.target_rho:g})"
    plan.value = 1.0
    return f"run the {guard.fp32_scope} in float32"

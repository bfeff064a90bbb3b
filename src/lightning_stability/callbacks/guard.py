"""``StabilityGuard``: act on what :class:`StabilityMonitor` measured, with the matching mitigation."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._common import (
    check_choice,
    check_number,
    lightning_log_step,
    low_precision_dtype,
)
from lightning_stability.callbacks.ln_eps import LNEpsilonBump
from lightning_stability.callbacks.monitor import StabilityMonitor
from lightning_stability.capture.mitigations import (
    FP32Override,
    attention_module,
    clip_block_qk,
    qk_clip_factors,
)
from lightning_stability.capture.structure import Block, model_blocks
from lightning_stability.stability_report import BlockReport, StabilityReport

#: The mitigations, by the name they are logged under (``stability/guard/block{i}/<action>``).
ActionName = Literal["qk_clip", "eps_bump", "fp32", "none"]
FP16_MAX = 65504.0
#: A logit within this relative distance of τ is not clipped again: a head clipped to τ and
#: re-measured in float32 lands on τ·(1 ± ~1e-7), and rescaling it by η ≈ 1 would only add noise.
RECLIP_TOLERANCE = 1e-4


@dataclass
class GuardAction:
    """One decision of the guard: what it saw in a block and what it did (or would do).

    Attributes:
        step: the report's (logged) step: Lightning's step of the measured batch.
        block: block index in the report (``-1``: no block).
        block_name: qualified module name of the block.
        cause: the measured values that matched, e.g. ``"attn_logit_max 152 > tau 100"``.
        action: ``"qk_clip"``, ``"eps_bump"``, ``"fp32"`` or ``"none"`` (nothing matched).
        detail: what was changed (heads and factors, norms and ε, the module run in FP32).
        applied: whether the model was changed (``False`` in ``dry_run`` or when it could not be).
        value: the number logged for it (min QK-clip factor, norms bumped, 1 for FP32).
        heads: per-head maxima used by QK-clip (one value: the block maximum for every head).
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


class StabilityGuard(Callback):
    r"""Apply the mitigation that matches the measured cause, only in the block where it fires.

    List it **after** :class:`StabilityMonitor` on the same ``Trainer``. At every step where the
    monitor produced a report, the guard matches each block's measured values (the report is
    already reduced across ranks, so every DDP rank decides the same):

    - ``attn_logit_max > tau`` → **QK-clip** that block's offending heads: ``η_h = τ/S_h``,
      ``W_Q^h ← η_h^α W_Q^h``, ``W_K^h ← η_h^{1−α} W_K^h`` (biases alike; Kimi K2's MuonClip and
      Megatron's ``clip_qk``), so the head's max logit on the measured sample becomes ``τ``.
      Per-head maxima come from ``per_head["attn_logit_max"]`` (``log_per_head=True``); without
      them every head is scaled by the block's ``η``. It changes weights: **not reversible**.
      It acts again whenever a block's logits pass ``τ`` again.
    - ``rho_ln < rho_ln_threshold`` (an ε-dominated norm; not when measured in FP32) → raise the
      ε of that block's norms by :class:`LNEpsilonBump`'s rule (Algorithm 1), which this guard
      runs for those norms only, with the report's ``ε_mach``; restored at fit end. Once per
      block (the rule brings ``ρ_LN`` to ``target_rho``, still below 1; add
      :class:`LNEpsilonBump` itself to keep adjusting).
    - ``r_local > r_local_factor · ε_mach`` (the block's own rounding error far above its floor),
      or, when the measured precision is FP16, a block ``amax`` within ``min_fp16_headroom`` bits
      of 65504 → run that block (``fp32_scope="block"``) or its attention outside autocast, in
      FP32, from then on; restored at fit end. Once per block. Not applied when training already
      computes in FP32.
    - the monitor's alarm fired (``report.alarm_reason``) and nothing above matches → nothing,
      and one warning says so.

    The signals are the monitor's own, reduced across ranks before the guard reads them:
    ``BlockReport.attn_logit_max`` and, with ``StabilityMonitor(log_per_head=True)``,
    ``per_head["attn_logit_max"]`` (each head's maximum over every rank's examples, so every rank
    clips the same heads by the same factors), ``r_local`` (needs ``local_errors=True``, the
    default), ``amax`` and ``StabilityReport.fp16_headroom``. A signal that is absent (``None``)
    matches nothing; ``alarm_reason`` is read when the report carries one. Every action
    is logged (``stability/guard/block{i}/<action>``, ``stability/guard/actions``), warned once
    (block, cause, action), kept in :attr:`actions` and in the checkpoint: a run resumed with
    ``ckpt_path=`` keeps its FP32 blocks and raised ε.

    Args:
        tau: QK-clip threshold ``τ`` on the maximum attention logit (Megatron/Kimi: 100).
        qk_clip_alpha: share ``α`` of the QK-clip factor put on the queries (0.5: ``√η`` on each).
        rho_ln_threshold: a block with ``rho_ln`` below this has an ε-dominated norm.
        r_local_factor: ``r_local`` above this many ``ε_mach`` moves the block to FP32.
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
        target_rho: ``ρ*`` of the ε rule (see :class:`LNEpsilonBump`).
        eps_min: lower clip of a proposed ε.
        eps_max: upper clip of a proposed ε.
        sample_size: examples the ε rule measures.
        seed: seed of the ε rule's sampled examples.

    Attributes:
        actions: every decision so far, in order (:class:`GuardAction`).
        fp32_blocks: names of the blocks running in FP32.
    """

    def __init__(
        self,
        tau: float = 100.0,
        qk_clip_alpha: float = 0.5,
        rho_ln_threshold: float = 1.0,
        r_local_factor: float = 10.0,
        min_fp16_headroom: float = 1.0,
        fp32_scope: Literal["block", "attention"] = "block",
        qk_clip: bool = True,
        eps_bump: bool = True,
        fp32: bool = True,
        require_alarm: bool = False,
        dry_run: bool = False,
        restore_on_fit_end: bool = True,
        target_rho: float = 0.6,
        eps_min: float = 1e-6,
        eps_max: float = 1e-2,
        sample_size: int = 16,
        seed: int = 0,
    ) -> None:
        check_number("tau", tau, 0.0, math.inf, open_low=True, open_high=True)
        check_number("qk_clip_alpha", qk_clip_alpha, 0.0, 1.0)
        check_number("rho_ln_threshold", rho_ln_threshold, 0.0, math.inf, open_low=True, open_high=True)
        check_number("r_local_factor", r_local_factor, 0.0, math.inf, open_low=True, open_high=True)
        check_number("min_fp16_headroom", min_fp16_headroom, 0.0, 16.0)
        check_choice("fp32_scope", fp32_scope, ("block", "attention"))
        for name, flag in (
            ("qk_clip", qk_clip),
            ("eps_bump", eps_bump),
            ("fp32", fp32),
            ("require_alarm", require_alarm),
            ("dry_run", dry_run),
            ("restore_on_fit_end", restore_on_fit_end),
        ):
            if not isinstance(flag, bool):  # check_choice would take 1 for True
                raise MisconfigurationException(f"`{name}` must be True or False, got {flag!r}")
        # the ε rule's own checks name target_rho, eps_min, eps_max, sample_size, seed
        LNEpsilonBump(
            target_rho=target_rho, eps_min=eps_min, eps_max=eps_max, sample_size=sample_size, seed=seed
        )
        self.tau = float(tau)
        self.qk_clip_alpha = float(qk_clip_alpha)
        self.rho_ln_threshold = float(rho_ln_threshold)
        self.r_local_factor = float(r_local_factor)
        self.min_fp16_headroom = float(min_fp16_headroom)
        self.fp32_scope = fp32_scope
        self.enabled = {"qk_clip": qk_clip, "eps_bump": eps_bump, "fp32": fp32}
        self.require_alarm = require_alarm
        self.dry_run = dry_run
        self.restore_on_fit_end = restore_on_fit_end
        self.target_rho = float(target_rho)
        self.eps_min = float(eps_min)
        self.eps_max = float(eps_max)
        self.sample_size = sample_size
        self.seed = seed
        self.actions: list[GuardAction] = []
        self.fp32_blocks: list[str] = []
        self._overrides: dict[str, FP32Override] = {}
        self._eps: dict[str, LNEpsilonBump] = {}
        self._eps_state: dict[str, dict[str, Any]] = {}
        self._blocks: dict[str, Block] = {}
        self._monitor: StabilityMonitor | None = None
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None
        self._trains_fp32 = False
        self._fp32_refused: set[str] = set()  # blocks whose FP32 decision could not apply: decided once
        self._last_step = -1
        self._pending: dict[str, Any] | None = None
        self._fitting = False

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
        self._trainer, self._module = trainer, pl_module
        self._blocks = {b.name: b for b in model_blocks(pl_module, self._monitor.blocks)}
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
        if monitor is None or report is None or report.step != step or step == self._last_step:
            return
        self._last_step = step
        decided = [self._act(trainer, pl_module, plan, monitor, batch) for plan in self.decide(report)]
        self.actions += decided
        self._log(trainer, step, decided)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitting = False
        if self.restore_on_fit_end:
            self.restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._fitting = False
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
        """Undo what can be undone: FP32 overrides removed, raised ε put back. QK-clip stays.

        Idempotent. :attr:`fp32_blocks` and :attr:`actions` keep the record.
        """
        for override_ in self._overrides.values():
            override_.remove()
        for helper in self._eps.values():
            helper.restore()

    # --------------------------------------------------------------- decision
    def decide(self, report: StabilityReport) -> list[GuardAction]:
        """What the guard would do for ``report``: a pure function of the report and of what is done.

        Each plan has ``applied=False``; :meth:`on_train_batch_end` carries them out.
        """
        reason = getattr(report, "alarm_reason", None) or None
        alarm_block = _named_block(reason, report) if reason else None
        if self.require_alarm and not reason:
            return []
        plans: list[GuardAction] = []
        for i, block in enumerate(report.blocks):
            if self.require_alarm and alarm_block is not None and i != alarm_block:
                continue
            plans += self._match_block(report, i, block)
        matched = [p for p in plans if alarm_block is None or p.block == alarm_block]
        where = report.blocks[alarm_block] if alarm_block is not None else None
        # an alarm that keeps firing in a block already acted on (or whose action was refused, and
        # said so once) is explained: not "unmatched"
        acted = {a.block_name for a in self.actions if a.applied and a.action != "none"} | self._fp32_refused
        if reason and not matched and not (where is not None and where.name in acted):
            plans.append(
                GuardAction(
                    report.step,
                    -1 if alarm_block is None else alarm_block,
                    where.name if where is not None else "",
                    f"alarm: {reason}",
                    "none",
                    "no mitigation matches the measured values"
                    + (f" ({_describe(where, report)})" if where is not None else "")
                    + "; nothing done",
                )
            )
        return plans

    def _match_block(self, report: StabilityReport, i: int, block: BlockReport) -> list[GuardAction]:
        plans = []
        step, name = report.step, block.name
        logit = block.attn_logit_max
        if self.enabled["qk_clip"] and logit is not None and logit > self.tau * (1.0 + RECLIP_TOLERANCE):
            heads = list(block.per_head.get("attn_logit_max", [])) or [float(logit)]
            plans.append(
                GuardAction(
                    step, i, name, f"attn_logit_max {logit:.4g} > tau {self.tau:g}", "qk_clip", heads=heads
                )
            )
        rho = block.rho_ln
        # measured in FP32, ρ_LN < 1 is the norm and harmless (ε_mach = 2⁻²³): not a cause
        once = name not in self._eps and report.dtype != "float32"
        if self.enabled["eps_bump"] and once and rho is not None and rho < self.rho_ln_threshold:
            cause = f"rho_ln {rho:.3g} < {self.rho_ln_threshold:g}"
            plans.append(GuardAction(step, i, name, cause, "eps_bump"))
        if self.enabled["fp32"] and name not in self.fp32_blocks and name not in self._fp32_refused:
            cause = self._fp32_cause(report, i, block)
            if cause:
                plans.append(GuardAction(step, i, name, cause, "fp32"))
        return plans

    def _fp32_cause(self, report: StabilityReport, i: int, block: BlockReport) -> str:
        r_local = block.r_local
        floor = self.r_local_factor * report.eps_mach
        if r_local is not None and r_local > floor:
            return f"r_local {r_local:.3g} > {self.r_local_factor:g}·eps_mach = {floor:.3g}"
        if report.dtype != "float16":
            return ""  # BF16 and FP32 share FP32's range: FP16 headroom is not their problem
        amax = block.amax
        if amax is None and _owner(report.amax_module, report) == i:
            headroom = report.fp16_headroom
            amax = None if headroom is None else FP16_MAX / 2.0**headroom
        if amax is not None and amax > 0:
            headroom = math.log2(FP16_MAX / amax) if math.isfinite(amax) else -math.inf
            if headroom < self.min_fp16_headroom:
                return f"fp16 headroom {headroom:.3g} bits < {self.min_fp16_headroom:g} (amax {amax:.4g})"
        return ""

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
        try:
            clipped = clip_block_qk(block, plan.heads, self.tau, self.qk_clip_alpha)
        except ValueError as err:
            plan.detail = str(err)
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

    def _bump(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        plan: GuardAction,
        block: Block,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        helper = self._eps.get(block.name)
        if helper is None:
            helper = self._eps_helper(block.name, trainer, pl_module)
        assert self._monitor is not None and self._monitor.last_report is not None
        eps_mach = self._monitor.last_report.eps_mach  # the rule uses the ε_mach that measured rho_ln
        if helper.resolved_eps_mach != eps_mach:
            helper.eps_mach = eps_mach
            helper.on_fit_start(trainer, pl_module)  # re-resolve; originals of bumped layers are kept
        changed = helper.bump(trainer, pl_module, args, kwargs)
        plan.value = float(len(changed))
        plan.applied = bool(changed)
        plan.detail = (
            "raised ε (LNEpsilonBump's rule, restored at fit end): "
            + ", ".join(f"{n} -> {v:.3g}" for n, v in changed.items())
            if changed
            else "ε unchanged: the rule proposes no larger ε (rho_ln already <= target_rho, or eps_max)"
        )

    def _eps_helper(self, name: str, trainer: Trainer, pl_module: LightningModule) -> LNEpsilonBump:
        helper = LNEpsilonBump(
            target_rho=self.target_rho,
            eps_min=self.eps_min,
            eps_max=self.eps_max,
            sample_size=self.sample_size,
            include=[f"{name}.*"],
            restore_on_fit_end=False,
            seed=self.seed,
        )
        helper.on_fit_start(trainer, pl_module)
        self._eps[name] = helper
        return helper

    def _fp32(self, plan: GuardAction, block: Block) -> None:
        if self._trains_fp32:
            plan.detail = "training already computes in float32"
            self._fp32_refused.add(block.name)  # said once, not at every later check
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
        eps = {name: helper.state_dict() for name, helper in self._eps.items()}
        return {
            "actions": [asdict(a) for a in self.actions],
            "fp32_blocks": list(self.fp32_blocks),
            "eps": {**self._eps_state, **eps},
            "last_step": self._last_step,
        }

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's (or the previous fit's) record and re-apply FP32 blocks and ε."""
        assert self._trainer is not None and self._module is not None
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
            helper = self._eps_helper(name, self._trainer, self._module)
            helper.load_state_dict(helper_state)

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


def _named_block(reason: str, report: StabilityReport) -> int | None:
    """The block an alarm reason names: ``block{i}`` or a block's module name (the longest)."""
    found = re.search(r"\bblock(\d+)\b", reason)
    if found and int(found.group(1)) < len(report.blocks):
        return int(found.group(1))
    named = [(len(b.name), i) for i, b in enumerate(report.blocks) if b.name and b.name in reason]
    return max(named)[1] if named else None


def _owner(module_name: str | None, report: StabilityReport) -> int | None:
    """Index of the block containing ``module_name``."""
    if not module_name:
        return None
    for i, b in enumerate(report.blocks):
        if module_name == b.name or module_name.startswith(b.name + "."):
            return i
    return None


def _describe(block: BlockReport, report: StabilityReport) -> str:
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
        return f"raise the block's norm ε by LNEpsilonBump's rule (target_rho {guard.target_rho:g})"
    plan.value = 1.0
    return f"run the {guard.fp32_scope} in float32"

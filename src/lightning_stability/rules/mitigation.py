"""Which mitigation answers which finding, block by block: the decisions of StabilityGuard.

A rule with a ``guard`` level (the rule table's "guard acts at" column) is read in **every** block
of a step, not only the most extreme one; a block past the level gets the mitigation that answers
the rule's advice (:data:`MITIGATION`). The levels are the table's, unless the guard was given
others (its ``tau``, ``rho_ln_threshold``, ``r_local_factor``, ``min_fp16_headroom``).

Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lightning_stability.rules.evidence import Evidence, applies
from lightning_stability.rules.table import RULES, AdviceKind, Rule
from lightning_stability.rules.thresholds import FP16_MAX, QK_RECLIP_TOLERANCE

__all__ = ["GUARDED", "MITIGATION", "BlockFinding", "Mitigation", "block_findings", "fp16_headroom_bits"]

#: The mitigations StabilityGuard can apply.
Mitigation = Literal["qk_clip", "eps_bump", "fp32"]
#: The mitigation that answers each kind of advice (a lower learning rate is the user's to choose).
MITIGATION: dict[AdviceKind, Mitigation] = {
    "qk_norm_or_clip": "qk_clip",
    "eps_bump": "eps_bump",
    "fp32_region": "fp32",
    "prefer_bf16": "fp32",
}
#: The rules the guard acts on, in table order, with the level (from their ``guard`` column) it acts at.
GUARDED: dict[str, float] = {
    r.name: float(r.at_risk if r.guard == "at risk" else r.watch)  # type: ignore[arg-type]
    for r in RULES
    if r.guard is not None and r.advice in MITIGATION
}


def fp16_headroom_bits(amax: float) -> float:
    """``log2(FP16_MAX / amax)``: bits left before an output of magnitude ``amax`` overflows FP16.

    Example:
        >>> fp16_headroom_bits(FP16_MAX / 4)
        2.0
    """
    if not amax > 0:
        return math.inf
    return math.log2(FP16_MAX / amax) if math.isfinite(amax) else -math.inf


@dataclass(frozen=True)
class BlockFinding:
    """A guarded rule past the guard's level in one block.

    Attributes:
        rule: the rule's name.
        block: the block index.
        value: the block's own value (``/ ε_mach`` for ``per_eps_mach`` rules; FP16 headroom from the
            block's largest output).
        threshold: the level it passed.
        mitigation: what answers it.
    """

    rule: str
    block: int
    value: float
    threshold: float
    mitigation: Mitigation


def _block_value(rule: Rule, ev: Evidence, block: int, model_amax_block: int | None) -> float | None:
    """The block's own value of ``rule``'s signal (``None``: not measured there)."""
    if rule.signal == "fp16_headroom":  # per block: from the block's largest output
        amax = ev.blocks.get("amax", {}).get(block)
        if amax is not None:
            return fp16_headroom_bits(amax)
        headroom = ev.model.get("fp16_headroom")
        return headroom if block == model_amax_block else None
    value = ev.blocks.get(rule.signal, {}).get(block)
    if value is None or math.isnan(value):
        return None
    if rule.per_eps_mach:
        eps = ev.eps_mach
        return value / eps if eps and math.isfinite(eps) else None
    return value


def block_findings(
    ev: Evidence, block: int, levels: Mapping[str, float] | None = None, model_amax_block: int | None = None
) -> list[BlockFinding]:
    """The guarded rules past their level in ``block`` at this step, in table order.

    Args:
        ev: the step.
        block: the block judged.
        levels: rule name → the level to act at (default: :data:`GUARDED`, the table's).
        model_amax_block: the block holding the model's largest output, for a model without per-block
            ``amax``: the model-level FP16 headroom is attributed to it.

    A logit is clipped only when it passes τ by more than ``QK_RECLIP_TOLERANCE`` (a head clipped
    to τ and measured again lands on τ up to rounding).

    Example:
        >>> tags = {"stability/eps_mach": 2.0**-7, "stability/block0/attn_logit_max": 150.0}
        >>> ev = Evidence.from_tags(tags, 3)
        >>> [(f.rule, f.mitigation, f.threshold) for f in block_findings(ev, 0)]
        [('attn_logit_max', 'qk_clip', 100.0)]
    """
    levels = {**GUARDED, **(levels or {})}
    out = []
    for rule in RULES:
        if rule.name not in GUARDED or not applies(rule, ev.eps_mach) or rule.advice is None:
            continue
        value = _block_value(rule, ev, block, model_amax_block)
        level = levels[rule.name]
        mitigation = MITIGATION[rule.advice]
        margin = level * (1.0 + QK_RECLIP_TOLERANCE) if mitigation == "qk_clip" else level
        if value is not None and rule.beyond(value, margin):
            out.append(BlockFinding(rule.name, block, value, level, mitigation))
    return out

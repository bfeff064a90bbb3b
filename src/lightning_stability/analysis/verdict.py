"""The verdict that opens ``report.md``: healthy, watch or at risk — which block, how far, what to try.

Composed only from the logged values of one run (a :class:`~lightning_stability.analysis.logs.Run`):

* the **block-local error** ``stability/block{i}/r_local`` (each block run in the low precision
  on its exact FP32 input); when a run has no ``r_local`` tags (older logs) the propagated
  mismatch ``stability/block{i}/r_block`` stands in, and the verdict says that it cannot tell
  which block *adds* the error;
* its worst value against the rounding floor ``ε_mach`` (``stability/eps_mach``): the ratio
  ``r / ε_mach``. Healthy low-precision forwards sit below one ε_mach (measured: 0.1–0.5 ε_mach
  per block for a pre-LN Transformer in BF16 and in FP16);
* non-finite low-precision values (``stability/nonfinite``), the largest attention logit
  (``stability/block{i}/attn_logit_max``), the FP16 headroom in bits
  (``stability/fp16_headroom``), ε-dominated norms (``stability/block{i}/rho_ln`` < 1) and the
  early-warning alarms that fired (``stability/alarm``).

The thresholds (module constants below) are the rule, stated in the report itself: the status
is the most severe of the conditions met.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from lightning_stability.verdict import HEADROOM_WARN_BITS, LOW_PRECISION_EPS_MACH, QK_CLIP_TAU

from .logs import Run, Series

__all__ = [
    "ALARM_TAG",
    "LOGIT_AT_RISK",
    "LOGIT_WATCH",
    "RATIO_AT_RISK",
    "RATIO_WATCH",
    "RunVerdict",
    "run_verdict",
    "verdict_markdown",
]

EPS_TAG = "stability/eps_mach"
ALARM_TAG = "stability/alarm"
#: r / ε_mach above which the worst block is "watch" (above the rounding floor)
RATIO_WATCH = 1.0
#: r / ε_mach above which the worst block is "at risk" (an order of magnitude above the floor)
RATIO_AT_RISK = 10.0
#: attention logit above which QK-clip would act (Megatron's τ = 100; the fit-end summary's too)
LOGIT_WATCH = QK_CLIP_TAU
#: attention logit past which every run of Wortsman et al. (2023) diverged
LOGIT_AT_RISK = 1e4
#: FP16 headroom (bits) below which an FP16 run is "watch" / "at risk"
HEADROOM_WATCH = HEADROOM_WARN_BITS
HEADROOM_AT_RISK = 1.0

_SEVERITY = {"healthy": 0, "watch": 1, "at risk": 2}
_PRECISIONS = {"BF16": 2.0**-7, "FP16": 2.0**-10, "FP32": 2.0**-23}


@dataclass
class BlockPeak:
    """The largest value of one per-block quantity over a run."""

    block: int
    value: float
    step: int


@dataclass
class RunVerdict:
    """What the verdict of one run rests on (``None``: the tag was not logged)."""

    run: str
    status: str
    precision: str
    eps_mach: float | None
    error_name: str | None
    worst: BlockPeak | None
    ratio: float | None
    worst_block_share: float | None = None
    nonfinite_steps: int = 0
    logit: BlockPeak | None = None
    headroom: tuple[float, int] | None = None
    rho_ln: BlockPeak | None = None
    alarm_steps: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)


def _per_block(run: Run, name: str) -> dict[int, Series]:
    out = {}
    for tag in run.tags_matching(rf"stability/block\d+/{re.escape(name)}"):
        s = run.get(tag)
        if s is not None:
            out[int(tag.split("/")[1].removeprefix("block"))] = s
    return out


def _peak(series: dict[int, Series], lowest: bool = False) -> BlockPeak | None:
    """The block and step of the largest (or smallest) finite value, ``inf`` counting as largest."""
    best: BlockPeak | None = None
    for block, s in sorted(series.items()):
        vals = s.values.copy()
        keep = ~np.isnan(vals)
        if lowest:
            keep &= np.isfinite(vals)
        if not keep.any():
            continue
        idx = np.flatnonzero(keep)
        j = idx[np.argmin(vals[idx])] if lowest else idx[np.argmax(vals[idx])]
        v = float(vals[j])
        if best is None or (v < best.value if lowest else v > best.value):
            best = BlockPeak(block, v, int(s.steps[j]))
    return best


def _precision_name(eps: float | None) -> str:
    if eps is None or not math.isfinite(eps) or eps <= 0:
        return "unknown precision"
    name, ref = min(_PRECISIONS.items(), key=lambda kv: abs(math.log2(eps) - math.log2(kv[1])))
    return name if abs(math.log2(eps) - math.log2(ref)) < 0.5 else f"ε_mach {eps:.2e}"


def _g(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def run_verdict(run: Run) -> RunVerdict:
    """Judge one run from its logged values (see the module docstring for the rule)."""
    eps_s = run.get(EPS_TAG)
    eps = float(eps_s.values[-1]) if eps_s is not None else None
    precision = _precision_name(eps)
    local = _per_block(run, "r_local")
    error_name = "r_local" if local else ("r_block" if _per_block(run, "r_block") else None)
    worst = _peak(local or _per_block(run, "r_block"))
    ratio = worst.value / eps if worst is not None and eps else None
    v = RunVerdict(run.name, "healthy", precision, eps, error_name, worst, ratio)
    severity = 0

    def flag(level: str, reason: str) -> None:
        nonlocal severity
        severity = max(severity, _SEVERITY[level])
        v.reasons.append(reason)

    wb = run.get("stability/worst_block")
    if wb is not None and worst is not None and len(wb):
        v.worst_block_share = float(np.mean(wb.values == worst.block))
    nf = run.get("stability/nonfinite")
    if nf is not None:
        v.nonfinite_steps = int(np.sum(nf.values > 0))
    if v.nonfinite_steps or (worst is not None and not math.isfinite(worst.value)):
        flag("at risk", "the low-precision forward went non-finite")
        v.advice.append(
            "find the overflowing module (the monitor's warning names it); keep it in FP32 or use BF16"
        )
    if ratio is not None and worst is not None and math.isfinite(ratio):
        if ratio > RATIO_AT_RISK:
            flag("at risk", f"block {worst.block}'s {error_name} is {ratio:.3g} × ε_mach")
        elif ratio > RATIO_WATCH:
            flag("watch", f"block {worst.block}'s {error_name} is above one ε_mach ({ratio:.3g} ×)")
        if ratio > RATIO_WATCH:
            v.advice.append(
                f"keep block {worst.block}'s attention in FP32 (an autocast(enabled=False) region "
                "around it) and compare"
            )
    v.logit = _peak(_per_block(run, "attn_logit_max"))
    if v.logit is not None:
        if v.logit.value > LOGIT_AT_RISK:
            flag("at risk", f"an attention logit reached {_g(v.logit.value)} (> {LOGIT_AT_RISK:g})")
        elif v.logit.value > LOGIT_WATCH:
            flag("watch", f"an attention logit reached {_g(v.logit.value)} (> {LOGIT_WATCH:g})")
        if v.logit.value > LOGIT_WATCH:
            v.advice.append(f"qk-norm, or QK-clip at τ = 100, for block {v.logit.block}'s attention")
    hr = run.get("stability/fp16_headroom")
    if hr is not None and np.isfinite(hr.values).any():
        j = int(np.nanargmin(np.where(np.isfinite(hr.values), hr.values, np.nan)))
        v.headroom = (float(hr.values[j]), int(hr.steps[j]))
        if precision == "FP16" and v.headroom[0] < HEADROOM_AT_RISK:
            flag("at risk", f"only {v.headroom[0]:.2g} bits below FP16 overflow")
        elif precision == "FP16" and v.headroom[0] < HEADROOM_WATCH:
            flag("watch", f"{v.headroom[0]:.2g} bits below FP16 overflow")
        if v.headroom[0] < HEADROOM_WATCH:
            v.advice.append("train in BF16 rather than FP16, or rescale the module holding the maximum")
    v.rho_ln = _peak(_per_block(run, "rho_ln"), lowest=True)
    low_precision = eps is not None and eps >= LOW_PRECISION_EPS_MACH  # FP32's ρ_LN < 1 is normal
    if low_precision and v.rho_ln is not None and v.rho_ln.value < 1.0:
        flag("watch", f"a norm in block {v.rho_ln.block} is ε-dominated (ρ_LN {_g(v.rho_ln.value)} < 1)")
        v.advice.append("add LNEpsilonBump (raises the ε of ε-dominated norms)")
    alarm = run.get(ALARM_TAG)
    if alarm is not None:
        v.alarm_steps = [int(s) for s, a in zip(alarm.steps, alarm.values, strict=True) if a > 0.5]
    v.status = {i: k for k, i in _SEVERITY.items()}[severity]
    if worst is None:
        v.status = "unknown"
    return v


def _describe(v: RunVerdict, lead: str | None) -> list[str]:
    lines = []
    if v.worst is None:
        return [
            f"**{v.run} — no verdict**: no per-block error (`stability/block{{i}}/r_local` or "
            "`r_block`) was logged."
        ]
    eps_text = f"{v.precision}, ε_mach = {v.eps_mach:.2g}" if v.eps_mach else v.precision
    head = f"**{v.run} — {v.status}.** "
    w = v.worst
    if v.ratio is not None and math.isfinite(v.ratio):
        floor = (
            "at the rounding floor" if v.ratio <= RATIO_WATCH else f"{v.ratio:.3g} times the rounding floor"
        )
        kind = "block-local error" if v.error_name == "r_local" else "per-block mismatch"
        where = (
            f"The largest {kind} is {v.error_name} = {_g(w.value)} in block {w.block} "
            f"(step {w.step}): {v.ratio:.2g} × ε_mach ({eps_text}), {floor}."
        )
    else:
        where = f"The largest {v.error_name} is {_g(w.value)} in block {w.block} (step {w.step}; {eps_text})."
    if v.error_name == "r_block":
        where += (
            " These logs have no `r_local`, only the propagated `r_block` (each block inherits the"
            " error of those before it), so the block named is where the error is largest, not"
            " necessarily where it is made."
        )
    if v.worst_block_share is not None:
        where += f" `stability/worst_block` names block {w.block} at {v.worst_block_share:.0%} of the steps."
    lines.append(head + where)
    facts = []
    if v.reasons:
        facts.append("Why: " + "; ".join(v.reasons) + ".")
    if v.logit is not None and v.logit.value <= LOGIT_WATCH:
        facts.append(
            f"Attention logits stay ≤ {_g(v.logit.value)} (block {v.logit.block}), below QK-clip's τ = 100."
        )
    if v.headroom is not None:
        bits, step = v.headroom
        fp16 = "an FP16 run would overflow" if bits < 0 else f"{bits:.3g} bits below FP16 overflow"
        facts.append(f"FP16 headroom at its lowest (step {step}): {fp16}.")
    if v.rho_ln is not None and v.rho_ln.value >= 1.0:
        facts.append(f"No ε-dominated norm (smallest ρ_LN {_g(v.rho_ln.value)}, block {v.rho_ln.block}).")
    if v.alarm_steps:
        shown = ", ".join(str(s) for s in v.alarm_steps[:5]) + (" …" if len(v.alarm_steps) > 5 else "")
        facts.append(
            f"The κ_softmax early warning fired {len(v.alarm_steps)} time(s) (steps {shown})"
            + (f"; {lead}" if lead else "")
            + "."
        )
    elif lead:
        facts.append(lead[0].upper() + lead[1:] + ".")
    lines.append(" ".join(facts))
    if v.advice:
        lines.append("What to try: " + "; ".join(dict.fromkeys(v.advice)) + ".")
    elif v.status == "healthy":
        lines.append(
            "What to try: nothing is needed at this precision. Keep the monitor on when you change "
            "the model, the learning rate or the precision."
        )
    return lines


def verdict_markdown(verdicts: list[RunVerdict], leads: dict[str, str] | None = None) -> list[str]:
    """The report's opening section: one overall line, then a paragraph per run.

    Args:
        verdicts: one :class:`RunVerdict` per run.
        leads: run name → a plain-words reading of its κ_softmax lead–lag test.
    """
    leads = leads or {}
    judged = [v for v in verdicts if v.status != "unknown"]
    risky = [v for v in judged if v.status == "at risk"]
    watch = [v for v in judged if v.status == "watch"]
    if not judged:
        top = "No run logged a per-block error: no verdict."
    elif risky:
        names = ", ".join(f"{v.run} (block {v.worst.block})" for v in risky if v.worst)
        top = f"**At risk: {len(risky)} of {len(judged)} run(s)** — {names}."
    elif watch:
        names = ", ".join(f"{v.run} (block {v.worst.block})" for v in watch if v.worst)
        top = f"**Worth a look: {len(watch)} of {len(judged)} run(s)** — {names}; none at risk."
    else:
        top = f"**Healthy: all {len(judged)} run(s)** sit at the rounding floor of their precision."
    lines = ["## Verdict", "", top, ""]
    for v in verdicts:
        lines += _describe(v, leads.get(v.run))
        lines.append("")
    lines.append(
        f"*Rule:* a run is **at risk** when its low-precision forward went non-finite, its worst "
        f"block-local error exceeds {RATIO_AT_RISK:g} × ε_mach, an attention logit exceeds "
        f"{LOGIT_AT_RISK:g}, or (FP16 runs) less than {HEADROOM_AT_RISK:g} bit of FP16 headroom is left; "
        f"**watch** when the error exceeds {RATIO_WATCH:g} × ε_mach, a logit exceeds {LOGIT_WATCH:g}, "
        f"a norm is ε-dominated (ρ_LN < 1) or (FP16) less than {HEADROOM_WATCH:g} bits are left; "
        "otherwise **healthy**. Healthy pre-LN Transformers measure 0.1–0.5 × ε_mach per block in both "
        "BF16 and FP16."
    )
    lines.append("")
    return lines

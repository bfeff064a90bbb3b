"""The words: the one place that turns rules, findings, advice and alarms into text.

The end-of-fit summary (:func:`summary`), the report's verdict paragraph (:func:`paragraph`),
the alarm's warning (:func:`alarm_reason`), the guard's causes (:func:`condition`) and the rule
table of ``docs/RULES.md`` (:func:`rule_table`) are all composed here from structured data;
nothing composed here is parsed back.

Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_stability.rules.alarm import AlarmResult
from lightning_stability.rules.judge import Advice, Extreme, Finding, Judgement
from lightning_stability.rules.table import CANDIDATES, RULE_BY_NAME, RULES, Rule
from lightning_stability.rules.thresholds import EPS_MACH, FP16_MAX, QK_CLIP_TAU

__all__ = [
    "KappaLead",
    "advice_text",
    "alarm_reason",
    "condition",
    "finding_text",
    "paragraph",
    "precision_name",
    "rule_sentence",
    "rule_table",
    "summary",
]

_APPLIES = {
    "any": "all passes",
    "fp16": "FP16 passes",
    "not_fp16": "non-FP16 passes",
    "low_precision": "FP16/BF16/FP8 passes",
    "fp8": "FP8 passes",
}


@dataclass(frozen=True)
class KappaLead:
    """The lead–lag test of κ_softmax against the forward mismatch, for the verdict's one sentence on it.

    Attributes:
        lag: the best lag in steps (> 0: κ_softmax moves first).
        p_value: its permutation p-value.
        leads: whether the test reads as a lead (significant, positive, inside the scan).
        reading: the test's reading in words (the report's lead–lag table column).
    """

    lag: int
    p_value: float
    leads: bool
    reading: str


def precision_name(eps_mach: float | None) -> str:
    """``"BF16"``, ``"FP16"``, ``"FP32"``, ``"FP8"`` (E4M3) for their ε_mach; otherwise the number."""
    if eps_mach is None or not math.isfinite(eps_mach) or eps_mach <= 0:
        return "unknown precision"
    name, ref = min(EPS_MACH.items(), key=lambda kv: abs(math.log2(eps_mach) - math.log2(kv[1])))
    return name.upper() if abs(math.log2(eps_mach) - math.log2(ref)) < 0.5 else f"ε_mach {eps_mach:.2e}"


def _g(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}g}" if math.isfinite(v) else str(v)


def where(block: int | None, name: str | None = None) -> str:
    """``blocks.2 (block 2)`` online, ``block 2`` from logs, ``the model`` for no block."""
    if block is None:
        return name or "the model"
    return f"{name} (block {block})" if name else f"block {block}"


def _level(rule: Rule, value: float | None) -> str:
    if value is None:
        return "—"
    unit = " × ε_mach" if rule.per_eps_mach else " bits" if rule.signal == "fp16_headroom" else ""
    op = ">" if rule.direction == "above" else "<"
    return f"{op} {value:g}{unit}"


def condition(rule: Rule, value: float, threshold: float) -> str:
    """A rule's test in words: ``attn_logit_max 150 > 100``, ``r_local 25.6 × ε_mach > 10 × ε_mach``."""
    unit = " × ε_mach" if rule.per_eps_mach else " bits" if rule.signal == "fp16_headroom" else ""
    signal = f"z({rule.signal})" if rule.window else rule.signal
    return f"{signal} {_g(value, 4)}{unit} {_level(rule, threshold)}"


def alarm_reason(result: AlarmResult, block_name: str | None = None) -> str:
    """``attn_logit_max>100 in block 1 ('blocks.1') (value 172)``: what the alarm warns with."""
    at = f" in block {result.block}" if result.block is not None else ""
    if at and block_name:
        at += f" ({block_name!r})"
    val = f" (value {result.value:.4g})" if result.value is not None else ""
    return f"{result.label}{at}{val}"


# ------------------------------------------------------------------------- findings, facts
def _headroom_where(ext: Extreme) -> str:
    """Where the largest output is: its module online; from the logs, only the block with the largest."""
    if ext.module:
        return f" in {ext.module}"
    if ext.block is not None:
        return f"; the largest inside a block: {where(ext.block, ext.block_name)}"
    return ""


def _fact(rule: Rule, ext: Extreme) -> str:
    """One measured extreme in words (a finding or not)."""
    text = _measured(rule, ext)
    return text if ext.applicable else f"{text} (judged on {_APPLIES[rule.applies]} only)"


def _measured(rule: Rule, ext: Extreme) -> str:
    at = where(ext.block, ext.block_name)
    name = rule.name
    if name in ("nonfinite", "nonfinite_fp16"):
        first = f" (first in {ext.module or at})" if ext.module or ext.block is not None else ""
        return f"the low-precision forward went non-finite at step {ext.step}{first}"
    if name == "attn_logit_max":
        return f"largest attention logit: {_g(ext.value, 4)} in {at} at step {ext.step}"
    if name == "fp16_headroom":
        amax = FP16_MAX / 2.0**ext.value
        return (
            f"FP16 headroom: {ext.value:.2f} bits at step {ext.step} "
            f"(max |output| = {_g(amax, 4)}{_headroom_where(ext)})"
        )
    if name == "rho_ln":
        return f"smallest ρ_LN (below 1: ε-dominated): {_g(ext.value)} in {at} at step {ext.step}"
    if name == "r_local":
        return _error_fact(ext, at)
    if ext.layer is not None:
        return _layer_fact(ext)
    if rule.window:
        return f"z-score of {rule.signal}: {_g(ext.value)} at step {ext.step} (named block: {at})"
    return f"{rule.signal}: {_g(ext.value, 4)} in {at} at step {ext.step}"


def _error_fact(ext: Extreme, at: str) -> str:
    if ext.signal != "r_local":
        return (
            f"largest per-block mismatch: {ext.signal} = {_g(ext.raw)} in {at} at step {ext.step}, "
            f"{_g(ext.value, 2)} × ε_mach (no r_local measured: the propagated {ext.signal} names where the "
            "error is largest, not necessarily where it is made)"
        )
    text = (
        f"most fragile block by r_local (its own error on exact inputs): {at}, r_local = {_g(ext.raw)} "
        f"= {_g(ext.value, 2)} × ε_mach at step {ext.step}"
    )
    if ext.others_median:
        text += f", {ext.value / ext.others_median:.1f}× the other blocks' median"
    att, ffn = ext.parts.get("attention"), ext.parts.get("ffn")
    if att is not None and ffn is not None:
        text += f"; attention {_g(att)} vs FFN {_g(ffn)}"
    return text


def _layer_fact(ext: Extreme) -> str:
    text = (
        f"largest FP8 error of a linear layer (mean over tokens): {ext.layer}, {ext.signal} = {_g(ext.raw)} "
        f"= {_g(ext.value, 2)} × ε_mach at step {ext.step}"
    )
    bf16 = ext.parts.get("bf16_error_token")
    return text + (f" (BF16: {_g(bf16, 2)})" if bf16 is not None else "")


def _operands_text(ext: Extreme) -> str:
    """``input: 99.5% underflow, 0% saturated`` for the operands that lost values."""
    said = []
    for operand, stats in ext.operands.items():
        under, sat = stats.get("fp8_underflow", 0.0), stats.get("fp8_saturation", 0.0)
        if under > 0 or sat > 0:
            said.append(f"{operand}: {under:.3g} of its non-zero values underflow, {sat:.3g} saturate")
        if len(said) == 2:
            break
    return "; ".join(said)


def finding_text(f: Finding, j: Judgement) -> str:
    """A finding: its fact, the level it reached, the rule and since when."""
    rule = RULE_BY_NAME[f.rule]
    since = f", from step {f.first_step}" if f.first_step != f.step else ""
    return f"{_fact(rule, j.extremes[f.rule])} — {f.level}: {condition(rule, f.value, f.threshold)}{since}"


def advice_text(a: Advice, j: Judgement) -> str:
    """What to try, in words, and what it answers."""
    at = where(a.block, a.block_name)
    if a.kind == "qk_norm_or_clip":
        return f"qk-norm, or QK-clip at τ = {QK_CLIP_TAU:g}, for the attention of {at}"
    if a.kind == "eps_bump":
        return f"raise the ε of the normalization layers of {at} (LNEpsilonBump, or StabilityGuard's ε-bump)"
    if a.kind == "fp32_region":
        ext = j.extremes[a.answers]
        part = {"ffn": "the FFN", "attention": "the attention", "block": "all"}[a.part or "block"]
        median = ext.others_median
        ratio = f", {ext.value / median:.1f}× the other blocks' median" if median else ""
        return (
            f"keep {part} of {at} in FP32 (an autocast-disabled region): it adds the most error "
            f"({_g(ext.value, 2)} × ε_mach{ratio})"
        )
    if a.kind == "prefer_bf16":
        return f"train in BF16 rather than FP16, or scale the output of {a.module or at} down"
    if a.kind == "keep_bf16":
        return _keep_bf16_text(a, j)
    return "a lower learning rate (or a longer warm-up): the forward became fragile during training"


def _keep_bf16_text(a: Advice, j: Judgement) -> str:
    ext = j.layers.get(a.layer or "")
    if ext is None:
        return f"keep {a.layer} in BF16 (out of FP8)"
    ratio = f", {ext.value / ext.others_median:.1f}× the other layers' median" if ext.others_median else ""
    bf16 = ext.parts.get("bf16_error_token")
    contrast = f"; in BF16 {_g(bf16, 2)}" if bf16 is not None else ""
    lost = _operands_text(ext)
    return (
        f"keep {a.layer} in BF16 (out of FP8): its FP8 error per token is {_g(ext.raw, 3)} "
        f"({_g(ext.value, 2)} × ε_mach{ratio}{contrast}) at step {ext.step}" + (f" — {lost}" if lost else "")
    )


def _alarm_text(j: Judgement) -> str:
    alarm = j.alarm
    rule = f'alarm.rule="{alarm.name}"'
    if not alarm.steps:
        return f"early warning ({rule}): never fired"
    shown = ", ".join(str(s) for s in alarm.steps[:8])
    if len(alarm.steps) > 8:
        shown += f" … ({len(alarm.steps)} in all)"
    if not alarm.identified:
        return (
            f"early warning (stability/alarm) fired at steps {shown}; no alarm of this version's rule book "
            "replays it (the run's monitor used other levels)"
        )
    first = alarm.first
    text = f"early warning ({rule}) fired at steps {shown}"
    if first is not None:
        text += f"; first: {alarm_reason(first, alarm.first_block_name)}"
    return text


def _lines(j: Judgement) -> tuple[list[str], list[str]]:
    """(findings in words, other measured facts in words), in table order."""
    found = {f.rule for f in j.findings}
    findings = [finding_text(f, j) for f in j.findings]
    facts = [
        _fact(r, j.extremes[r.name])
        for r in RULES
        if r.name in j.extremes and r.name not in found and r.signal != "nonfinite"  # 0: nothing to say
    ]
    return findings, facts


# -------------------------------------------------------------------------- the two texts
def summary(j: Judgement, owner: str = "StabilityMonitor") -> str:
    """The end-of-fit verdict the monitor prints: status, findings, measured facts, what to try
    (``owner`` starts the first line: the monitor, or a ``StabilityMeter``)."""
    if not j.steps:
        return f"{owner}: no step was measured in this fit."
    status = j.status or "no verdict (no per-block error was measured)"
    lines = [
        f"{owner} verdict: {status} ({j.steps} sampled step(s), low precision "
        f"{precision_name(j.eps_mach)}, ε_mach = {_g(j.eps_mach or math.nan, 2)})"
    ]
    findings, facts = _lines(j)
    lines += [f"- {t}" for t in findings + facts]
    lines.append(f"- {_alarm_text(j)}")
    if j.last_r_block is not None:
        lines.append(f"- last r_block (propagated error at the last block): {_g(j.last_r_block)}")
    lines.append("What to try:")
    lines += [f"- {advice_text(a, j)}." for a in j.advice] or ["- nothing measured calls for a change."]
    return "\n".join(lines)


def _lead_sentence(j: Judgement, lead: KappaLead | None) -> str:
    """One sentence on κ_softmax's lead, only when its lead–lag test ran."""
    if lead is None:
        return ""
    paper = j.alarm.name == "paper" and bool(j.alarm.steps)
    if lead.leads:
        return (
            f"κ_softmax (the paper's early-warning signal) leads the mismatch by {lead.lag} steps in this "
            f"run (p {lead.p_value:.3g})" + ("; act on its warnings." if paper else ".")
        )
    return (
        f"κ_softmax (the paper's early-warning signal) shows no lead over the mismatch in this run "
        f"({lead.reading})" + ("; its warnings are not backed by a lead here." if paper else ".")
    )


def paragraph(j: Judgement, run: str, lead: KappaLead | None = None) -> list[str]:
    """The report's verdict for one run: a heading sentence, the evidence, what to try."""
    if j.status is None:
        return [f"**{run} — no verdict**: no per-block error (`r_local`, `r_block`) logged, no rule fired."]
    findings, facts = _lines(j)
    eps = f"{precision_name(j.eps_mach)}, ε_mach = {_g(j.eps_mach or math.nan, 2)}"
    head = f"**{run} — {j.status}** ({j.steps} logged steps, {eps})."
    if findings:
        head += " Findings: " + "; ".join(findings) + "."
    else:
        head += " No rule reached its watch level."
    body = []
    if facts:
        body.append("Measured: " + "; ".join(facts) + ".")
    alarm = _alarm_text(j)
    body.append(alarm[0].upper() + alarm[1:] + ".")
    lead_text = _lead_sentence(j, lead)
    if lead_text:
        body.append(lead_text)
    lines = [head, " ".join(body)]
    if j.advice:
        lines.append("What to try: " + "; ".join(advice_text(a, j) for a in j.advice) + ".")
    elif j.status == "healthy":
        lines.append(
            "What to try: nothing is needed at this precision. Keep the monitor on when you change "
            "the model, the learning rate or the precision."
        )
    return lines


def rule_sentence() -> str:
    """The rule, stated under the report's verdicts (from the table)."""

    def levels(key: str) -> str:
        rows = [r for r in RULES if getattr(r, key) is not None and not r.window]
        parts: dict[str, str] = {}  # one entry per signal (the non-finite rules differ in advice only)
        for r in rows:
            shared = sum(o.signal == r.signal for o in rows) > 1
            only = "" if r.applies == "any" or shared else f" ({_APPLIES[r.applies]})"
            parts.setdefault(r.signal, f"{r.signal} {_level(r, getattr(r, key))}{only}")
        return "; ".join(parts.values())

    fp32 = next(r for r in RULES if r.advice == "fp32_region")
    bf16 = next(r for r in RULES if r.advice == "keep_bf16")
    return (
        f"*Rule* (`docs/RULES.md`): **at risk** when {levels('at_risk')}; **watch** when {levels('watch')}, "
        "or the early warning fired; otherwise **healthy**. Keeping a block in FP32 is advised only when "
        f"its {fp32.signal} is at least {fp32.advice_floor:g} × ε_mach and {fp32.stands_out:g}× the other "
        f"blocks' median; keeping a linear layer in BF16 (FP8 passes) only when its {bf16.signal} is at "
        f"least {bf16.advice_floor:g} × ε_mach (E4M3's) and {bf16.stands_out:g}× the other layers' median."
    )


def rule_table() -> str:
    """The rule table of ``docs/RULES.md``, generated from :data:`~lightning_stability.rules.table.RULES`."""
    rows = [
        "| rule | signal | watch | at risk | applies to | advice | alarm | guard acts at | meaning |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (*RULES, *CANDIDATES):
        signal = f"`{r.signal}`"
        if r.window:
            signal = f"z({'log10 ' if r.log else ''}`{r.signal}`), window {r.window}"
        if r.fallback:
            signal += f" (else `{r.fallback}`)"
        advice = f"`{r.advice}`" if r.advice else "—"
        if r.advice_floor is not None or r.stands_out is not None:
            others = "layers" if r.advice == "keep_bf16" else "blocks"
            floor = f"≥ {r.advice_floor:g} × ε_mach"
            advice += f" when {floor} and ≥ {r.stands_out:g}× the other {others}' median"
        alarm = f"`{r.alarm}`" if r.alarm else ("candidate" if r in CANDIDATES else "—")
        rows.append(
            f"| `{r.name}` | {signal} | {_level(r, r.watch)} | {_level(r, r.at_risk)} "
            f"| {_APPLIES[r.applies]} | {advice} | {alarm} | {r.guard or '—'} | {r.doc} |"
        )
    return "\n".join(rows)

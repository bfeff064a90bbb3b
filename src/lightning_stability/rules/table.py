"""The rule table: one row per judged signal, read by the alarm, both verdicts and the guard.

Each :class:`Rule` names a signal of the metric table, the direction that is bad, a **watch**
and an **at-risk** level, the passes it applies to, the advice that answers it, whether it is
part of an early-warning alarm, and the level at which :class:`~lightning_stability.StabilityGuard`
acts on it. :data:`RULES` is the rule book; :data:`CANDIDATES` are rules the scenario evaluation
scores but nothing uses. ``docs/RULES.md`` is generated from both (``python -m
lightning_stability.rules``; a test compares).

Plain Python: importable by every layer, no torch, no Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lightning_stability.rules.thresholds import (
    ENTROPY_COLLAPSE,
    FP8_LAYER_AT_RISK_EPS,
    FP8_LAYER_WATCH_EPS,
    FP16_HEADROOM_AT_RISK_BITS,
    FP16_HEADROOM_WATCH_BITS,
    FP32_ADVICE_FLOOR_EPS,
    LOG_LOGIT_Z,
    LOGIT_AT_RISK,
    PAPER_WINDOW,
    PAPER_Z,
    QK_CLIP_TAU,
    R_LOCAL_AT_RISK_EPS,
    R_LOCAL_WATCH_EPS,
    RHO_LN_WATCH,
    STANDS_OUT,
)

Direction = Literal["above", "below"]
#: Which passes a rule judges: any; FP16 only; any but FP16; low precision (ε_mach ≥ FP16's); FP8 only.
Applies = Literal["any", "fp16", "not_fp16", "low_precision", "fp8"]
#: What to try, by kind; the renderer words it, the guard maps it to a mitigation.
AdviceKind = Literal["qk_norm_or_clip", "eps_bump", "fp32_region", "prefer_bf16", "lower_lr", "keep_bf16"]
#: A finding's level; a judgement's status adds ``"healthy"`` (no finding).
Severity = Literal["watch", "at risk"]
Status = Literal["healthy", "watch", "at risk"]
#: The early-warning alarms a monitor can run (``AlarmOptions.rule``).
AlarmName = Literal["default", "paper"]
ALARM_NAMES: tuple[AlarmName, ...] = ("default", "paper")
SEVERITY: dict[str, int] = {"healthy": 0, "watch": 1, "at risk": 2}


@dataclass(frozen=True)
class Rule:
    """One row of the rule table.

    Attributes:
        name: the rule's name (``attn_logit_max``…), as findings, alarms and guard actions carry it.
        signal: the metric it reads (a name of :data:`lightning_stability.metrics.METRICS`). Per-block
            values when the step has them (the most extreme block is judged and named), else the
            model-level value; a per-layer metric is read per layer (the most extreme layer named).
        direction: ``"above"``: large values are bad; ``"below"``: small ones are.
        watch: the watch level (strict: ``value > watch`` above, ``<`` below); ``None``: none.
        at_risk: the at-risk level; ``None``: none.
        applies: the passes it judges (by the step's ``eps_mach``); elsewhere it is not applicable.
        advice: what answers a finding of this rule.
        alarm: the early-warning alarm it is part of: that alarm fires at a step exactly when one
            of its rules reaches its watch level there.
        guard: the level at which StabilityGuard acts on it, in every block reaching it.
        per_eps_mach: judge ``value / eps_mach`` (levels in multiples of ε_mach).
        fallback: a per-block signal judged instead when ``signal`` was not measured.
        names_block: for a model-level signal, the per-block metric that names the block.
        first_nonfinite: ``names_block`` names the first block where it is non-finite (else its largest).
        window: a rolling z-score rule: the value is the z-score of the signal (its per-block
            maximum without a model-level value) against this many previous checks; silent until
            the window is full.
        log: score ``log10`` of the signal (rolling z-score rules).
        advice_floor: the advice is given only from this value on (besides the watch level).
        stands_out: the advice is given only when the block's value is at least this many times the
            median of the other blocks' values at the same step (per-layer rules: the layer's against
            the other layers'; the advice then names every layer that stood out).
        doc: one line: what it means.
    """

    name: str
    signal: str
    direction: Direction
    watch: float | None
    at_risk: float | None = None
    applies: Applies = "any"
    advice: AdviceKind | None = None
    alarm: AlarmName | None = None
    guard: Severity | None = None
    per_eps_mach: bool = False
    fallback: str | None = None
    names_block: str | None = None
    first_nonfinite: bool = False
    window: int | None = None
    log: bool = False
    advice_floor: float | None = None
    stands_out: float | None = None
    doc: str = ""

    @property
    def label(self) -> str:
        """The compact condition: ``attn_logit_max>100``, ``z(kappa_softmax_max)>1.5``…"""
        level = self.watch if self.watch is not None else self.at_risk
        op = ">" if self.direction == "above" else "<"
        signal = f"z({'log10 ' if self.log else ''}{self.signal})" if self.window else self.signal
        unit = "*eps_mach" if self.per_eps_mach else ""
        return f"{signal}{op}{level:g}{unit}"

    def level_of(self, value: float) -> Severity | None:
        """The level ``value`` reaches (strict inequalities), ``None`` below watch."""
        if self.at_risk is not None and self.beyond(value, self.at_risk):
            return "at risk"
        if self.watch is not None and self.beyond(value, self.watch):
            return "watch"
        return None

    def beyond(self, value: float, level: float) -> bool:
        """Whether ``value`` is past ``level`` in the bad direction (strictly)."""
        return value > level if self.direction == "above" else value < level


#: The rule book, in the order findings and advice are listed.
RULES: tuple[Rule, ...] = (
    Rule(
        "nonfinite_fp16",
        "nonfinite",
        "above",
        watch=None,
        at_risk=0.0,
        applies="fp16",
        advice="prefer_bf16",
        names_block="r_block",
        first_nonfinite=True,
        doc="the FP16 forward went non-finite (overflow): BF16 has FP32's range",
    ),
    Rule(
        "nonfinite",
        "nonfinite",
        "above",
        watch=None,
        at_risk=0.0,
        applies="not_fp16",
        advice="lower_lr",
        names_block="r_block",
        first_nonfinite=True,
        doc="the low-precision forward went non-finite outside FP16: values grew past any format",
    ),
    Rule(
        "attn_logit_max",
        "attn_logit_max",
        "above",
        watch=QK_CLIP_TAU,
        at_risk=LOGIT_AT_RISK,
        advice="qk_norm_or_clip",
        alarm="default",
        guard="watch",
        doc="largest attention logit: QK-clip acts past τ; runs past 1e4 diverged (Wortsman et al. 2023)",
    ),
    Rule(
        "fp16_headroom",
        "fp16_headroom",
        "below",
        watch=FP16_HEADROOM_WATCH_BITS,
        at_risk=FP16_HEADROOM_AT_RISK_BITS,
        applies="fp16",
        advice="prefer_bf16",
        alarm="default",
        guard="at risk",
        names_block="amax",
        doc="bits left before FP16 overflows (the block holding the largest output is named)",
    ),
    Rule(
        "rho_ln",
        "rho_ln",
        "below",
        watch=RHO_LN_WATCH,
        applies="low_precision",
        advice="eps_bump",
        alarm="default",
        guard="watch",
        doc="a normalization layer is ε-dominated (SPEC §2); against FP32's rounding nearly all are",
    ),
    Rule(
        "r_local",
        "r_local",
        "above",
        watch=R_LOCAL_WATCH_EPS,
        at_risk=R_LOCAL_AT_RISK_EPS,
        advice="fp32_region",
        guard="at risk",
        per_eps_mach=True,
        fallback="r_block",
        advice_floor=FP32_ADVICE_FLOOR_EPS,
        stands_out=STANDS_OUT,
        doc="a block's own error on its exact input, in roundings (ε_mach); without r_local: r_block",
    ),
    Rule(
        "fp8_layer",
        "fp8_error_token",
        "above",
        watch=FP8_LAYER_WATCH_EPS,
        at_risk=FP8_LAYER_AT_RISK_EPS,
        applies="fp8",
        advice="keep_bf16",
        per_eps_mach=True,
        advice_floor=FP8_LAYER_WATCH_EPS,
        stands_out=STANDS_OUT,
        doc="a linear layer's FP8 output error per token, in E4M3 roundings (FP8 what-if); the layers "
        "standing out are kept in BF16",
    ),
    Rule(
        "kappa_softmax_z",
        "kappa_softmax_max",
        "above",
        watch=PAPER_Z,
        advice="lower_lr",
        alarm="paper",
        names_block="kappa_softmax",
        window=PAPER_WINDOW,
        doc="the paper's early warning: rolling z-score of κ_softmax against its previous checks",
    ),
)

#: Rules the scenario evaluation scores besides the book's (none is used by the alarm or the verdicts).
CANDIDATES: tuple[Rule, ...] = (
    Rule(
        "logit_growth_z",
        "attn_logit_max",
        "above",
        watch=LOG_LOGIT_Z,
        window=PAPER_WINDOW,
        log=True,
        doc="rolling z-score of log10 of the largest attention logit (growth by a factor)",
    ),
    Rule(
        "entropy_collapse",
        "attention_entropy",
        "below",
        watch=ENTROPY_COLLAPSE,
        doc="mean attention entropy (nats) of a block: attention collapsed onto few keys",
    ),
)

RULE_BY_NAME: dict[str, Rule] = {r.name: r for r in (*RULES, *CANDIDATES)}
if len(RULE_BY_NAME) != len(RULES) + len(CANDIDATES):  # pragma: no cover - a table typo
    raise ValueError("duplicate rule names")


@dataclass(frozen=True)
class RuleBook:
    """The rules one judge applies, and which of them form its alarm.

    Attributes:
        alarm: the alarm's name (``"default"``, ``"paper"``).
        rules: the rules judged, in table order: every row of :data:`RULES` but the other alarm's
            stateful rules (the paper's z-score runs only when it is the alarm).
    """

    alarm: AlarmName
    rules: tuple[Rule, ...]

    @property
    def alarm_rules(self) -> tuple[Rule, ...]:
        """The rules whose watch level fires the alarm."""
        return tuple(r for r in self.rules if r.alarm == self.alarm)

    def rule(self, name: str) -> Rule:
        """The book's rule of that name (levels as overridden)."""
        return next(r for r in self.rules if r.name == name)


def rule_book(
    alarm: AlarmName = "default",
    watch: Mapping[str, float] | None = None,
    window: int | None = None,
) -> RuleBook:
    """The rule book with the alarm ``alarm``, its rules' watch levels optionally moved.

    Args:
        alarm: which alarm fires: ``"default"`` (absolute levels) or ``"paper"`` (rolling z-score).
        watch: rule name → its watch level in this book (what the monitor's ``alarm`` options set);
            ``inf`` (``-inf`` for a "below" rule) turns the rule's watch level off.
        window: the rolling z-score rules' window in this book.

    Raises:
        ValueError: for an unknown alarm or rule name.

    Example:
        >>> book = rule_book("default", {"attn_logit_max": 50.0})
        >>> [r.label for r in book.alarm_rules]
        ['attn_logit_max>50', 'fp16_headroom<2', 'rho_ln<1']
    """
    if alarm not in ALARM_NAMES:
        raise ValueError(f"unknown alarm {alarm!r}; one of {ALARM_NAMES}")
    watch = dict(watch or {})
    unknown = set(watch) - {r.name for r in RULES}
    if unknown:
        raise ValueError(f"unknown rules {sorted(unknown)}")
    rows = []
    for r in RULES:
        if r.alarm is not None and r.window is not None and r.alarm != alarm:
            continue
        changes: dict[str, object] = {}
        if r.name in watch:
            changes["watch"] = float(watch[r.name])
        if r.window is not None and window is not None:
            changes["window"] = int(window)
        rows.append(dataclasses.replace(r, **changes) if changes else r)  # type: ignore[arg-type]
    return RuleBook(alarm, tuple(rows))

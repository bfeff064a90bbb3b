"""The judge: sampled steps in, a status (healthy / watch / at risk), findings and advice out.

:class:`Judge` reads each sampled step with the rule book (through an
:class:`~lightning_stability.rules.alarm.Alarm` over every rule of the book, whose alarm rules
fire the early warning), keeps every rule's most extreme reading, and at any time gives a
:class:`Judgement`: the findings (rules that reached their watch level, at their worst), the
status (the most severe finding), the advice that answers them, and the alarm's firings.

The monitor feeds it online (``monitor.judgement``, ``monitor.summary``); the report feeds it
the same tags read back from the logs (:func:`lightning_stability.analysis.verdict.run_verdict`),
so one run gets one judgement.

Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning_stability.rules.alarm import Alarm, AlarmResult, ZScore
from lightning_stability.rules.evidence import (
    Evidence,
    Reading,
    applies,
    median_of_other_layers,
    median_of_others,
)
from lightning_stability.rules.table import SEVERITY, AdviceKind, AlarmName, Rule, RuleBook, Severity, Status

__all__ = ["Advice", "AlarmRecord", "Extreme", "Finding", "Judge", "Judgement"]

#: The sub-layers whose own errors say where a block's r_local comes from.
PARTS = {"attention": "r_attention_local", "ffn": "r_ffn_local"}
#: Beside a layer's FP8 error: the same layer's BF16 error (per token), its contrast.
LAYER_PARTS = ("bf16_error_token",)
#: Beside a layer's FP8 error: what its quantized operands lost.
OPERAND_PARTS = ("fp8_underflow", "fp8_saturation")
Part = Literal["attention", "ffn", "block", "norms", "module"]


@dataclass
class Extreme:
    """A rule's most extreme reading over the judged steps (the first one on ties).

    Attributes:
        rule: the rule's name.
        value: the judged value (see :class:`~lightning_stability.rules.evidence.Reading`).
        block: the block it names.
        step: the step of that reading.
        signal: the metric read.
        raw: the metric's own value.
        level: the level it reached (``None``: below watch, or a pass the rule does not judge).
        first_step: the first step at which the rule reached its watch level.
        others_median: the median of the other blocks' values at that step (same units as ``value``).
        parts: the sub-layers' own errors of that block at that step (``r_local``: attention, ffn).
        block_name: the block's module name (online only).
        module: the module holding the value (online only: largest output, first non-finite output).
        applicable: whether the rule judges the pass this reading comes from.
        layer: the layer it names (per-layer rules: its module name, online and offline).
        operands: per-layer rules: per quantized operand of the layer, its :data:`OPERAND_PARTS`.
    """

    rule: str
    value: float
    block: int | None
    step: int
    signal: str
    raw: float
    level: Severity | None = None
    first_step: int | None = None
    others_median: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    block_name: str | None = None
    module: str | None = None
    applicable: bool = True
    layer: str | None = None
    operands: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """A rule that reached its watch level, at its worst.

    Attributes:
        rule: the rule's name.
        level: ``"watch"`` or ``"at risk"``.
        block: the block it names (``None``: a model-level value nobody names).
        block_name: its module name (online only).
        value: the judged value.
        threshold: the level crossed.
        step: the step of the worst value.
        first_step: the first step at which the rule reached its watch level.
        layer: the layer it names (per-layer rules).
    """

    rule: str
    level: Severity
    block: int | None
    block_name: str | None
    value: float
    threshold: float
    step: int
    first_step: int
    layer: str | None = None


@dataclass(frozen=True)
class Advice:
    """What to try, and the finding it answers.

    Attributes:
        kind: the action (``qk_norm_or_clip``, ``eps_bump``, ``fp32_region``, ``prefer_bf16``,
            ``lower_lr``, ``keep_bf16``).
        answers: the name of the rule whose finding it answers.
        block: the block it targets (``None``: the whole run, or a layer).
        part: the part of the block: ``attention``, ``ffn``, ``block``, ``norms``, ``module``.
        block_name: the block's module name (online only).
        module: the module it targets, when known (online only).
        layer: the linear layer it targets (``keep_bf16``), by module name (online and offline).
    """

    kind: AdviceKind
    answers: str
    block: int | None = None
    part: Part | None = None
    block_name: str | None = None
    module: str | None = None
    layer: str | None = None


@dataclass
class AlarmRecord:
    """The early warning's firings over the judged steps.

    Attributes:
        name: the alarm (``"default"``, ``"paper"``).
        steps: the steps at which it fired.
        first: what fired at the first of them.
        first_block_name: the module name of the block it named (online only).
        identified: ``False`` when the firings come from the logs and no alarm of the rule book
            replays them (the run's monitor used other levels).
    """

    name: AlarmName
    steps: list[int] = field(default_factory=list)
    first: AlarmResult | None = None
    first_block_name: str | None = None
    identified: bool = True


@dataclass
class Judgement:
    """The judgement of the steps seen so far.

    Attributes:
        status: ``"healthy"``, ``"watch"`` or ``"at risk"``; ``None`` when nothing could be judged
            (no step, or no per-block error and no finding).
        steps: sampled steps judged.
        eps_mach: ε_mach of the last step.
        findings: rules that reached their watch level, in table order.
        advice: what answers them, in the same order.
        alarm: the early warning's firings.
        extremes: every rule's most extreme reading (findings or not), by rule name.
        last_r_block: the propagated error at the last block, at the last step.
        nonfinite_steps: steps whose low-precision forward went non-finite.
        worst_block_steps: block index → steps at which it had the largest ``r_local``.
        layers: per-layer rules (FP8): each layer that stood out, by module name, at its worst
            standing-out reading (the ``keep_bf16`` advice names them, largest first).
    """

    status: Status | None
    steps: int
    eps_mach: float | None
    findings: list[Finding]
    advice: list[Advice]
    alarm: AlarmRecord
    extremes: dict[str, Extreme]
    last_r_block: float | None = None
    nonfinite_steps: int = 0
    worst_block_steps: dict[int, int] = field(default_factory=dict)
    layers: dict[str, Extreme] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        """What must agree between two judgements of one run: status, findings, advice, alarm."""
        return (
            self.status,
            [(f.rule, f.level, f.block, f.layer, f.step) for f in self.findings],
            [(a.kind, a.answers, a.block, a.part, a.layer) for a in self.advice],
            (
                self.alarm.name,
                self.alarm.steps,
                None if self.alarm.first is None else self.alarm.first.rule,
                None if self.alarm.first is None else self.alarm.first.block,
            ),
        )

    def with_logged_alarm(self, steps: list[int]) -> Judgement:
        """This judgement with alarm firings read from logs that no alarm of the book replays."""
        alarm = AlarmRecord(self.alarm.name, list(steps), identified=False)
        status = self.status
        if steps and SEVERITY[status or "healthy"] < SEVERITY["watch"]:
            status = "watch"  # an alarm that fired is never healthy
        return dataclasses.replace(self, alarm=alarm, status=status)


class Judge:
    """Judges sampled steps one by one with a rule book.

    Args:
        book: the rules, and which of them form the alarm.
        zscore: ``window → ZScore`` for the book's rolling z-score rules (the paper's alarm).

    Example:
        >>> from lightning_stability.rules.table import rule_book
        >>> judge = Judge(rule_book("default"))
        >>> step = {"stability/eps_mach": 2.0**-7, "stability/block0/r_local": 0.003,
        ...         "stability/block1/r_local": 0.002, "stability/block1/attn_logit_max": 180.0}
        >>> judge.observe(Evidence.from_tags(step, 9)).fired
        True
        >>> j = judge.judgement()
        >>> j.status, [(f.rule, f.level, f.block) for f in j.findings], [a.kind for a in j.advice]
        ('watch', [('attn_logit_max', 'watch', 1)], ['qk_norm_or_clip'])
    """

    def __init__(self, book: RuleBook, zscore: Callable[[int], ZScore] | None = None) -> None:
        self.book = book
        self.alarm = Alarm(book.rules, zscore, [r.name for r in book.alarm_rules], name=book.alarm)
        self.extremes: dict[str, Extreme] = {}
        self.alarm_record = AlarmRecord(book.alarm)
        self.steps = 0
        self.eps_mach: float | None = None
        self.last_r_block: float | None = None
        self.nonfinite_steps = 0
        self.worst_block_steps: dict[int, int] = {}
        self.layers: dict[str, Extreme] = {}

    def observe(self, ev: Evidence) -> AlarmResult:
        """Judge one sampled step (in step order); returns the alarm's result at that step."""
        check = self.alarm.check(ev)
        self.steps += 1
        self.eps_mach = ev.eps_mach
        self.last_r_block = ev.model.get("r_block")
        if ev.model.get("nonfinite", 0.0) > 0:
            self.nonfinite_steps += 1
        worst = ev.model.get("worst_block")
        if worst is not None and math.isfinite(worst):
            self.worst_block_steps[int(worst)] = self.worst_block_steps.get(int(worst), 0) + 1
        for rule in self.book.rules:
            reading = check.readings[rule.name]
            if reading is not None:
                self._fold(rule.name, reading, ev)
                if reading.layer is not None and rule.stands_out is not None:
                    self._fold_layers(rule.name, ev)
        if check.result.fired:
            if not self.alarm_record.steps:
                self.alarm_record.first = check.result
                self.alarm_record.first_block_name = ev.name_of(check.result.block)
            self.alarm_record.steps.append(ev.step)
        return check.result

    def _fold(self, name: str, reading: Reading, ev: Evidence) -> None:
        rule = self.book.rule(name)
        level = rule.level_of(reading.value) if reading.applicable else None
        old = self.extremes.get(name)
        first = old.first_step if old is not None else None
        if first is None and level is not None:
            first = ev.step
            if old is not None:
                old.first_step = first
        if old is not None and not rule.beyond(reading.value, old.value):
            return
        ext = Extreme(name, reading.value, reading.block, ev.step, reading.signal, reading.raw, level, first)
        ext.block_name, ext.applicable = ev.name_of(reading.block), reading.applicable
        if reading.block is not None and rule.stands_out is not None:
            median = median_of_others(ev, reading.signal, reading.block)
            if median is not None and rule.per_eps_mach and ev.eps_mach:
                median /= ev.eps_mach
            ext.others_median = median
        if reading.layer is not None:
            self._describe_layer(ext, rule.name, reading.layer, ev)
        if rule.advice == "fp32_region" and reading.block is not None:
            ext.parts = {p: v for p, s in PARTS.items() if (v := ev.finite(s).get(reading.block)) is not None}
        ext.module = (
            ev.first_nonfinite
            if rule.first_nonfinite
            else (ev.amax_module if rule.names_block == "amax" else None)
        )
        self.extremes[name] = ext

    def _describe_layer(self, ext: Extreme, name: str, layer: str, ev: Evidence) -> None:
        """A per-layer reading: the layer, the other layers' median, its contrast and operands."""
        rule = self.book.rule(name)
        ext.layer = layer
        median = median_of_other_layers(ev, rule.signal, layer)
        if median is not None and rule.per_eps_mach and ev.eps_mach:
            median /= ev.eps_mach
        ext.others_median = median
        ext.parts = {m: v for m in LAYER_PARTS if (v := ev.layers.get(m, {}).get(layer)) is not None}
        for metric in OPERAND_PARTS:
            for (at, operand), value in ev.operands.get(metric, {}).items():
                if at == layer:
                    ext.operands.setdefault(operand, {})[metric] = value

    def _fold_layers(self, name: str, ev: Evidence) -> None:
        """Every layer standing out at this step (advice floor and ``stands_out`` × the others' median),
        kept at its largest such value."""
        rule = self.book.rule(name)
        eps = ev.eps_mach
        if not applies(rule, eps) or (rule.per_eps_mach and not (eps and math.isfinite(eps) and eps > 0)):
            return
        for layer, raw in ev.finite_layers(rule.signal).items():
            value = raw / eps if rule.per_eps_mach and eps else raw
            old = self.layers.get(layer)
            if old is not None and not value > old.value:
                continue
            ext = Extreme(name, value, None, ev.step, rule.signal, raw, rule.level_of(value))
            self._describe_layer(ext, name, layer, ev)
            if _stands_out(rule, ext):
                ext.first_step = ev.step if old is None else old.first_step
                self.layers[layer] = ext

    # ------------------------------------------------------------------ the judgement
    def judgement(self) -> Judgement:
        """Findings, status and advice of the steps judged so far."""
        findings = []
        for rule in self.book.rules:
            ext = self.extremes.get(rule.name)
            if ext is None or ext.level is None:
                continue
            threshold = rule.at_risk if ext.level == "at risk" else rule.watch
            assert threshold is not None and ext.first_step is not None
            findings.append(
                Finding(
                    rule.name,
                    ext.level,
                    ext.block,
                    ext.block_name,
                    ext.value,
                    threshold,
                    ext.step,
                    ext.first_step,
                    ext.layer,
                )
            )
        severity = max((SEVERITY[f.level] for f in findings), default=0)
        status: Status | None = ("healthy", "watch", "at risk")[severity]
        judged = "r_local" in self.extremes or findings
        if not self.steps or not judged:
            status = None
        return Judgement(
            status,
            self.steps,
            self.eps_mach,
            findings,
            self._advice(findings),
            dataclasses.replace(self.alarm_record, steps=list(self.alarm_record.steps)),
            {k: dataclasses.replace(v) for k, v in self.extremes.items()},
            self.last_r_block,
            self.nonfinite_steps,
            dict(self.worst_block_steps),
            {k: dataclasses.replace(v) for k, v in self.layers.items()},
        )

    def _advice(self, findings: list[Finding]) -> list[Advice]:
        out: list[Advice] = []
        for f in findings:
            rule, ext = self.book.rule(f.rule), self.extremes[f.rule]
            if rule.advice is None:
                continue
            if rule.advice == "keep_bf16":
                flagged = sorted(self.layers.values(), key=lambda e: -e.value)
                out += [Advice("keep_bf16", rule.name, layer=e.layer) for e in flagged if e.rule == rule.name]
                continue
            advice = Advice(rule.advice, rule.name, f.block, None, f.block_name, ext.module)
            if rule.advice == "fp32_region":
                part = _fp32_part(rule.name, self.book, ext)
                if part is None:
                    continue
                advice = dataclasses.replace(advice, part=part)
            elif rule.advice == "qk_norm_or_clip":
                advice = dataclasses.replace(advice, part="attention")
            elif rule.advice == "eps_bump":
                advice = dataclasses.replace(advice, part="norms")
            elif rule.advice == "prefer_bf16":
                advice = dataclasses.replace(advice, part="module" if ext.module else "block")
            else:
                advice = dataclasses.replace(advice, block=None, block_name=None, module=None)
            if all((a.kind, a.block, a.part) != (advice.kind, advice.block, advice.part) for a in out):
                out.append(advice)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint (a resumed fit keeps its judgement and the z-scores' history)."""
        first = self.alarm_record.first
        return {
            "alarm": self.book.alarm,
            "rules": {r.name: r.label for r in self.book.rules},
            "z": self.alarm.state_dict(),
            "extremes": {k: asdict(v) for k, v in self.extremes.items()},
            "alarm_steps": list(self.alarm_record.steps),
            "alarm_first": None if first is None else asdict(first),
            "alarm_first_block_name": self.alarm_record.first_block_name,
            "steps": self.steps,
            "eps_mach": self.eps_mach,
            "last_r_block": self.last_r_block,
            "nonfinite_steps": self.nonfinite_steps,
            "worst_block_steps": dict(self.worst_block_steps),
            "layers": {k: asdict(v) for k, v in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the z-scores' history only when it was written by the same rules."""
        if state.get("rules") == {r.name: r.label for r in self.book.rules}:
            self.alarm.load_state_dict(state.get("z", {}))
        names = {r.name for r in self.book.rules}
        self.extremes = {k: Extreme(**v) for k, v in state.get("extremes", {}).items() if k in names}
        self.alarm_record.steps = [int(s) for s in state.get("alarm_steps", [])]
        first = state.get("alarm_first")
        self.alarm_record.first = None if first is None else AlarmResult(**first)
        self.alarm_record.first_block_name = state.get("alarm_first_block_name")
        self.steps = int(state.get("steps", 0))
        self.eps_mach = state.get("eps_mach")
        self.last_r_block = state.get("last_r_block")
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.worst_block_steps = {int(k): int(v) for k, v in state.get("worst_block_steps", {}).items()}
        self.layers = {k: Extreme(**v) for k, v in state.get("layers", {}).items() if v.get("rule") in names}


def _stands_out(rule: Rule, ext: Extreme) -> bool:
    """Whether a reading passes the rule's advice floor and stands out against the others' median."""
    if rule.advice_floor is not None and not ext.value >= rule.advice_floor:
        return False
    if rule.stands_out is not None:
        median = ext.others_median
        return median is not None and median > 0 and ext.value / median >= rule.stands_out
    return True


def _fp32_part(name: str, book: RuleBook, ext: Extreme) -> Part | None:
    """Where to put an FP32 region, or ``None`` when the advice's own tests fail.

    The block must add error itself (``r_local``, not the propagated fallback), reach the advice
    floor and stand out against the other blocks' median.
    """
    rule = book.rule(name)
    if ext.signal != rule.signal or ext.block is None or not _stands_out(rule, ext):
        return None
    att, ffn = ext.parts.get("attention"), ext.parts.get("ffn")
    if att is not None and ffn is not None:
        return "ffn" if ffn > att else "attention"
    return "attention" if att is not None else "ffn" if ffn is not None else "block"

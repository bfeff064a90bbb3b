"""The verdict that opens ``report.md``: the rule book's judgement of each run, from its logged values.

Each logged step's ``stability/*`` tags are read back into the
:class:`~lightning_stability.rules.evidence.Evidence` the monitor judged online, and fed in step
order to the same :class:`~lightning_stability.rules.judge.Judge`: the status (healthy / watch /
at risk), the findings, the advice and the alarm's firings are the monitor's own
(``monitor.judgement``), up to the logs' float32 rounding. The rules are ``docs/RULES.md``.

The alarm a run's monitor ran is not logged by name: the steps of ``stability/alarm`` are
replayed with the default alarm, then with the paper's; the first that reproduces them is the
run's. When neither does (the monitor used other levels), the judgement keeps the logged
firings, says the rule is not identified, and a run whose alarm fired is still never "healthy".
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_stability.diagnostics.rolling import RollingZScore
from lightning_stability.rules import Evidence, Judge, Judgement, rule_book
from lightning_stability.rules.render import KappaLead, paragraph, rule_sentence
from lightning_stability.rules.table import ALARM_NAMES

from .logs import Run

__all__ = ["ALARM_TAG", "KappaLead", "RunVerdict", "logged_steps", "run_verdict", "verdict_markdown"]

ALARM_TAG = "stability/alarm"
PREFIX = "stability/"


@dataclass
class RunVerdict:
    """The verdict of one run.

    Attributes:
        run: the run's name (its directory under the log root).
        judgement: the rule book's judgement of its logged steps.
    """

    run: str
    judgement: Judgement

    @property
    def status(self) -> str:
        """``"healthy"``, ``"watch"``, ``"at risk"``, or ``"unknown"`` when nothing could be judged."""
        return self.judgement.status or "unknown"


def logged_steps(run: Run) -> list[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` for every step at which a ``stability/*`` tag was logged, in step order."""
    by_step: dict[int, dict[str, float]] = {}
    for tag, series in run.scalars.items():
        if not tag.startswith(PREFIX):
            continue
        for step, value in zip(series.steps.tolist(), series.values.tolist(), strict=True):
            by_step.setdefault(int(step), {})[tag] = float(value)
    return sorted(by_step.items())


def run_verdict(run: Run) -> RunVerdict:
    """Judge one run from its logged values with the rule book (see the module docstring)."""
    steps = logged_steps(run)
    logged = [s for s, values in steps if values.get(ALARM_TAG) == 1.0]
    has_alarm = any(ALARM_TAG in values for _, values in steps)
    judgements = []
    for name in ALARM_NAMES:
        judge = Judge(rule_book(name), RollingZScore)
        for step, values in steps:
            judge.observe(Evidence.from_tags(values, step))
        judgement = judge.judgement()
        if not has_alarm or judgement.alarm.steps == logged:
            return RunVerdict(run.name, judgement)
        judgements.append(judgement)
    return RunVerdict(run.name, judgements[0].with_logged_alarm(logged))


def verdict_markdown(verdicts: list[RunVerdict], leads: dict[str, KappaLead] | None = None) -> list[str]:
    """The report's opening section: one overall line, then a paragraph per run, then the rule.

    Args:
        verdicts: one :class:`RunVerdict` per run.
        leads: run name → its κ_softmax lead–lag test (only runs where it ran).
    """
    leads = leads or {}
    judged = [v for v in verdicts if v.judgement.status is not None]
    risky = [v for v in judged if v.status == "at risk"]
    watch = [v for v in judged if v.status == "watch"]

    def named(vs: list[RunVerdict]) -> str:
        def block(v: RunVerdict) -> str:
            worst = v.judgement.findings[0] if v.judgement.findings else None
            return f" (block {worst.block})" if worst is not None and worst.block is not None else ""

        return ", ".join(f"{v.run}{block(v)}" for v in vs)

    if not judged:
        top = "No run logged a per-block error: no verdict."
    elif risky:
        top = f"**At risk: {len(risky)} of {len(judged)} run(s)** — {named(risky)}."
    elif watch:
        top = f"**Worth a look: {len(watch)} of {len(judged)} run(s)** — {named(watch)}; none at risk."
    else:
        top = f"**Healthy: all {len(judged)} run(s)**: no rule reached its watch level."
    lines = ["## Verdict", "", top, ""]
    for v in verdicts:
        lines += paragraph(v.judgement, v.run, leads.get(v.run))
        lines.append("")
    lines += [rule_sentence(), ""]
    return lines

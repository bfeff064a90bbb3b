"""Reports judged by the rule book: the early warning at each report, the verdict of them all.

:class:`ReportJudge` hands each :class:`~lightning_stability.stability_report.StabilityReport` to
the one :class:`~lightning_stability.rules.Judge` (as the evidence of its logged tags, with the
module names only a live report knows) and writes the alarm's result into the report.
:class:`~lightning_stability.StabilityMeter` and :class:`~lightning_stability.StabilityMonitor`
both judge through it, so the same reports give the same status, findings and advice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning_stability.diagnostics.rolling import RollingZScore
from lightning_stability.meter.options import AlarmOptions, check_alarm
from lightning_stability.metrics import BY_NAME, tag
from lightning_stability.rules import AlarmResult, EpisodeLatch, Evidence, Judge, Judgement, render, rule_book
from lightning_stability.stability_report import StabilityReport

__all__ = ["ReportJudge", "judge_reports"]

#: The alarm's own tag: the judge's output, never its input.
ALARM_TAG = tag(BY_NAME["alarm"])


def evidence(report: StabilityReport) -> Evidence:
    """What the rules read of ``report``: its tags (but the alarm's), block names and module names."""
    metrics = {k: v for k, v in report.metrics().items() if k != ALARM_TAG}
    ev = Evidence.from_tags(metrics, report.step, [b.name for b in report.blocks])
    ev.amax_module, ev.first_nonfinite = report.amax_module, report.first_nonfinite
    return ev


class ReportJudge:
    """Judges reports one by one, in step order, with the rule book of ``alarm``.

    Args:
        alarm: which early warning runs, at which levels (``docs/RULES.md``).

    Attributes:
        judge: the rule book's :class:`~lightning_stability.rules.Judge`.
        latch: turns firing checks into episodes (:attr:`episode_started`).
        episode_started: whether the last observed report started an alarm episode.
    """

    def __init__(self, alarm: AlarmOptions = AlarmOptions()) -> None:  # noqa: B008 (frozen)
        check_alarm(alarm)
        self.alarm = alarm
        self.judge = self._new_judge()
        self.latch = EpisodeLatch()
        self.episode_started = False

    def _new_judge(self) -> Judge:
        book = rule_book(self.alarm.rule, self.alarm.watch_levels, window=int(self.alarm.window))
        return Judge(book, RollingZScore)

    def observe(self, report: StabilityReport) -> AlarmResult:
        """Judge ``report`` and write the alarm's result into it.

        Sets ``report.alarm`` (``None`` when none of the alarm's signals was measured) and, when
        it fired, ``alarm_rule``, ``alarm_block`` and ``alarm_reason`` (else ``None``).
        """
        result = self.judge.observe(evidence(report))
        report.alarm = result.fired if result.available else None
        report.alarm_rule = report.alarm_block = report.alarm_reason = None
        if result.fired:
            report.alarm_rule, report.alarm_block = result.rule, result.block
            names = [b.name for b in report.blocks]
            block = result.block
            name = names[block] if block is not None and block < len(names) else None
            report.alarm_reason = render.alarm_reason(result, name)
        self.episode_started = self.latch.update(result.fired)
        return result

    def judgement(self) -> Judgement:
        """The verdict of the reports observed so far: status, findings, advice, the alarm's firings."""
        return self.judge.judgement()

    def summary(self, owner: str = "StabilityMeter") -> str:
        """:meth:`judgement` in words (``owner`` starts the first line)."""
        return render.summary(self.judgement(), owner)

    def reset(self) -> None:
        """Forget every report observed (a new run is judged afresh)."""
        self.judge = self._new_judge()
        self.latch = EpisodeLatch()
        self.episode_started = False

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint: the judge's state and the open alarm episode."""
        return {"judge": self.judge.state_dict(), "alarm_latch": self.latch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the z-scores' history only when written by the same rules, an
        open episode only when written by the same alarm."""
        judge = state.get("judge", {})
        self.judge.load_state_dict(judge)
        if judge.get("alarm") == self.alarm.rule:
            self.latch.load_state_dict(state.get("alarm_latch", {}))


def judge_reports(reports: Iterable[StabilityReport], alarm: AlarmOptions = AlarmOptions()) -> Judgement:  # noqa: B008
    """The verdict of a sequence of reports (in step order), as a meter that measured them gives it.

    For reports of :func:`~lightning_stability.measure`: their alarm fields are rewritten by this
    judgement (the paper's rolling z-score needs the history a sequence has).

    Example:
        >>> from lightning_stability.stability_report import BlockReport
        >>> hot = StabilityReport(3, "bfloat16", 2**-7, [BlockReport("h.0", attn_logit_max=180.0)])
        >>> j = judge_reports([hot])
        >>> j.status, [a.kind for a in j.advice], hot.alarm_reason
        ('watch', ['qk_norm_or_clip'], "attn_logit_max>100 in block 0 ('h.0') (value 180)")
    """
    judge = ReportJudge(alarm)
    for report in reports:
        judge.observe(report)
    return judge.judgement()

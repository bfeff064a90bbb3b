"""The rule book: every threshold once, one judge, one renderer (plain Python, importable by every layer).

- :mod:`~lightning_stability.rules.thresholds`: the named numbers.
- :mod:`~lightning_stability.rules.table`: :class:`Rule` rows (:data:`RULES`), :func:`rule_book`.
- :mod:`~lightning_stability.rules.evidence`: a sampled step's values (:class:`Evidence`), a rule's reading.
- :mod:`~lightning_stability.rules.mitigation`: which mitigation answers which finding (the guard).
- :mod:`~lightning_stability.rules.alarm`: the early warning (:class:`Alarm`, :class:`EpisodeLatch`).
- :mod:`~lightning_stability.rules.judge`: :class:`Judge` → :class:`Judgement` (status, findings, advice).
- :mod:`~lightning_stability.rules.render`: the words.

``python -m lightning_stability.rules`` prints the rule table of ``docs/RULES.md``.
"""

from lightning_stability.rules.alarm import Alarm, AlarmResult, EpisodeLatch, ZScore
from lightning_stability.rules.evidence import Evidence, Reading, read
from lightning_stability.rules.judge import Advice, AlarmRecord, Extreme, Finding, Judge, Judgement
from lightning_stability.rules.table import (
    CANDIDATES,
    RULE_BY_NAME,
    RULES,
    AdviceKind,
    AlarmName,
    Rule,
    RuleBook,
    Severity,
    Status,
    rule_book,
)

__all__ = [
    "CANDIDATES",
    "RULES",
    "RULE_BY_NAME",
    "Advice",
    "AdviceKind",
    "Alarm",
    "AlarmName",
    "AlarmRecord",
    "AlarmResult",
    "EpisodeLatch",
    "Evidence",
    "Extreme",
    "Finding",
    "Judge",
    "Judgement",
    "Reading",
    "Rule",
    "RuleBook",
    "Severity",
    "Status",
    "ZScore",
    "read",
    "rule_book",
]

"""The early warning: at a sampled step, fires exactly when one of its rules reaches its watch level.

:class:`Alarm` reads a step's :class:`~lightning_stability.rules.evidence.Evidence` with its
rules (the rule book's alarm rules for the monitor; any rules for the scenario evaluation) and
reports the first rule, in table order, that reached its watch level, with the block it names.
Rolling z-score rules keep their history here; the z-score itself is computed by an object
the caller passes (:class:`ZScore`, e.g. :class:`lightning_stability.diagnostics.RollingZScore`),
so this module stays free of torch. :class:`EpisodeLatch` turns "fired at this check" into "an
episode started", so a caller warns once per episode.

The monitor runs it online on ``report.metrics()``; ``examples/scenarios/evaluate.py`` and the
report replay the logged tags through the same objects, so a level means the same online and
offline.

Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lightning_stability.rules.evidence import Evidence, Reading, applies, read
from lightning_stability.rules.table import Rule

__all__ = ["Alarm", "AlarmResult", "Check", "EpisodeLatch", "ZScore"]


class ZScore(Protocol):
    """An online rolling z-score (:class:`lightning_stability.diagnostics.RollingZScore`)."""

    window: int

    def __len__(self) -> int: ...

    def update(self, value: float) -> float | None: ...

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class AlarmResult:
    """What the alarm concluded at one check.

    Attributes:
        fired: whether one of its rules reached its watch level.
        rule: the name of the rule that fired (the first in table order), ``None`` when none did.
        label: that rule's condition (``attn_logit_max>100``), or the alarm's name when none fired.
        block: the block that rule names, ``None`` for a model-level value nobody names.
        value: the value it judged (the z-score for rolling z-score rules).
        threshold: the watch level it crossed.
        available: whether any of its rules could read this step (else ``fired`` is ``False``).
    """

    fired: bool
    rule: str | None = None
    label: str = ""
    block: int | None = None
    value: float | None = None
    threshold: float | None = None
    available: bool = True


@dataclass(frozen=True)
class Check:
    """One step read by every rule of an :class:`Alarm`: the readings and the alarm's result.

    Attributes:
        result: the alarm's conclusion.
        readings: rule name → its reading (``None``: not measured, or a z-score still warming up).
    """

    result: AlarmResult
    readings: dict[str, Reading | None]


def _z_signal(rule: Rule, ev: Evidence) -> tuple[float, int | None] | None:
    """The value a rolling z-score rule scores (model-level first, else the per-block maximum)."""
    if rule.signal in ev.model:
        value = ev.model[rule.signal]
    else:
        blocks = ev.finite(rule.signal)
        if not blocks:
            return None
        value = max(blocks.values())
    if math.isnan(value):
        return None
    named = ev.finite(rule.names_block or rule.signal)
    block = max(named, key=lambda k: named[k]) if named else None
    return value, block


class Alarm:
    """Rules judged step by step; the alarm fires when one of ``fires_on`` reaches its watch level.

    Args:
        rules: the rules read at every step (all of them are updated, so z-score memories stay in step).
        zscore: ``window → ZScore`` for the rolling z-score rules among ``rules``.
        fires_on: names of the rules that fire the alarm (default: every rule).
        name: the alarm's name (``"default"``, ``"paper"``…).

    Raises:
        ValueError: no rules, an unknown name in ``fires_on``, or a z-score rule without ``zscore``.

    Example:
        >>> from lightning_stability.rules.table import rule_book
        >>> alarm = Alarm(rule_book("default").alarm_rules, name="default")
        >>> tags = {"stability/block0/attn_logit_max": 12.0, "stability/block1/attn_logit_max": 180.0}
        >>> result = alarm.update(tags)
        >>> result.fired, result.label, result.block, result.value
        (True, 'attn_logit_max>100', 1, 180.0)
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        zscore: Callable[[int], ZScore] | None = None,
        fires_on: Iterable[str] | None = None,
        name: str = "",
    ) -> None:
        if not rules:
            raise ValueError("`rules` must not be empty")
        self.rules = tuple(rules)
        names = [r.name for r in self.rules]
        self.fires_on = tuple(fires_on) if fires_on is not None else tuple(names)
        if set(self.fires_on) - set(names):
            unknown = sorted(set(self.fires_on) - set(names))
            raise ValueError(f"`fires_on` names rules not in `rules`: {unknown}")
        self.name = name or " | ".join(r.label for r in self.rules if r.name in self.fires_on)
        windowed = [r for r in self.rules if r.window is not None]
        if windowed and zscore is None:
            raise ValueError(f"rolling z-score rules {[r.name for r in windowed]} need a `zscore` factory")
        self._z: dict[str, ZScore] = {r.name: zscore(int(r.window)) for r in windowed if zscore and r.window}

    def z_history(self, rule: str) -> tuple[int, int]:
        """``(window, checks held)`` of a rolling z-score rule."""
        z = self._z[rule]
        return z.window, len(z)

    def check(self, ev: Evidence) -> Check:
        """Read one step with every rule (in step order: z-scores remember it)."""
        readings: dict[str, Reading | None] = {}
        available: dict[str, bool] = {}
        for rule in self.rules:
            if rule.window is None:
                reading = readings[rule.name] = read(rule, ev)
                available[rule.name] = reading is not None and reading.applicable
            else:
                readings[rule.name], available[rule.name] = self._read_z(rule, ev)
        for name in self.fires_on:
            reading, rule = readings[name], next(r for r in self.rules if r.name == name)
            if reading is None or not reading.applicable or rule.watch is None:
                continue
            if rule.beyond(reading.value, rule.watch):
                result = AlarmResult(True, name, rule.label, reading.block, reading.value, rule.watch)
                return Check(result, readings)
        result = AlarmResult(False, label=self.name, available=any(available[n] for n in self.fires_on))
        return Check(result, readings)

    def update(self, values: Mapping[str, float], step: int = 0, prefix: str = "stability") -> AlarmResult:
        """:meth:`check` a ``{tag: value}`` dict (the tags of one logged step)."""
        return self.check(Evidence.from_tags(values, step, prefix=prefix)).result

    def _read_z(self, rule: Rule, ev: Evidence) -> tuple[Reading | None, bool]:
        """A z-score reading once the window is full; and whether the signal was there at all."""
        if not applies(rule, ev.eps_mach):
            return None, False
        got = _z_signal(rule, ev)
        if got is None:
            return None, False
        raw, block = got
        value = raw
        if rule.log:
            if raw <= 0:
                return None, True
            value = math.log10(raw)
        z = self._z[rule.name]
        warm = len(z) >= z.window
        score = z.update(value)
        if not warm or score is None:
            return None, True
        return Reading(score, block, rule.signal, raw), True

    def reset(self) -> None:
        """Forget the z-scores' history."""
        for z in self._z.values():
            z.reset()

    def state_dict(self) -> dict[str, Any]:
        """The z-scores' history, by rule name."""
        return {name: z.state_dict() for name, z in self._z.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (rules it does not name start fresh)."""
        for name, z in self._z.items():
            if name in state:
                z.load_state_dict(state[name])


class EpisodeLatch:
    """Turns per-check firings into episodes: ``update(fired)`` is ``True`` only when an episode starts.

    An episode is a run of consecutive firing checks; it ends at the first check that
    does not fire (``quiet_checks`` of them, to bridge one-check gaps). The monitor warns
    and calls ``on_alarm`` once per episode.

    Example:
        >>> latch = EpisodeLatch()
        >>> [latch.update(f) for f in [False, True, True, False, True]]
        [False, True, False, False, True]
    """

    def __init__(self, quiet_checks: int = 1) -> None:
        if quiet_checks < 1:
            raise ValueError(f"`quiet_checks` must be >= 1, got {quiet_checks}")
        self.quiet_checks = quiet_checks
        self.active = False
        self._quiet = 0

    def update(self, fired: bool) -> bool:
        """Record one check; ``True`` when it starts a new episode."""
        if fired:
            started = not self.active
            self.active, self._quiet = True, 0
            return started
        self._quiet += 1
        if self._quiet >= self.quiet_checks:
            self.active = False
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "quiet": self._quiet}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = bool(state.get("active", False))
        self._quiet = int(state.get("quiet", 0))

"""Candidate early-warning rules over one sampled step's metrics: one implementation, online and offline.

Every rule is an object with ``update(values) -> AlarmResult``, where ``values`` is the
flat ``{tag: value}`` dict of one sampled step, with the monitor's tag names
(``stability/<name>`` for the model, ``stability/block{i}/<name>`` per block; the names
of issue 11: ``attn_logit_max``, ``attention_entropy``, ``amax``, ``r_local``,
``fp16_headroom``, ``kappa_softmax_max``, ``rho_ln``, ``eps_mach``). The monitor calls it
with ``report.metrics()`` at each sampled step; the offline evaluation
(``examples/scenarios/evaluate.py``) feeds the logged series step by step through the
**same** objects, so a threshold measured offline means the same online.

Rules with memory (the rolling z-scores, persistence) keep it in the object and expose
``state_dict``/``load_state_dict``; :class:`EpisodeLatch` turns "fired at this check"
into "a new episode started" so a caller warns once per episode. A signal that is not
in ``values`` (not logged by this monitor version, or not measurable for the model)
never fires: the result says ``available=False``.

How a caller (the monitor) is meant to use it, once per sampled step::

    alarm, latch = default_alarm(), EpisodeLatch()        # thresholds: typed __init__ args
    result = alarm.update(report.metrics())               # {"stability/...": value}
    metrics["stability/alarm"] = float(result.fired)
    if latch.update(result.fired):                        # a new episode: warn once
        warn(result.reason); on_alarm(...)                # e.g. "attn_logit_max>100 in block 0 (value 172)"

and checkpoints ``alarm.state_dict()`` / ``latch.state_dict()`` (``StabilityMonitor`` does
exactly this). The paper's rule is ``RollingZ("kappa_softmax_max", window, threshold,
block_metric="kappa_softmax")``: the monitor's ``alarm_rule="paper"``.

Pure Python/torch: no Lightning, no logging (the diagnostics layer).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_stability.diagnostics.rolling import RollingZScore

__all__ = [
    "AlarmResult",
    "AlarmRule",
    "AnyOf",
    "EpisodeLatch",
    "Level",
    "LocalErrorFloor",
    "Persistent",
    "RollingZ",
    "block_values",
    "default_alarm",
]

_BLOCK_TAG = re.compile(r"(?P<prefix>.+)/block(?P<i>\d+)/(?P<name>[^/]+)")


@dataclass(frozen=True)
class AlarmResult:
    """What a rule concluded at one check.

    Attributes:
        fired: whether the rule fires at this check.
        rule: the rule's name (e.g. ``"attn_logit_max>100"``).
        block: index of the block that fired (or is most extreme), ``None`` for a model-level value.
        value: the value the rule tested (z-score for z-score rules).
        threshold: the threshold it was compared with.
        available: ``False`` when the signal was not in ``values`` (then ``fired`` is ``False``).
    """

    fired: bool
    rule: str
    block: int | None = None
    value: float | None = None
    threshold: float | None = None
    available: bool = True

    @property
    def reason(self) -> str:
        """``"<rule> in block <i> (value <v>)"``: what the alarm logs and warns with."""
        where = f" in block {self.block}" if self.block is not None else ""
        val = f" (value {self.value:.4g})" if self.value is not None else ""
        return f"{self.rule}{where}{val}"


def block_values(values: Mapping[str, float], name: str, prefix: str = "stability") -> dict[int, float]:
    """``{block index: value}`` of ``<prefix>/block{i}/<name>`` tags (finite values only).

    Example:
        >>> tags = {"stability/block1/amax": 3.0, "stability/block0/amax": 2.0, "stability/amax": 9.0}
        >>> block_values(tags, "amax")
        {0: 2.0, 1: 3.0}
    """
    out: dict[int, float] = {}
    for tag, v in values.items():
        m = _BLOCK_TAG.fullmatch(tag)
        if m and m["prefix"] == prefix and m["name"] == name and math.isfinite(float(v)):
            out[int(m["i"])] = float(v)
    return dict(sorted(out.items()))


def _extreme(blocks: Mapping[int, float], above: bool) -> tuple[int, float]:
    pick = max if above else min
    i = pick(blocks, key=lambda k: blocks[k])
    return i, blocks[i]


class AlarmRule(ABC):
    """One early-warning rule; ``update`` is called once per sampled step, in step order."""

    name: str

    @abstractmethod
    def update(self, values: Mapping[str, float]) -> AlarmResult:
        """Test one sampled step's ``{tag: value}`` (and update any memory)."""

    def reset(self) -> None:  # noqa: B027 (stateless rules have nothing to forget)
        """Forget any memory (stateless rules: nothing to do)."""

    def state_dict(self) -> dict[str, Any]:
        """Memory to checkpoint (stateless rules: empty)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore :meth:`state_dict`."""


class Level(AlarmRule):
    """Absolute level of a per-block (or model-level) signal: fires when any block crosses ``threshold``.

    Examples: ``Level("attn_logit_max", 100)`` (Megatron's QK-clip τ; Wortsman et al.'s
    runs diverged past ~1e4), ``Level("attention_entropy", 0.1, above=False)`` (attention
    collapse), ``Level("fp16_headroom", 1.0, above=False)`` (< 1 bit before FP16
    overflows), ``Level("rho_ln", 1.0, above=False)`` (an ε-dominated norm, SPEC §2).

    Args:
        metric: the metric name (without prefix); per-block tags are used when present,
            else the model-level ``<prefix>/<metric>``.
        threshold: the level.
        above: fire when the value is above (``True``) or below (``False``) the level.
        block_metric: for a model-level signal, the per-block metric whose extreme names
            the block (e.g. ``"amax"`` for ``fp16_headroom``: the block nearest overflow).
        only_eps_mach: apply only when ``<prefix>/eps_mach`` equals this (e.g. ``2**-10``:
            FP16 headroom matters to an FP16 pass, not to BF16, whose range is FP32's);
            otherwise the result is ``available=False``.
        min_eps_mach: apply only when ``<prefix>/eps_mach`` is at least this (a low-precision
            pass; e.g. ``ρ_LN`` compares the norm's ε with the pass's rounding, and under FP32
            almost every norm has ``ρ_LN < 1`` with nothing fragile); otherwise ``available=False``.
        prefix: tag prefix.
    """

    def __init__(
        self,
        metric: str,
        threshold: float,
        above: bool = True,
        block_metric: str | None = None,
        only_eps_mach: float | None = None,
        prefix: str = "stability",
        min_eps_mach: float | None = None,
    ) -> None:
        self.metric = metric
        self.threshold = float(threshold)
        self.above = above
        self.block_metric = block_metric
        self.only_eps_mach = only_eps_mach
        self.min_eps_mach = min_eps_mach
        self.prefix = prefix
        self.name = f"{metric}{'>' if above else '<'}{threshold:g}"

    def update(self, values: Mapping[str, float]) -> AlarmResult:
        eps = values.get(f"{self.prefix}/eps_mach")
        if (self.only_eps_mach is not None and eps != self.only_eps_mach) or (
            self.min_eps_mach is not None and (eps is None or not eps >= self.min_eps_mach)
        ):
            return AlarmResult(False, self.name, threshold=self.threshold, available=False)
        blocks = block_values(values, self.metric, self.prefix)
        i: int | None
        if blocks:
            i, v = _extreme(blocks, self.above)
        else:
            tag = f"{self.prefix}/{self.metric}"
            if tag not in values or math.isnan(float(values[tag])):
                return AlarmResult(False, self.name, threshold=self.threshold, available=False)
            v = float(values[tag])
            named = block_values(values, self.block_metric, self.prefix) if self.block_metric else {}
            i = _extreme(named, True)[0] if named else None
        fired = v > self.threshold if self.above else v < self.threshold
        return AlarmResult(fired, self.name, i, v, self.threshold)


class RollingZ(AlarmRule):
    """Rolling z-score of a model-level signal against its previous ``window`` checks (SPEC §7).

    ``RollingZ("kappa_softmax_max", block_metric="kappa_softmax")`` is the paper's
    early warning (window 20, z > 1.5, raw scale); ``log=True`` scores ``log10`` of the
    signal instead (growth by a factor, not by an amount). Silent until the window is
    full, like the monitor's alarm. With per-block tags only, the max over blocks is scored.

    Args:
        metric: model-level metric name (or per-block name, reduced by max).
        window: previous checks forming the reference.
        threshold: z-score above which it fires.
        log: score ``log10(value)`` (non-positive values are skipped).
        block_metric: per-block metric whose largest value names the block.
        prefix: tag prefix.
    """

    def __init__(
        self,
        metric: str,
        window: int = 20,
        threshold: float = 1.5,
        log: bool = False,
        block_metric: str | None = None,
        prefix: str = "stability",
    ) -> None:
        self.metric = metric
        self.threshold = float(threshold)
        self.log = log
        self.block_metric = block_metric or metric
        self.prefix = prefix
        self._z = RollingZScore(window)
        scale = "log10 " if log else ""
        self.name = f"z({scale}{metric})>{threshold:g}"

    @property
    def window(self) -> int:
        """Checks of history needed before the rule can fire."""
        return self._z.window

    @property
    def seen(self) -> int:
        """Checks of history held (capped at the window)."""
        return len(self._z)

    def _value(self, values: Mapping[str, float]) -> float | None:
        tag = f"{self.prefix}/{self.metric}"
        if tag in values:
            return float(values[tag])
        blocks = block_values(values, self.metric, self.prefix)
        return max(blocks.values()) if blocks else None

    def update(self, values: Mapping[str, float]) -> AlarmResult:
        v = self._value(values)
        if v is None or math.isnan(v):
            return AlarmResult(False, self.name, threshold=self.threshold, available=False)
        if self.log:
            if v <= 0:
                return AlarmResult(False, self.name, threshold=self.threshold)
            v = math.log10(v)
        warm = len(self._z) >= self._z.window
        z = self._z.update(v)
        named = block_values(values, self.block_metric, self.prefix)
        block = _extreme(named, True)[0] if named else None
        fired = bool(warm and z is not None and z > self.threshold)
        return AlarmResult(fired, self.name, block, z, self.threshold)

    def reset(self) -> None:
        self._z.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"z": self._z.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._z.load_state_dict(state.get("z", {}))


class LocalErrorFloor(AlarmRule):
    """A block's own error ``r_local`` above ``factor`` times the low precision's ε_mach.

    One rounding of a well-conditioned block costs O(ε_mach) (BF16 ≈ 3.9e-3, FP16 ≈ 4.9e-4);
    ``factor`` is how many roundings' worth of amplification count as fragile.

    Args:
        factor: multiple of ``eps_mach`` (``stability/eps_mach``).
        metric: the per-block local error (``r_local``).
        prefix: tag prefix.
    """

    def __init__(self, factor: float = 10.0, metric: str = "r_local", prefix: str = "stability") -> None:
        self.factor = float(factor)
        self.metric = metric
        self.prefix = prefix
        self.name = f"{metric}>{factor:g}*eps_mach"

    def update(self, values: Mapping[str, float]) -> AlarmResult:
        blocks = block_values(values, self.metric, self.prefix)
        eps = values.get(f"{self.prefix}/eps_mach")
        if not blocks or eps is None or not math.isfinite(float(eps)):
            return AlarmResult(False, self.name, available=False)
        i, v = _extreme(blocks, True)
        limit = self.factor * float(eps)
        return AlarmResult(v > limit, self.name, i, v, limit)


class Persistent(AlarmRule):
    """Fires only when ``rule`` fired on ``checks`` consecutive checks (filters one-off blips)."""

    def __init__(self, rule: AlarmRule, checks: int = 2) -> None:
        if checks < 1:
            raise ValueError(f"`checks` must be >= 1, got {checks}")
        self.rule = rule
        self.checks = checks
        self.name = f"{rule.name} x{checks}"
        self._run = 0

    def update(self, values: Mapping[str, float]) -> AlarmResult:
        r = self.rule.update(values)
        self._run = self._run + 1 if r.fired else 0
        return AlarmResult(self._run >= self.checks, self.name, r.block, r.value, r.threshold, r.available)

    def reset(self) -> None:
        self._run = 0
        self.rule.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"run": self._run, "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run = int(state.get("run", 0))
        self.rule.load_state_dict(state.get("rule", {}))


class AnyOf(AlarmRule):
    """Fires when any of ``rules`` fires; the reason is the first (in order) that fired.

    Every rule is updated at every check (so their memories stay in step).
    """

    def __init__(self, rules: Sequence[AlarmRule], name: str | None = None) -> None:
        if not rules:
            raise ValueError("`rules` must not be empty")
        self.rules = list(rules)
        self.name = name or " | ".join(r.name for r in self.rules)

    def update(self, values: Mapping[str, float]) -> AlarmResult:
        results = [r.update(values) for r in self.rules]
        for r in results:
            if r.fired:
                return r
        available = any(r.available for r in results)
        return AlarmResult(False, self.name, available=available)

    def reset(self) -> None:
        for r in self.rules:
            r.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"rules": [r.state_dict() for r in self.rules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for r, s in zip(self.rules, state.get("rules", []), strict=False):
            r.load_state_dict(s)


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


#: FP16's ε_mach (``torch.finfo(torch.float16).eps``): the headroom rule applies to FP16 passes only.
FP16_EPS_MACH = 2.0**-10


def default_alarm(
    attn_logit_max: float = 100.0,
    fp16_headroom_bits: float = 2.0,
    rho_ln: float = 1.0,
) -> AnyOf:
    """The default early warning chosen by ``examples/scenarios/evaluate.py`` ("Does it warn?" in the README).

    Any of three absolute levels, each naming its block: the max attention logit above
    ``attn_logit_max`` (Megatron's QK-clip τ = 100), fewer than ``fp16_headroom_bits`` bits
    before FP16 overflows (FP16 passes only), or a normalization layer ε-dominated
    (``rho_ln`` below the level, SPEC §2; FP16/BF16 passes only: against FP32's rounding
    nearly every norm is "ε-dominated", harmlessly). A threshold of ``inf`` (or ``-inf`` for the
    "below" levels) turns that part off.

    Args:
        attn_logit_max: fire when any block's max |attention logit| exceeds this.
        fp16_headroom_bits: fire when ``log2(65504 / max|activation|)`` drops below this.
        rho_ln: fire when any block's min ``rho_ln`` drops below this.

    Example:
        >>> alarm = default_alarm()
        >>> step = {"stability/block0/attn_logit_max": 12.0, "stability/block1/attn_logit_max": 180.0}
        >>> alarm.update(step).reason
        'attn_logit_max>100 in block 1 (value 180)'
    """
    return AnyOf(
        [
            Level("attn_logit_max", attn_logit_max),
            Level(
                "fp16_headroom",
                fp16_headroom_bits,
                above=False,
                block_metric="amax",
                only_eps_mach=FP16_EPS_MACH,
            ),
            Level("rho_ln", rho_ln, above=False, min_eps_mach=FP16_EPS_MACH),
        ],
        name="default",
    )

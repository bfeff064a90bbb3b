"""What a rule reads: one sampled step's values, parsed from its logged tags, and one rule's reading of it.

The monitor builds :class:`Evidence` from ``report.metrics()`` at a sampled step; the report
rebuilds it from the same tags read back from the logs. Both hand it to the same rules, so a
step is judged the same online and offline.

Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lightning_stability.metrics import BY_NAME, parse_tag
from lightning_stability.rules.table import Rule
from lightning_stability.rules.thresholds import FP8_EPS_MACH, FP16_EPS_MACH, LOW_PRECISION_EPS_MACH

__all__ = ["Evidence", "Reading", "applies", "median_of_other_layers", "median_of_others", "read"]


@dataclass
class Evidence:
    """One sampled step: model-level, per-block and per-layer values by metric name.

    Attributes:
        step: the logged step.
        model: metric name → model-level value (``stability/<name>``).
        blocks: metric name → ``{block index: value}`` (``stability/block{i}/<name>``); per-head
            tags are left out.
        layers: metric name → ``{layer module name: value}`` (``stability/layer/<module>/<name>``).
        operands: metric name → ``{(layer, operand): value}``
            (``stability/layer/<module>/<operand>/<name>``).
        names: block index → qualified module name (known online; the logs hold indices only).
        amax_module: the module holding the largest output (online only).
        first_nonfinite: the first module whose low-precision output went non-finite (online only).
    """

    step: int
    model: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, dict[int, float]] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    operands: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    amax_module: str | None = None
    first_nonfinite: str | None = None

    @classmethod
    def from_tags(
        cls,
        values: Mapping[str, float],
        step: int,
        names: Sequence[str] = (),
        prefix: str = "stability",
    ) -> Evidence:
        """Parse ``{tag: value}`` (:func:`lightning_stability.metrics.parse_tag`); other keys are ignored.

        Example:
            >>> ev = Evidence.from_tags({"stability/block1/rho_ln": 0.5, "stability/eps_mach": 2**-7}, 4)
            >>> ev.blocks, ev.eps_mach
            ({'rho_ln': {1: 0.5}}, 0.0078125)
        """
        ev = cls(step, names=dict(enumerate(names)))
        for key, value in values.items():
            tag = parse_tag(key, prefix)
            if tag is None or tag.head is not None:
                continue
            if tag.layer is not None and tag.operand is not None:
                ev.operands.setdefault(tag.metric.name, {})[(tag.layer, tag.operand)] = float(value)
            elif tag.layer is not None:
                ev.layers.setdefault(tag.metric.name, {})[tag.layer] = float(value)
            elif tag.block is None:
                ev.model[tag.metric.name] = float(value)
            else:
                ev.blocks.setdefault(tag.metric.name, {})[tag.block] = float(value)
        for per_block in ev.blocks.values():
            per_block_sorted = dict(sorted(per_block.items()))
            per_block.clear()
            per_block.update(per_block_sorted)
        return ev

    @property
    def eps_mach(self) -> float | None:
        """The pass's ε_mach (``stability/eps_mach``), ``None`` when not logged."""
        return self.model.get("eps_mach")

    def finite(self, name: str) -> dict[int, float]:
        """``{block: value}`` of ``name`` over the blocks where it is finite, by block index."""
        return {i: v for i, v in self.blocks.get(name, {}).items() if math.isfinite(v)}

    def finite_layers(self, name: str) -> dict[str, float]:
        """``{layer: value}`` of the per-layer metric ``name`` over the layers where it is finite."""
        return {k: v for k, v in self.layers.get(name, {}).items() if math.isfinite(v)}

    def name_of(self, block: int | None) -> str | None:
        """The module name of ``block`` when known."""
        return None if block is None else self.names.get(block)


@dataclass(frozen=True)
class Reading:
    """One rule's reading of one step: the judged value and the block it names.

    Attributes:
        value: the value compared with the rule's levels (``/ ε_mach`` for ``per_eps_mach`` rules, the
            z-score for rolling z-score rules).
        block: the block named (the most extreme one), ``None`` for a model-level value nobody names.
        signal: the metric read (the rule's fallback when its own signal was not measured).
        raw: the metric's own value.
        applicable: whether the rule judges this pass (:func:`applies`); a reading it does not judge
            is still a measured fact (FP16 headroom of a BF16 pass), but reaches no level.
        layer: for a per-layer signal, the layer named (the most extreme one).
    """

    value: float
    block: int | None
    signal: str
    raw: float
    applicable: bool = True
    layer: str | None = None


def applies(rule: Rule, eps_mach: float | None) -> bool:
    """Whether ``rule`` judges a pass with this ε_mach (``None``: not logged, only ``"any"`` rules)."""
    if rule.applies == "any":
        return True
    if eps_mach is None:
        return False
    if rule.applies == "fp16":
        return eps_mach == FP16_EPS_MACH
    if rule.applies == "not_fp16":
        return eps_mach != FP16_EPS_MACH
    if rule.applies == "fp8":
        return eps_mach == FP8_EPS_MACH
    return eps_mach >= LOW_PRECISION_EPS_MACH


def _extreme(values: Mapping[int, float], largest: bool) -> tuple[int, float]:
    """The block with the largest (or smallest) value; the lowest index on ties."""
    pick = max if largest else min
    block = pick(values, key=lambda k: values[k])
    return block, values[block]


def _per_eps(rule: Rule, ev: Evidence, raw: float) -> float | None:
    """``raw`` in the units ``rule`` judges (``/ ε_mach`` for ``per_eps_mach`` rules); ``None``: no ε_mach."""
    if not rule.per_eps_mach:
        return raw
    eps = ev.eps_mach
    if eps is None or not math.isfinite(eps) or eps <= 0:
        return None
    return raw / eps


def _read_layers(rule: Rule, ev: Evidence) -> Reading | None:
    """A per-layer signal: the most extreme layer's value (the first in logged order on ties)."""
    layers = ev.finite_layers(rule.signal)
    if not layers:
        return None
    pick = max if rule.direction == "above" else min
    layer = pick(layers, key=lambda k: layers[k])
    value = _per_eps(rule, ev, layers[layer])
    if value is None:
        return None
    return Reading(value, None, rule.signal, layers[layer], applies(rule, ev.eps_mach), layer)


def _named_block(rule: Rule, ev: Evidence) -> int | None:
    if rule.names_block is None:
        return None
    if rule.first_nonfinite:
        bad = [i for i, v in ev.blocks.get(rule.names_block, {}).items() if not math.isfinite(v)]
        return min(bad) if bad else None
    named = ev.finite(rule.names_block)
    return _extreme(named, True)[0] if named else None


def read(rule: Rule, ev: Evidence) -> Reading | None:
    """The value ``rule`` reads at this step, or ``None`` when its signal is not there.

    Per-block values (finite ones) when the step has them: the most extreme block; otherwise the
    model-level value (``inf`` counts, NaN does not), its block named by ``rule.names_block``.
    ``None``: its signal (and fallback) was not measured, or a ``per_eps_mach`` rule has no
    ε_mach. A rule that does not judge this precision still reads it, ``applicable=False``.
    Rolling z-score rules are read by :class:`lightning_stability.rules.alarm.Alarm`, which keeps
    their history.
    """
    row = BY_NAME.get(rule.signal)
    if row is not None and row.level == "layer":
        return _read_layers(rule, ev)
    signal = rule.signal
    if rule.fallback and signal not in ev.blocks and signal not in ev.model:
        signal = rule.fallback
    blocks = ev.finite(signal)
    block: int | None
    if blocks:
        block, raw = _extreme(blocks, rule.direction == "above")
    else:
        raw = ev.model.get(signal, math.nan)
        if math.isnan(raw):
            return None
        block = _named_block(rule, ev)
    value = _per_eps(rule, ev, raw)
    if value is None:
        return None
    return Reading(value, block, signal, raw, applies(rule, ev.eps_mach))


def median_of_others(ev: Evidence, signal: str, block: int) -> float | None:
    """The median (the upper one for an even count) of ``signal`` over the other blocks' finite values."""
    others = sorted(v for i, v in ev.finite(signal).items() if i != block)
    return others[len(others) // 2] if others else None


def median_of_other_layers(ev: Evidence, signal: str, layer: str) -> float | None:
    """The median (the upper one for an even count) of a per-layer ``signal`` over the other layers."""
    others = sorted(v for name, v in ev.finite_layers(signal).items() if name != layer)
    return others[len(others) // 2] if others else None

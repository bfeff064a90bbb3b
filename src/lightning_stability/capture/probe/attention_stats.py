"""Per-head attention metrics: each one's diagnostic, reduced as its row of the metric table says.

:data:`PER_CALL` holds the diagnostic of every ``head``-level metric: a function of one recorded
attention call giving its ``(B, H)`` values. :func:`call_values` reduces them over heads and
examples (:attr:`~lightning_stability.metrics.Metric.heads`, ``examples``; the probe's
``head_reduction``/``batch_reduction`` options where the row names them), and
:func:`block_statistics` over a block's calls (``calls``) into :class:`RawKey` records. With
``batch_reduction="mean"`` a row whose examples follow that option keeps per-call sums and
counts instead, so that the mean over every rank's examples is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_stability import diagnostics as D
from lightning_stability.capture.attention import AttentionCall, call_probabilities
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.diagnostics.attention import AttentionDiagnostics
from lightning_stability.metrics import BY_NAME, ExampleReduction, HeadReduction, Metric, RawKey

if TYPE_CHECKING:
    from lightning_stability.capture.probe.stability_probe import StabilityProbe

Reduce = Literal["max", "sum", "mean"]
#: ``(B, H)`` values of one attention call for a ``head``-level metric (``None``: not measured
#: with this probe's options).
Source = Callable[[AttentionCall, AttentionDiagnostics, "StabilityProbe"], Tensor | None]


def _theta(call: AttentionCall, diag: AttentionDiagnostics, probe: StabilityProbe) -> Tensor | None:
    """θ(p), mean over the query rows of each head (``balanced_mass=True`` only: costly)."""
    if not probe.balanced_mass:
        return None
    return D.balanced_mass_per_head(call_probabilities(call), call.keep, "mean")


#: The diagnostic of each per-head metric of the table, by name, in the order they are kept.
PER_CALL: dict[str, Source] = {
    "kappa_score": lambda call, diag, probe: diag.kappa_score,  # NaN (unknown) for scores-only calls
    "kappa_softmax": lambda call, diag, probe: diag.kappa_softmax,
    "kappa_v": lambda call, diag, probe: diag.kappa_v,
    "attn_logit_max": lambda call, diag, probe: diag.logit_max,
    "attention_entropy": lambda call, diag, probe: diag.entropy,
    "theta": _theta,
}


@dataclass
class CallValues:
    """One attention call's per-head metrics, reduced over its heads and examples.

    Attributes:
        examples: its number of examples (0-d).
        value: per metric, the call's block value (0-d).
        per_head: per metric, the value of each head, reduced over the examples (``(H,)``).
        sums: per metric whose mean over examples is made exact across ranks, the sum over the
            examples of the head-reduced value (0-d), replacing ``value``.
        head_sums: for those metrics, each head's sum over the examples (``(H,)``).
    """

    examples: Tensor
    value: dict[str, Tensor] = field(default_factory=dict)
    per_head: dict[str, Tensor] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)
    head_sums: dict[str, Tensor] = field(default_factory=dict)


def _reduce(x: Tensor, how: Reduce, dim: int) -> Tensor:
    if how == "max":
        return x.amax(dim)
    if how == "sum":
        return x.sum(dim)
    return x.mean(dim)


def _over_heads(row: Metric, probe: StabilityProbe) -> Reduce:
    how: HeadReduction | None = row.heads
    return probe.head_reduction if how == "head_reduction" else "mean" if how == "mean" else "max"


def _over_examples(row: Metric, probe: StabilityProbe) -> Reduce:
    how: ExampleReduction | None = row.examples
    return probe.batch_reduction if how == "batch_reduction" else "mean" if how == "mean" else "max"


def exact_mean(row: Metric, probe: StabilityProbe) -> bool:
    """Whether the row's mean over examples is rebuilt exactly across ranks from sums and counts."""
    return row.examples == "batch_reduction" and probe.batch_reduction == "mean"


def call_values(call: AttentionCall, diag: AttentionDiagnostics, probe: StabilityProbe) -> CallValues:
    """Every per-head metric of one call (:data:`PER_CALL`), reduced as its row says."""
    out = CallValues(torch.tensor(float(call.v.shape[0]), device=call.v.device))
    for name, source in PER_CALL.items():
        values = source(call, diag, probe)  # (B, H)
        if values is None:
            continue
        row = BY_NAME[name]
        heads, examples = _over_heads(row, probe), _over_examples(row, probe)
        if heads == examples == "mean":  # the mean over every (example, head) pair
            out.value[name], out.per_head[name] = values.mean(), values.mean(0)
            continue
        out.value[name] = _reduce(_reduce(values, heads, 1), examples, 0)
        out.per_head[name] = _reduce(values, examples, 0)
        if exact_mean(row, probe):
            out.sums[name] = _reduce(values, heads, 1).sum()
            out.head_sums[name] = values.sum(0)
    return out


def block_statistics(raw: RawMeasurement, block: int, calls: Sequence[CallValues], per_head: bool) -> None:
    """A block's per-head metrics over its attention calls (each row's ``calls`` reduction) into
    ``raw``; with ``per_head``, each head's value too (calls with different head counts: the
    first call's heads)."""
    first = calls[0]
    if first.sums:
        _exact_mean_parts(raw, block, calls, per_head)
    for name in first.value:
        if name in first.sums:
            continue
        stacked = torch.stack([c.value[name] for c in calls])
        low = BY_NAME[name].calls == "min"  # low is the event (entropy, θ): min over calls
        raw.put(RawKey(name, block), stacked.amin() if low else _nanmax(stacked))
        if not per_head:
            continue
        heads = [c.per_head[name] for c in calls]
        if len({t.shape for t in heads}) != 1:
            heads = heads[:1]
        by_head = torch.stack(heads).amin(0) if low else torch.stack(heads).amax(0)
        for h in range(by_head.shape[0]):
            raw.put(RawKey(name, block, head=h), by_head[h])


def _exact_mean_parts(raw: RawMeasurement, block: int, calls: Sequence[CallValues], per_head: bool) -> None:
    """Per call, sums over the examples and their count (summed across ranks, so that
    ``compose_report`` forms the exact mean over every rank's examples)."""
    for c, call in enumerate(calls):
        raw.put(RawKey("example_count", block, call=c), call.examples)
        for name, total in call.sums.items():
            raw.put(RawKey("example_sum", block, call=c, metric=name), total)
            if per_head:
                for h, value in enumerate(call.head_sums[name]):
                    raw.put(RawKey("example_sum", block, head=h, call=c, metric=name), value)


def _nanmax(t: Tensor) -> Tensor:
    """Max over the known values (NaN = unknown, e.g. κ_score of a scores-only call); NaN if none is."""
    top = t.nan_to_num(nan=-math.inf).amax()
    return torch.where(top == -math.inf, torch.full_like(top, math.nan), top)

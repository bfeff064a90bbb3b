"""The types of the metric table's rows: a metric, its reductions and derivation, a raw statistic.

The rows themselves are in :mod:`lightning_stability.metrics` (:data:`~lightning_stability.metrics.METRICS`,
:data:`~lightning_stability.metrics.RAW_STATS`). Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "LAYER_LEVELS",
    "BlockRollup",
    "CallReduction",
    "Derivation",
    "DerivationKind",
    "ExampleReduction",
    "HeadReduction",
    "Level",
    "Metric",
    "RankOp",
    "RawStat",
]

Level = Literal["model", "block", "head", "layer", "operand"]
#: The levels whose tags name a layer by its module (``stability/layer/<module>/…``).
LAYER_LEVELS: tuple[Level, ...] = ("layer", "operand")
#: How a raw statistic is combined across ranks under DDP.
RankOp = Literal["max", "min", "sum"]
#: How a metric's per-head values combine into its block value: a fixed reduction, or the
#: probe's ``head_reduction`` option (``"max"``/``"sum"``).
HeadReduction = Literal["max", "mean", "head_reduction"]
#: How the sampled examples combine: a fixed reduction, the probe's ``batch_reduction`` option
#: (``"max"``/``"mean"``; ``"mean"`` is made exact across ranks from per-call sums and counts),
#: or pooled before the value is formed (sums of squares over every example: ``"pooled"``;
#: every token of every example: ``"pooled tokens"``).
ExampleReduction = Literal["max", "mean", "batch_reduction", "pooled", "pooled tokens"]
#: How the values of a block's attention calls combine (a block may call attention more than once).
CallReduction = Literal["max", "min"]
#: How blocks combine into the model-level value ``stability/<name>``.
BlockRollup = Literal["max", "last"]
#: How a derived metric is formed from its raw parts: ``sqrt(Σ a / Σ b)`` of two summed parts
#: (``"rms ratio"``), ``Σ a / Σ b`` (``"mean"``), or by its own formula in ``compose_report``.
DerivationKind = Literal["rms ratio", "mean", "formula"]


@dataclass(frozen=True)
class Derivation:
    """How a metric that is not a measured raw value is obtained.

    Attributes:
        note: what it is derived from, as the docs' "across ranks" cell says it.
        kind: ``"rms ratio"`` and ``"mean"`` are formed generically from ``parts``;
            ``"formula"`` by the metric's own lines in ``compose_report``.
        parts: the raw statistics (:data:`RAW_STATS` names) it is formed from, kept per
            block as :class:`RawKey` records whose ``metric`` is this row.
    """

    note: str
    kind: DerivationKind = "formula"
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Metric:
    """One row of the table.

    Attributes:
        name: the fixed name (``stability/<name>`` or ``stability/block{i}/<name>``).
        level: ``"model"``; ``"block"``; ``"head"`` (a block value also logged per head with
            ``log_per_head``, as ``stability/block{i}/head{h}/<name>``); ``"layer"`` (one linear
            layer, ``stability/layer/<module name>/<name>``); ``"operand"`` (one quantized
            operand of a layer's FP8 GEMM, ``stability/layer/<module name>/<operand>/<name>``,
            operands ``input``/``weight``, or ``q``/``k``/``p``/``v`` of attention in FP8).
        doc: one line: what it is.
        heads: how per-head values combine into the block value (``None``: not per head).
        examples: how the sampled examples combine (``None``: not per example).
        calls: how the values of a block's attention calls combine (per-call metrics only).
        blocks: for a block value also logged at model level (``stability/<name>``), how
            blocks combine into it; ``None``: not rolled up.
        ranks: how ranks combine the raw value when the metric is measured directly (its raw
            key is the metric itself); ``None`` for a derived value (see ``derived``) or one
            that is not measured at all (``eps_mach``, ``alarm``).
        derived: how a value that is not measured directly is formed.
        log_scale: its values span decades (condition numbers, errors): TensorBoard's dashboard
            plots its log10.
        unit: what a linear value counts (``"nats"``, ``"bits"``, ``"0/1"``…), shown in chart titles.
        attr: the report field holding the logged value when it differs from ``name``.
    """

    name: str
    level: Level
    doc: str
    heads: HeadReduction | None = None
    examples: ExampleReduction | None = None
    blocks: BlockRollup | None = None
    ranks: RankOp | None = "max"
    derived: Derivation | None = None
    calls: CallReduction | None = None
    log_scale: bool = False
    attr: str | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        if self.derived is not None and self.ranks is not None:
            raise ValueError(f"metric {self.name!r}: a derived value has no cross-rank reduction of its own")
        if self.level in LAYER_LEVELS and (self.heads or self.calls or self.blocks):
            raise ValueError(f"metric {self.name!r}: a per-layer value has no head, call or block reduction")

    @property
    def measured(self) -> bool:
        """Whether the reduced raw value *is* the metric (else it is derived in ``compose_report``)."""
        return self.ranks is not None



@dataclass(frozen=True)
class RawStat:
    """An internal raw statistic (not logged): a part a derived metric is formed from.

    Attributes:
        name: its name (``RawKey.name``).
        ranks: how ranks combine it.
        doc: what it is.
    """

    name: str
    ranks: RankOp
    doc: str

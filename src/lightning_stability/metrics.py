"""The one table of metrics: every logged value, declared once.

Each :class:`Metric` row names a value, its level (``model``, ``block``, ``head`` — a block
value that also exists per attention head —, ``layer`` — one linear layer, named by its module —
or ``operand`` — one quantized operand of a layer's FP8 GEMM), how it is reduced over heads, over the sampled
examples, over a block's attention calls, over blocks (its model-level roll-up) and across
ranks — typed fields the measurement reads — or, when it is not a measured value, how it is
derived (:class:`Derivation`), and one line of doc. The table drives the probe's reductions of
per-call attention values, the raw statistics (:class:`RawKey` records) and their cross-rank
reduction, the :class:`~lightning_stability.stability_report.BlockReport` /
:class:`~lightning_stability.stability_report.StabilityReport` fields and their logged tags
(:func:`tag`, read back by :func:`parse_tag`), the TensorBoard custom-scalars layout, and the
metric tables of docs/metrics.md and docs/DESIGN.md (``python -m lightning_stability.metrics`` prints
the table; a test compares).

Plain Python: importable by every layer, no torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_stability.metric_types import (
    LAYER_LEVELS as LAYER_LEVELS,
)
from lightning_stability.metric_types import (
    BlockRollup as BlockRollup,
)
from lightning_stability.metric_types import (
    CallReduction as CallReduction,
)
from lightning_stability.metric_types import (
    Derivation as Derivation,
)
from lightning_stability.metric_types import (
    DerivationKind as DerivationKind,
)
from lightning_stability.metric_types import (
    ExampleReduction as ExampleReduction,
)
from lightning_stability.metric_types import (
    HeadReduction as HeadReduction,
)
from lightning_stability.metric_types import (
    Level as Level,
)
from lightning_stability.metric_types import (
    Metric as Metric,
)
from lightning_stability.metric_types import (
    RankOp as RankOp,
)
from lightning_stability.metric_types import (
    RawStat as RawStat,
)

_ERR = "exact: Σ‖X̃−X‖², Σ‖X‖² summed over ranks"
#: The error ratios: ``sqrt(Σ‖X̃−X‖² / Σ‖X‖²)`` of parts summed over examples and ranks.
_ERROR_RATIO = Derivation(_ERR, "rms ratio", ("err_sq", "ref_sq"))
#: The means over tokens of per-token relative errors: ``Σ ratios / Σ tokens`` over examples and ranks.
_TOKEN_MEAN = Derivation("exact: token sums and counts", "mean", ("token_sum", "token_count"))

#: Every logged metric, in the order of the docs tables.
METRICS: tuple[Metric, ...] = (
    # ---- attention, per head (values of each attention call, reduced over its heads and examples)
    Metric(
        "kappa_score",
        "head",
        "‖Q‖‖K‖/‖QKᵀ‖ over attended entries (SPEC §1)",
        heads="max",
        examples="batch_reduction",
        calls="max",
        log_scale=True,
    ),
    Metric(
        "kappa_softmax",
        "head",
        "max over rows of ‖J(P_i)‖₂‖S_i‖/‖P_i‖, exact (secular equation) (SPEC §1)",
        heads="head_reduction",
        examples="batch_reduction",
        calls="max",
        log_scale=True,
    ),
    Metric(
        "kappa_v",
        "head",
        "σmax(V)/(σmin(V)+1e-6) (SPEC §1)",
        heads="max",
        examples="batch_reduction",
        calls="max",
        log_scale=True,
    ),
    Metric(
        "attention_entropy",
        "head",
        "mean attention-row entropy in nats (collapse is low)",
        heads="mean",
        examples="mean",
        calls="min",
        ranks="min",
        unit="nats",
    ),
    Metric(
        "attn_logit_max",
        "head",
        "max of |S| over query rows and attended keys, S the logits the softmax sees"
        " (scale·q·kᵀ + bias, soft-capped c·tanh(·/c) where the model caps), exact pass",
        heads="max",
        examples="max",
        calls="max",
        blocks="max",
        log_scale=True,
    ),
    # ---- weights and normalization, per block
    Metric(
        "wo_norm",
        "block",
        "‖W_O‖₂ of the attention output projection (σ certified within 1e-5 relative;"
        " ProbeOptions(weight_spectra='exact'): float64)",
        unit="spectral norm",
    ),
    Metric(
        "kappa_eff",
        "block",
        "Σ κ(W) over the block's FFN linear maps, gated MLPs: all three (SPEC §3); "
        "MoE: + max over experts of the expert's Σ κ(W); each κ certified within 2e-5 relative",
        log_scale=True,
    ),
    Metric("kappa_wkwq", "block", "max over heads of κ(W_Kᵀ W_Q) (SPEC §8)", log_scale=True),
    Metric(
        "c_ln",
        "block",
        "Σ C_LN = C1·σ/√ε + C2·σ²/ε + C3 over the block's normalization layers (SPEC §2)",
        ranks=None,
        derived=Derivation("from min σ²", parts=("variance",)),
        log_scale=True,
    ),
    Metric(
        "rho_ln",
        "block",
        "min ρ_LN = σ²·d·ε_mach/ε over the block's normalization layers (< 1: ε-dominated) (SPEC §2)",
        ranks=None,
        derived=Derivation("from min σ²", parts=("variance",)),
        log_scale=True,
    ),
    Metric(
        "predictor",
        "block",
        "combined predictor κ_softmax(1+κ_score)κ_V‖W_O‖₂ + κ_eff + C_LN (SPEC §4); "
        "no W_O found: the attention term is left out (warned), not taken with ‖W_O‖₂ = 1",
        blocks="max",
        ranks=None,
        derived=Derivation("from its terms"),
        log_scale=True,
    ),
    # ---- forward mismatch, per block
    Metric(
        "r_block",
        "block",
        "‖X̃−X‖/‖X‖ at the block output (propagated error)",
        examples="pooled",
        blocks="last",
        ranks=None,
        derived=_ERROR_RATIO,
        log_scale=True,
    ),
    Metric(
        "r_block_median",
        "block",
        "median over tokens of the per-token relative error at the block output (DDP: max of rank medians)",
        examples="pooled tokens",
        blocks="last",
        log_scale=True,
    ),
    Metric(
        "r_block_mean_token",
        "block",
        "mean over tokens of the per-token relative error at the block output",
        examples="pooled tokens",
        blocks="last",
        ranks=None,
        derived=_TOKEN_MEAN,
        log_scale=True,
    ),
    Metric(
        "r_local",
        "block",
        "the block's own error: run in low precision on its exact FP32 input, vs its FP32 output",
        examples="pooled",
        ranks=None,
        derived=_ERROR_RATIO,
        log_scale=True,
    ),
    Metric(
        "r_attention_local",
        "block",
        "error at the attention sub-layer's output in the block's teacher-forced re-run "
        "(its exact input when the ops before it are FP32, e.g. norms under autocast)",
        examples="pooled",
        ranks=None,
        derived=_ERROR_RATIO,
        log_scale=True,
    ),
    Metric(
        "r_ffn_local",
        "block",
        "the FFN sub-layer (mlp/ffn/feed_forward…, where found) in low precision on its exact FP32 input",
        examples="pooled",
        ranks=None,
        derived=_ERROR_RATIO,
        log_scale=True,
    ),
    Metric(
        "theta",
        "head",
        "balanced-mass factor θ(p) = 4m(1−m), mean over query rows (Emadi 2026; balanced_mass=True)",
        heads="mean",
        examples="mean",
        calls="min",
        ranks="min",
    ),
    Metric(
        "rank_collapse",
        "block",
        "‖X − 1x̄ᵀ‖_F/‖X‖_F of the block's exact output, mean over examples (→ 0: rank collapse)",
        examples="mean",
        ranks="min",
        log_scale=True,
    ),
    Metric(
        "token_similarity",
        "block",
        "mean pairwise cosine similarity of the block's exact output tokens (→ 1: rank collapse)",
        examples="mean",
    ),
    Metric(
        "residual_gain",
        "block",
        "‖J_f‖₂ of the residual branch (residual_gain_iters > 0)",
        unit="spectral norm",
    ),
    Metric(
        "amax",
        "block",
        "max |output| over every module inside the block, exact pass",
        examples="max",
        log_scale=True,
    ),
    # ---- model level
    Metric(
        "predictor_scaled",
        "model",
        "predictor · ε_mach (compare with r_block)",
        ranks=None,
        derived=Derivation("from predictor"),
        log_scale=True,
    ),
    Metric(
        "kappa_softmax_max",
        "model",
        "max κ_softmax over rows, heads, examples and every attention call",
        heads="max",
        examples="max",
        calls="max",
        log_scale=True,
    ),
    Metric(
        "bound",
        "model",
        "unified bound, first-order (1+ρ) form (needs residual gains)",
        ranks=None,
        derived=Derivation("from blocks", parts=("kappa_wo",)),
        log_scale=True,
    ),
    Metric(
        "bound_rigorous",
        "model",
        "unified bound, (1+ρ)/(1−ρ) form; inf when small gain fails",
        ranks=None,
        derived=Derivation("from blocks", parts=("kappa_wo",)),
        log_scale=True,
    ),
    Metric(
        "nonfinite",
        "model",
        "non-finite elements in the low-precision block outputs",
        ranks=None,
        derived=Derivation("from blocks", parts=("nonfinite",)),
        unit="count",
    ),
    Metric(
        "eps_mach",
        "model",
        "ε_mach used (2⁻⁷ bf16, 2⁻¹⁰ fp16, 2⁻²³ fp32, or the eps_mach override)",
        ranks=None,
        log_scale=True,
    ),
    Metric(
        "worst_block",
        "model",
        "index of the block with the largest r_local (report: its name)",
        ranks=None,
        derived=Derivation("from r_local"),
        attr="worst_block_index",
        unit="index",
    ),
    Metric(
        "fp16_headroom",
        "model",
        "log2(65504 / max |output| over every module): bits before FP16 overflows",
        ranks=None,
        derived=Derivation("from module maxima", parts=("amax",)),
        unit="bits",
    ),
    Metric(
        "alarm",
        "model",
        "1 at a step where the early warning (alarm_rule) fired, else 0; which rule and block: alarm_reason",
        ranks=None,
        unit="0/1",
    ),
    # ---- per linear layer, under the FP8 what-if (precision="fp8"; docs/FP8.md)
    Metric(
        "fp8_error",
        "layer",
        "‖ỹ−y‖/‖y‖ of the layer's FP8 output against the layer in FP32 on the same input, whole sample "
        "(a few huge rows dominate it: read fp8_error_token)",
        examples="pooled",
        ranks=None,
        derived=_ERROR_RATIO,
        log_scale=True,
    ),
    Metric(
        "fp8_error_token",
        "layer",
        "mean over output rows (tokens) of the row's relative error in FP8 (the keep_bf16 rule reads it)",
        examples="pooled tokens",
        ranks=None,
        derived=_TOKEN_MEAN,
        log_scale=True,
    ),
    Metric(
        "bf16_error",
        "layer",
        "fp8_error's contrast: the same layer call under BF16 autocast, against FP32",
        examples="pooled",
        ranks=None,
        derived=_ERROR_RATIO,
        log_scale=True,
    ),
    Metric(
        "bf16_error_token",
        "layer",
        "fp8_error_token's contrast: the same layer call under BF16 autocast",
        examples="pooled tokens",
        ranks=None,
        derived=_TOKEN_MEAN,
        log_scale=True,
    ),
    Metric(
        "fp8_underflow",
        "operand",
        "fraction of the operand's non-zero elements that become 0 in FP8",
        examples="pooled",
        ranks=None,
        derived=Derivation("exact: counts summed over ranks", "mean", ("underflow", "nonzero")),
    ),
    Metric(
        "fp8_saturation",
        "operand",
        "fraction of the operand's elements clipped at E4M3's ±448 (TE's overflows)",
        examples="pooled",
        ranks=None,
        derived=Derivation("exact: counts summed over ranks", "mean", ("saturated", "numel")),
    ),
    Metric("fp8_amax", "operand", "max |operand|, the amax scaling reads", examples="max", log_scale=True),
    Metric(
        "fp8_scale_inv_min",
        "operand",
        "smallest dequantization factor 1/scale (per-tensor recipes: the one; MXFP8: over its blocks)",
        examples="pooled",
        ranks="min",
        log_scale=True,
    ),
    Metric(
        "fp8_scale_inv_max",
        "operand",
        "largest dequantization factor 1/scale",
        examples="pooled",
        ranks="max",
        log_scale=True,
    ),
)


#: Internal raw statistics, with their cross-rank reduction.
RAW_STATS: tuple[RawStat, ...] = (
    RawStat("err_sq", "sum", "Σ‖X̃−X‖² of a compared output (r_block, r_local, r_*_local)"),
    RawStat("ref_sq", "sum", "Σ‖X‖² of the FP32 reference output"),
    RawStat("nonfinite", "sum", "non-finite elements of a low-precision block output"),
    RawStat("token_sum", "sum", "Σ over tokens of the per-token relative error"),
    RawStat("token_count", "sum", "number of tokens compared"),
    RawStat("example_sum", "sum", "batch_reduction='mean': Σ over one attention call's examples of a κ"),
    RawStat("example_count", "sum", "batch_reduction='mean': examples of one attention call"),
    RawStat("kappa_wo", "max", "κ(W_O) (a term of the unified bound)"),
    RawStat("underflow", "sum", "FP8: non-zero elements of an operand that became 0"),
    RawStat("nonzero", "sum", "FP8: finite non-zero elements of an operand"),
    RawStat("saturated", "sum", "FP8: elements of an operand clipped at the format's max"),
    RawStat("numel", "sum", "FP8: elements of an operand"),
    RawStat("variance", "min", "median normalization-input variance of one norm layer"),
)
RAW_BY_NAME: dict[str, RawStat] = {r.name: r for r in RAW_STATS}


BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
if len(BY_NAME) != len(METRICS):  # pragma: no cover - a table typo
    raise ValueError("duplicate metric names in METRICS")

#: Names of the ``BlockReport`` fields (block and head metrics), in table order.
BLOCK_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.level in ("block", "head"))
#: Per-head metrics (``BlockReport.per_head`` keys).
HEAD_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.level == "head")
#: Metrics logged as ``stability/<name>``: model-level ones and block roll-ups.
MODEL_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.level == "model" or m.blocks)
#: Names of the ``LayerReport`` fields (per linear layer), in table order.
LAYER_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.level == "layer")
#: Names of the ``OperandReport`` fields (per quantized operand of a layer), in table order.
OPERAND_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.level == "operand")


@dataclass(frozen=True)
class RawKey:
    """The key of one raw statistic the probe keeps (a 0-d value, reduced across ranks).

    ``name`` is a measured metric of :data:`METRICS` (the raw value is the metric) or a part of
    :data:`RAW_STATS`; where it is kept says the rest. Constructing a key with any other name
    raises, so every raw value has a declared cross-rank reduction (:attr:`ranks`).

    Attributes:
        name: the metric or raw statistic.
        block: the block it belongs to (``None``: model level, or a module's statistic).
        head: the attention head (per-head values).
        call: the block's attention call (per-call sums of ``batch_reduction="mean"``).
        metric: the metric a raw statistic is a part of (``err_sq`` of ``r_local``).
        module: the module a per-module statistic belongs to (a norm layer's ``variance``, any
            module's ``amax``, a linear layer's FP8 statistics).
        operand: the quantized operand of that layer's FP8 GEMM (``input``, ``weight``…).

    Example:
        >>> RawKey("err_sq", block=2, metric="r_local").ranks, RawKey("attention_entropy", 0, head=3).ranks
        ('sum', 'min')
    """

    name: str
    block: int | None = None
    head: int | None = None
    call: int | None = None
    metric: str | None = None
    module: str | None = None
    operand: str | None = None

    def __post_init__(self) -> None:
        self.ranks  # noqa: B018 - raises for a statistic declared nowhere

    @property
    def ranks(self) -> RankOp:
        """How ranks combine this statistic: its metric row's, or its raw statistic's."""
        raw = RAW_BY_NAME.get(self.name)
        if raw is not None:
            return raw.ranks
        metric = BY_NAME.get(self.name)
        if metric is None or metric.ranks is None:
            raise KeyError(
                f"raw statistic {self.name!r} has no declared cross-rank reduction "
                "(lightning_stability.metrics)"
            )
        return metric.ranks


#: The path segment that opens a per-layer tag: ``stability/layer/<module>/…``.
LAYER_SEGMENT = "layer"


def tag(
    metric: Metric,
    block: int | None = None,
    head: int | None = None,
    prefix: str = "stability",
    *,
    layer: str | None = None,
    operand: str | None = None,
) -> str:
    """The logged tag of ``metric`` (model level when ``block`` is ``None``).

    Per-layer metrics take the layer's module name (``layer``) and, per operand, the operand.

    Example:
        >>> tag(BY_NAME["fp8_underflow"], layer="h.0.mlp.c_proj", operand="input")
        'stability/layer/h.0.mlp.c_proj/input/fp8_underflow'
    """
    if metric.level in LAYER_LEVELS:
        if layer is None or (metric.level == "operand") != (operand is not None):
            raise ValueError(f"metric {metric.name!r} ({metric.level}) needs its layer (and operand) named")
        if operand is not None and ("/" in operand or not operand):
            raise ValueError(f"an operand name is one non-empty path segment, got {operand!r}")
        middle = layer if operand is None else f"{layer}/{operand}"
        return f"{prefix}/{LAYER_SEGMENT}/{middle}/{metric.name}"
    if block is None:
        return f"{prefix}/{metric.name}"
    if head is None:
        return f"{prefix}/block{block}/{metric.name}"
    return f"{prefix}/block{block}/head{head}/{metric.name}"


@dataclass(frozen=True)
class Tag:
    """A logged tag read back: which metric, at which block and head (``None``: model / block level).

    Attributes:
        metric: the table's row.
        block: block index, ``None`` for a model-level or per-layer tag.
        head: head index, ``None`` unless a per-head tag.
        prefix: the tag's prefix (``"stability"``).
        layer: the module name of a per-layer tag (``None`` otherwise; ``""`` is the root module).
        operand: the operand of a per-operand tag.
    """

    metric: Metric
    block: int | None = None
    head: int | None = None
    prefix: str = "stability"
    layer: str | None = None
    operand: str | None = None


def parse_tag(text: str, prefix: str = "stability") -> Tag | None:
    """The inverse of :func:`tag`: ``None`` for a tag that is not a metric of the table under ``prefix``.

    Example:
        >>> t = parse_tag("stability/block3/head1/kappa_v")
        >>> (t.metric.name, t.block, t.head)
        ('kappa_v', 3, 1)
        >>> parse_tag("stability/fp16_headroom").block is None, parse_tag("stability/guard/actions")
        (True, None)
        >>> t = parse_tag("stability/layer/h.0.mlp.c_proj/input/fp8_underflow")
        >>> (t.metric.name, t.layer, t.operand)
        ('fp8_underflow', 'h.0.mlp.c_proj', 'input')
    """
    head_part, sep, rest = text.partition("/")
    if not sep or head_part != prefix:
        return None
    parts = rest.split("/")
    metric = BY_NAME.get(parts[-1])
    if metric is None:
        return None
    if metric.level in LAYER_LEVELS:
        return _parse_layer_tag(metric, parts, prefix)
    indices: list[int] = []
    for part, word in zip(parts[:-1], ("block", "head"), strict=False):
        number = part.removeprefix(word)
        if number == part or not number.isdigit() or (len(number) > 1 and number[0] == "0"):
            return None
        indices.append(int(number))
    if len(parts) > 3 or (not indices and metric.level != "model" and not metric.blocks):
        return None
    if (indices and metric.level == "model") or (len(indices) == 2 and metric.level != "head"):
        return None
    block = indices[0] if indices else None
    head = indices[1] if len(indices) == 2 else None
    return Tag(metric, block, head, prefix)


def _parse_layer_tag(metric: Metric, parts: list[str], prefix: str) -> Tag | None:
    """``layer/<module>/[<operand>/]<name>`` split into its parts (a module name may hold ``/``)."""
    operand_level = metric.level == "operand"
    if parts[0] != LAYER_SEGMENT or len(parts) < (4 if operand_level else 3):
        return None
    if operand_level:
        if not parts[-2]:
            return None
        return Tag(metric, prefix=prefix, layer="/".join(parts[1:-2]), operand=parts[-2])
    return Tag(metric, prefix=prefix, layer="/".join(parts[1:-1]))


def markdown_table() -> str:
    """The metric table of docs/metrics.md and docs/DESIGN.md, generated from :data:`METRICS`."""
    rows = [
        "| tag | level | over heads | over examples | model roll-up | across ranks | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        name = f"`stability/{m.name}`" if m.level == "model" else f"`stability/block{{i}}/{m.name}`"
        if m.level == "layer":
            name = f"`stability/{LAYER_SEGMENT}/<module>/{m.name}`"
        elif m.level == "operand":
            name = f"`stability/{LAYER_SEGMENT}/<module>/<operand>/{m.name}`"
        if m.level == "head":
            name += " (+ `head{h}/`)"
        rollup = f"`stability/{m.name}` = {m.blocks}" if m.blocks else "—"
        doc = m.doc.replace("|", "\\|")  # a literal | would end the markdown cell
        ranks = m.ranks or (m.derived.note if m.derived else "—")
        cells = (name, m.level, m.heads or "—", m.examples or "—", rollup, ranks, doc)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())

"""Report composition: reduced raw values (host floats) as a
:class:`~lightning_stability.stability_report.StabilityReport`.

Metrics the table marks as measured are copied from their raw values (:class:`RawKey`
records); the others are derived as their row's
:class:`~lightning_stability.metrics.Derivation` says: error ratios and token means
generically from their summed parts, ``C_LN``/``ρ_LN``, the predictor, the bound and the
roll-ups by their formulas, with the pure functions of :mod:`lightning_stability.diagnostics`
(SPEC §2–§5).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_stability import diagnostics as D
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.structure import MISSING_WO, Block
from lightning_stability.metrics import BLOCK_METRICS, BY_NAME, HEAD_METRICS, LAYER_LEVELS, Metric, RawKey
from lightning_stability.rules.thresholds import FP16_MAX
from lightning_stability.stability_report import BlockReport, LayerReport, OperandReport, StabilityReport

if TYPE_CHECKING:
    from lightning_stability.capture.probe.stability_probe import StabilityProbe


def predictor_warnings(blocks: Sequence[Block]) -> list[str]:
    """What the combined predictor leaves out because a weight was not found (for a one-time warning).

    Example:
        >>> from torch import nn
        >>> predictor_warnings([Block(0, "h.0", nn.Identity(), missing=["W_O"])])[0][:60]
        'h.0: no W_O found, so the combined predictor of these blocks'
    """
    names = [b.name for b in blocks if MISSING_WO in b.missing]
    if not names:
        return []
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return [
        f"{shown}: no W_O found, so the combined predictor of these blocks leaves out the attention "
        "term kappa_softmax(1+kappa_score)kappa_V||W_O|| (it is not computed with ||W_O|| = 1) and the "
        "bound counts kappa(W_O) as 0; name the output projection (e.g. `out_proj`) to include it"
    ]


def _ratio(err_sq: float, ref_sq: float) -> float:
    if not math.isfinite(err_sq):
        return math.inf
    if ref_sq > 0:
        return math.sqrt(err_sq / ref_sq)
    return 0.0 if err_sq == 0 else math.inf


def _from_parts(row: Metric, a: float | None, b: float | None) -> float | None:
    """A value derived from its two summed parts as its row says (``None``: a part is missing)."""
    if row.derived is None or a is None or b is None:
        return None
    if row.derived.kind == "rms ratio":
        return _ratio(a, b)
    if row.derived.kind == "mean" and b:
        return a / b
    return None


#: The reduced raw values of one measurement (host floats).
Values = Mapping[RawKey, float]


def compose_report(
    probe: StabilityProbe,
    raw: RawMeasurement,
    values: Values,
    step: int,
    ln_constants: tuple[float, float, float] = (1.0, 1.0, 1.0),
    bound_c: float = 1.0,
    eps_mach: float | None = None,
) -> StabilityReport:
    """Turn reduced raw values (host floats) into a :class:`StabilityReport` (SPEC §2–§5).

    Metrics the table marks as measured are copied from their raw keys; the others are derived
    as their row's :class:`~lightning_stability.metrics.Derivation` says (error ratios and
    token means from their summed parts; ``C_LN``/``ρ_LN``, the predictor, the bound and the
    roll-ups by their formulas here). A term that was
    not measured (a block without attention, say) is left out of the combined predictor and
    counts as 0 in the bound. In particular a block whose attention output projection ``W_O``
    was not found (``"W_O"`` in :attr:`Block.missing`) gets a predictor without its attention
    term ``κ_softmax(1+κ_score)κ_V‖W_O‖₂`` (no ``‖W_O‖ = 1`` is assumed) and ``κ(W_O) = 0``
    in the bound; :func:`predictor_warnings` words it.

    Args:
        probe: the probe that measured.
        raw: its raw measurement (for the dtype and norm metadata).
        values: the reduced raw values by key.
        step: the training step.
        ln_constants: ``C1, C2, C3`` of ``C_LN``.
        bound_c: the constant of the unified bound.
        eps_mach: ``ε_mach`` override (SPEC §2); default that of the low-precision dtype.
    """
    eps = D.eps_mach(raw.dtype) if eps_mach is None else float(eps_mach)
    by_block: dict[int | None, dict[RawKey, float]] = defaultdict(dict)
    for key, value in values.items():
        by_block[key.block][key] = value
    blocks = [
        _block_report(probe, raw, by_block.get(block.index, {}), values, block, eps, ln_constants)
        for block in probe.blocks
    ]
    nonfinite = [values.get(RawKey("nonfinite", b.index, metric="r_block")) for b in probe.blocks]
    out = StabilityReport(
        step=step,
        dtype=str(raw.dtype).replace("torch.", ""),
        eps_mach=eps,
        blocks=blocks,
        nonfinite=sum(int(n or 0) for n in nonfinite),
        norm_dtypes=dict(raw.norm_dtypes),
    )
    out.kappa_softmax_max = values.get(RawKey("kappa_softmax_max"))
    _roll_up(out)
    modules = {k.module: v for k, v in values.items() if k.name == "amax" and k.module is not None}
    if modules:
        name, top = max(modules.items(), key=lambda kv: kv[1])
        out.amax_module = name or "(model output)"
        out.fp16_headroom = math.log2(FP16_MAX / top) if top > 0 else math.inf
    if blocks and all(b.residual_gain is not None for b in blocks):
        _bound(out, probe, values, bound_c)
    out.layers = _layer_reports(values)
    return out


def _layer_reports(values: Values) -> list[LayerReport]:
    """Per linear layer (FP8 passes), the table's ``layer`` and ``operand`` rows, layers in measured order."""
    got: dict[tuple[str, str | None, str], dict[str, float]] = {}
    for key, raw in values.items():
        name = key.metric or key.name
        row = BY_NAME.get(name)
        if key.module is None or row is None or row.level not in LAYER_LEVELS:
            continue
        got.setdefault((key.module, key.operand, name), {})[key.name] = raw
    layers: dict[str, LayerReport] = {}
    for (module, operand, name), parts in got.items():
        row = BY_NAME[name]
        layer = layers.setdefault(module, LayerReport(module))
        target = layer if operand is None else layer.operands.setdefault(operand, OperandReport())
        if row.measured or row.derived is None:
            value = parts.get(name)
        else:
            a, b = (parts.get(part) for part in row.derived.parts)
            value = _from_parts(row, a, b)
        setattr(target, name, None if value is None or math.isnan(value) else value)
    return list(layers.values())


def _roll_up(out: StabilityReport) -> None:
    """The model-level values formed from the blocks' (the table's ``blocks`` roll-ups and the
    worst block)."""
    blocks = out.blocks
    predictors = [b.predictor for b in blocks if b.predictor is not None]
    if predictors:
        out.predictor = max(predictors)
        out.predictor_scaled = out.predictor * out.eps_mach
    logits = [b.attn_logit_max for b in blocks if b.attn_logit_max is not None]
    out.attn_logit_max = max(logits) if logits else None
    if blocks:
        out.r_block = blocks[-1].r_block
        out.r_block_median = blocks[-1].r_block_median
        out.r_block_mean_token = blocks[-1].r_block_mean_token
    local = [(b.r_local, i) for i, b in enumerate(blocks) if b.r_local is not None]
    if local:
        worst = max(local)[1]
        out.worst_block, out.worst_block_index = blocks[worst].name, worst


def _block_report(
    probe: StabilityProbe,
    raw: RawMeasurement,
    own: dict[RawKey, float],
    values: Values,
    block: Block,
    eps: float,
    ln_constants: tuple[float, float, float],
) -> BlockReport:
    """One block's report from its own raw values (``own``) and its norm layers' (in ``values``)."""
    i = block.index
    report = BlockReport(name=block.name)
    for name in BLOCK_METRICS:
        row = BY_NAME[name]
        if row.measured:  # the reduced raw value is the metric
            value = own.get(RawKey(name, i))
            setattr(report, name, None if value is None or math.isnan(value) else value)  # NaN: unknown
        elif row.derived is not None and row.derived.kind != "formula":
            a, b = (own.get(RawKey(part, i, metric=name)) for part in row.derived.parts)
            setattr(report, name, _from_parts(row, a, b))
    _exact_means(report, own)
    report.c_ln, report.rho_ln = _norm_terms(probe, raw, values, i, eps, ln_constants)
    if own.get(RawKey("nonfinite", i, metric="r_block")):
        report.r_block = report.r_block_median = report.r_block_mean_token = math.inf
    attention = 0.0
    ksm, ksc, kv = report.kappa_softmax, report.kappa_score, report.kappa_v
    # no W_O found (Block.missing): the attention term is left out, not computed with ‖W_O‖ = 1
    # (the monitor says so once, naming the blocks: predictor_warnings)
    if ksm is not None and ksc is not None and kv is not None and report.wo_norm is not None:
        attention = float(D.combined_predictor(ksm, ksc, kv, report.wo_norm, 0.0, 0.0))
    report.predictor = attention + (report.kappa_eff or 0.0) + (report.c_ln or 0.0)
    report.per_head.update(_per_head(own))
    return report


def _norm_terms(
    probe: StabilityProbe,
    raw: RawMeasurement,
    values: Values,
    i: int,
    eps: float,
    ln_constants: tuple[float, float, float],
) -> tuple[float | None, float | None]:
    """``(Σ C_LN, min ρ_LN)`` over block ``i``'s normalization layers (``None``: it has none)."""
    c_ln: list[float] = []
    rho: list[float] = []
    for norm in probe.norms:
        var = values.get(RawKey("variance", module=norm.name))
        if probe.norm_block.get(norm.name) != i or var is None:
            continue
        d, norm_eps = raw.norm_meta[norm.name]
        rho.append(float(D.rho_ln_from_variance(var, d, norm_eps, eps)))
        c_ln.append(
            float(D.ln_error_coefficient_from_variance(var, norm_eps, *ln_constants, eps_mach=eps, d=d))
        )
    return (sum(c_ln) if c_ln else None), (min(rho) if rho else None)


def _per_head(own: dict[RawKey, float]) -> dict[str, list[float]]:
    """Each head-level metric's per-head values, in head order (``log_per_head``)."""
    found: dict[str, dict[int, float]] = {}
    for key, value in own.items():
        if key.head is not None and key.call is None and key.metric is None:
            found.setdefault(key.name, {})[key.head] = value
    return {name: [heads[h] for h in sorted(heads)] for name in HEAD_METRICS if (heads := found.get(name))}


def _exact_means(report: BlockReport, own: dict[RawKey, float]) -> None:
    """``batch_reduction="mean"``: max over calls of (Σ over every rank's examples) / (their count),
    for each metric whose per-call sums were kept (and per head)."""
    counts = {k.call: v for k, v in own.items() if k.name == "example_count"}
    sums: dict[tuple[str, int | None], dict[int, float]] = {}
    for key, value in own.items():
        if key.name == "example_sum" and key.metric is not None and key.call is not None:
            sums.setdefault((key.metric, key.head), {})[key.call] = value
    order = [c for c in sorted(k for k in counts if k is not None)]
    for name in HEAD_METRICS:
        per_call = sums.get((name, None))
        if per_call is None:
            continue
        means = [per_call[c] / counts[c] for c in order]
        known = [m for m in means if not math.isnan(m)]  # NaN: κ_score of a scores-only call
        setattr(report, name, max(known) if known else None)
        heads = sorted(h for (m, h), calls in sums.items() if m == name and h is not None and 0 in calls)
        if heads:
            report.per_head[name] = [
                max(sums[(name, h)][c] / counts[c] for c in order if c in sums[(name, h)]) for h in heads
            ]


def _bound(out: StabilityReport, probe: StabilityProbe, values: Values, bound_c: float) -> None:
    blocks = out.blocks

    def col(name: str) -> list[float]:
        return [float(getattr(b, name) or 0.0) for b in blocks]

    kappa_wo = [values.get(RawKey("kappa_wo", b.index), 0.0) for b in probe.blocks]
    bound = D.unified_bound(
        col("kappa_eff"),
        kappa_wo,
        col("kappa_softmax"),
        col("kappa_score"),
        col("kappa_v"),
        col("c_ln"),
        col("residual_gain"),
        out.eps_mach,
        c=bound_c,
    )
    out.bound, out.bound_rigorous, out.small_gain = bound.first_order, bound.rigorous, bound.small_gain

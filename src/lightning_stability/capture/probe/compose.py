"""Report composition: reduced raw values (host floats) as a
:class:`~lightning_stability.stability_report.StabilityReport`.

Metrics the table marks as measured are copied from their raw keys; the others (ratios,
``C_LN``/``ρ_LN``, the predictor, the bound, the roll-ups) are derived here with the pure
functions of :mod:`lightning_stability.diagnostics` (SPEC §2–§5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_stability import diagnostics as D
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.structure import MISSING_WO, Block
from lightning_stability.metrics import BLOCK_METRICS, BY_NAME, HEAD_METRICS
from lightning_stability.rules.thresholds import FP16_MAX
from lightning_stability.stability_report import BlockReport, StabilityReport

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


def compose_report(
    probe: StabilityProbe,
    raw: RawMeasurement,
    values: dict[str, float],
    step: int,
    ln_constants: tuple[float, float, float] = (1.0, 1.0, 1.0),
    bound_c: float = 1.0,
    eps_mach: float | None = None,
) -> StabilityReport:
    """Turn reduced raw values (host floats) into a :class:`StabilityReport` (SPEC §2–§5).

    Metrics the table marks as measured are copied from their raw keys; the others (ratios,
    ``C_LN``/``ρ_LN``, the predictor, the bound, the roll-ups) are derived here. A term that was
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
    blocks = [_block_report(probe, raw, values, block, eps, ln_constants) for block in probe.blocks]
    out = StabilityReport(
        step=step,
        dtype=str(raw.dtype).replace("torch.", ""),
        eps_mach=eps,
        blocks=blocks,
        nonfinite=sum(int(values.get(f"block{b.index}/r_block/nonfinite") or 0) for b in probe.blocks),
        norm_dtypes=dict(raw.norm_dtypes),
    )
    out.kappa_softmax_max = values.get("kappa_softmax_max")
    predictors = [b.predictor for b in blocks if b.predictor is not None]
    if predictors:
        out.predictor = max(predictors)
        out.predictor_scaled = out.predictor * eps
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
    modules = {k[len("module/") : -len("/amax")]: v for k, v in values.items() if k.startswith("module/")}
    if modules:
        name, top = max(modules.items(), key=lambda kv: kv[1])
        out.amax_module = name or "(model output)"
        out.fp16_headroom = math.log2(FP16_MAX / top) if top > 0 else math.inf
    if blocks and all(b.residual_gain is not None for b in blocks):
        _bound(out, probe, values, bound_c)
    return out


def _block_report(
    probe: StabilityProbe,
    raw: RawMeasurement,
    values: dict[str, float],
    block: Block,
    eps: float,
    ln_constants: tuple[float, float, float],
) -> BlockReport:
    i = block.index
    report = BlockReport(name=block.name)
    for name in BLOCK_METRICS:  # measured directly: the reduced raw value is the metric
        if BY_NAME[name].measured:
            value = values.get(f"block{i}/{name}")
            setattr(report, name, None if value is None or math.isnan(value) else value)  # NaN: unknown
    if probe.batch_reduction == "mean":
        _exact_means(report, values, i)
    c_ln: list[float] = []
    rho: list[float] = []
    for norm in probe.norms:
        var = values.get(f"norm/{norm.name}/variance")
        if probe.norm_block.get(norm.name) != i or var is None:
            continue
        d, norm_eps = raw.norm_meta[norm.name]
        rho.append(float(D.rho_ln_from_variance(var, d, norm_eps, eps)))
        c_ln.append(
            float(D.ln_error_coefficient_from_variance(var, norm_eps, *ln_constants, eps_mach=eps, d=d))
        )
    report.c_ln = sum(c_ln) if c_ln else None
    report.rho_ln = min(rho) if rho else None
    for name in ("r_block", "r_local", "r_attention_local", "r_ffn_local"):
        err_sq, ref_sq = values.get(f"block{i}/{name}/err_sq"), values.get(f"block{i}/{name}/ref_sq")
        if err_sq is not None and ref_sq is not None:
            setattr(report, name, _ratio(err_sq, ref_sq))
    count = values.get(f"block{i}/r_block/token_count")
    if count:
        report.r_block_mean_token = values[f"block{i}/r_block/token_sum"] / count
    if values.get(f"block{i}/r_block/nonfinite"):
        report.r_block = report.r_block_median = report.r_block_mean_token = math.inf
    attention = 0.0
    ksm, ksc, kv = report.kappa_softmax, report.kappa_score, report.kappa_v
    # no W_O found (Block.missing): the attention term is left out, not computed with ‖W_O‖ = 1
    # (the monitor says so once, naming the blocks: predictor_warnings)
    if ksm is not None and ksc is not None and kv is not None and report.wo_norm is not None:
        attention = float(D.combined_predictor(ksm, ksc, kv, report.wo_norm, 0.0, 0.0))
    report.predictor = attention + (report.kappa_eff or 0.0) + (report.c_ln or 0.0)
    report.per_head.update(
        {
            name: [values[f"block{i}/head{h}/{name}"] for h in range(_count_heads(values, i, name))]
            for name in HEAD_METRICS
            if f"block{i}/head0/{name}" in values
        }
    )
    return report


def _exact_means(report: BlockReport, values: dict[str, float], i: int) -> None:
    """``batch_reduction="mean"``: max over calls of (Σ over every rank's examples) / (their count)."""
    counts: list[float] = []
    while f"block{i}/call{len(counts)}/example_count" in values:
        counts.append(values[f"block{i}/call{len(counts)}/example_count"])
    if not counts:
        return
    for name in ("kappa_score", "kappa_softmax", "kappa_v"):
        means = [values[f"block{i}/call{c}/{name}/example_sum"] / n for c, n in enumerate(counts)]
        known = [m for m in means if not math.isnan(m)]  # NaN: κ_score of a scores-only call
        setattr(report, name, max(known) if known else None)
        heads: list[float] = []
        while f"block{i}/head{len(heads)}/call0/{name}/example_sum" in values:
            h = len(heads)
            heads.append(
                max(
                    values[f"block{i}/head{h}/call{c}/{name}/example_sum"] / n
                    for c, n in enumerate(counts)
                    if f"block{i}/head{h}/call{c}/{name}/example_sum" in values
                )
            )
        if heads:
            report.per_head[name] = heads


def _bound(out: StabilityReport, probe: StabilityProbe, values: dict[str, float], bound_c: float) -> None:
    blocks = out.blocks

    def col(name: str) -> list[float]:
        return [float(getattr(b, name) or 0.0) for b in blocks]

    kappa_wo = [values.get(f"block{b.index}/kappa_wo", 0.0) for b in probe.blocks]
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


def _count_heads(values: dict[str, float], i: int, name: str) -> int:
    h = 0
    while f"block{i}/head{h}/{name}" in values:
        h += 1
    return h

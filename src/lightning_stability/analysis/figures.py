"""The report's figures (PNG, matplotlib's object API: no pyplot, no global state).

Lead–lag of κ_softmax against the mismatch, predictor vs mismatch by precision, per-block
curves as TensorBoard's custom-scalars charts show them, and LayerNorm ε after bumps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._format import _fmt, _fmt_p
from .logs import Run, align
from .report_tables import EPS_TAG, MISMATCH_TAG, PREDICTOR_SCALED_TAG, SIGNAL_TAG, LeadLagRow, lead_reading

_PRECISIONS = {"bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 2.0**-23}


def _precision_label(eps: float) -> str:
    if not math.isfinite(eps) or eps <= 0:
        return "unknown"
    name, ref = min(_PRECISIONS.items(), key=lambda kv: abs(math.log2(eps) - math.log2(kv[1])))
    return name if abs(math.log2(eps) - math.log2(ref)) < 0.5 else f"ε={eps:.1e}"


def _precision_of(run: Run, steps: np.ndarray) -> list[str]:
    eps = run.get(EPS_TAG)
    if eps is None:
        return ["unknown"] * int(steps.size)
    # the ε of a step: the last logged ε_mach at or before it (else the first one)
    idx = np.clip(np.searchsorted(eps.steps, steps, side="right") - 1, 0, eps.steps.size - 1)
    return [_precision_label(float(v)) for v in eps.values[idx]]


def _zscore(v: np.ndarray) -> np.ndarray:
    fin = np.isfinite(v)
    out = np.full(v.shape, np.nan)
    if fin.sum() >= 2:
        sd = float(v[fin].std())
        out[fin] = (v[fin] - v[fin].mean()) / (sd if sd > 0 else 1.0)
    return out


def _load_figure_class() -> Any:
    """``matplotlib.figure.Figure`` or None (no pyplot: no global state, no backend switch)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _plot_leadlag(Figure: Any, run: Run, row: LeadLagRow, path: Path) -> bool:
    s, t = run.get(SIGNAL_TAG), run.get(MISMATCH_TAG)
    if s is None or t is None:
        return False
    steps, (sv, tv) = align(s, t)
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, height_ratios=[2, 1])
    ax.plot(steps, _zscore(sv), label="κ_softmax max (z-scored)", color="tab:orange")
    ax.plot(steps, _zscore(tv), label="r_block (z-scored)", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("z-score")
    ax.legend(loc="upper left")
    if row.lag is not None:
        reading = lead_reading(row)
        title = reading.split(" (")[0] if reading.startswith("κ_softmax leads") else reading.split(":")[0]
        text = (
            f"best lag {row.lag} steps, corr {row.corr:.3f}\n"
            f"p {_fmt_p(row.p_value)}, Prec@K {_fmt(row.precision_at_k)}"
        )
        ax.set_title(f"{run.name}: {title}")
        ax.annotate(
            text,
            xy=(0.99, 0.97),
            xycoords="axes fraction",
            ha="right",
            va="top",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
        )
        ax2.plot(row.lags, row.curve, color="k")
        ax2.axvline(row.lag, color="tab:red", ls="--", label=f"best lag {row.lag}")
        ax2.axvline(0, color="grey", lw=0.5)
        ax2.set_xlabel("lag (steps; > 0: κ_softmax leads)")
        ax2.set_ylabel("corr")
        ax2.legend(loc="lower right")
    else:
        ax.set_title(f"{run.name}: lead–lag not computed ({row.note})"[:120])
        ax2.set_axis_off()
    fig.savefig(path, dpi=100)
    return True


def _plot_scatter(Figure: Any, runs: Sequence[Run], path: Path) -> bool:
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for run in runs:
        p, m = run.get(PREDICTOR_SCALED_TAG), run.get(MISMATCH_TAG)
        if p is None or m is None:
            continue
        steps, (pv, mv) = align(p, m)
        for label, x, y in zip(_precision_of(run, steps), pv, mv, strict=True):
            if np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0:
                g = groups.setdefault(label, ([], []))
                g[0].append(float(x))
                g[1].append(float(y))
    if not groups:
        return False
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    colors = {"fp32": "tab:green", "bf16": "tab:blue", "fp16": "tab:orange"}
    for label in sorted(groups):
        xs, ys = groups[label]
        ax.scatter(xs, ys, s=12, alpha=0.7, label=f"{label} ({len(xs)})", color=colors.get(label))
    allv = [v for xs, ys in groups.values() for v in (*xs, *ys)]
    lo, hi = min(allv), max(allv)
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predictor · ε_mach  (stability/predictor_scaled)")
    ax.set_ylabel("observed mismatch  (stability/r_block)")
    ax.set_title(
        "Predicted vs observed forward mismatch (one point per logged step)\n"
        "the predictor is an upper-bound-style quantity: points at or below y = x",
        fontsize=10,
    )
    ax.legend(title="precision")
    fig.savefig(path, dpi=100)
    return True


def _plot_curves(Figure: Any, run: Run, path: Path) -> bool:
    """Per-block curves over steps, as TensorBoard's custom-scalars charts show them."""
    panels = [
        ("r_local", "block-local error r_local", True),
        ("r_block", "forward mismatch r_block", True),
        ("kappa_softmax", "κ_softmax", True),
        ("predictor", "combined predictor", True),
        ("attn_logit_max", "max attention logit", True),
        ("rank_collapse", "rank collapse ‖X−1x̄ᵀ‖/‖X‖", True),
        ("theta", "balanced mass θ(p)", False),
    ]
    panels = [(name, label, log) for name, label, log in panels if run.block_tags(name)]
    if not panels:
        return False
    fig = Figure(figsize=(8, 2.3 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, label, log) in zip(axes, panels, strict=True):
        tags = run.block_tags(name)
        for block, tag in tags:
            series = run.get(tag)
            if series is not None:
                ax.plot(series.steps, series.values, label=f"block{block}", lw=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=min(6, len(tags)), loc="upper left")
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{run.name}: per-block stability curves")
    fig.savefig(path, dpi=80)
    return True


def _plot_ln_eps(Figure: Any, run: Run, path: Path) -> bool:
    tags = [t for t in run.tags_matching(r"ln_eps/.+") if t != "ln_eps/bumped_layers"]
    series = [(t, s) for t in tags if (s := run.get(t)) is not None]
    if not series:
        return False
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (t, s) in enumerate(series):
        ax.step(s.steps, s.values, where="post", label=t.removeprefix("ln_eps/") if i < 12 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("LayerNorm ε")
    title = f"{run.name}: LayerNorm ε after bumps"
    if len(series) > 12:
        title += f" ({len(series)} layers, legend shows 12)"
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return True

"""The stability report: paper-shaped tables (Markdown) and plots (PNG) from TensorBoard logs.

:func:`build_report` reads every run under a log root (see
:mod:`lightning_stability.analysis.logs`) and writes into ``out``:

* ``report.md`` — opens with a verdict in plain words (healthy / watch / at risk,
  which block, how far above the ε_mach rounding floor, what to try; see
  :mod:`lightning_stability.analysis.verdict`), then a regression table shaped like
  the paper's Table 2 (all runs pooled, one point per logged step), a lead–lag table
  shaped like Table 3 (one row per run and target, with its reading in words), links
  to the figures and a "how to read this" note;
* ``leadlag_<run>.png`` — z-scored ``stability/kappa_softmax_max`` and
  ``stability/r_block`` over steps with the detected lead, plus the
  correlation-vs-lag curve;
* ``predictor_vs_mismatch.png`` — ``stability/predictor_scaled`` against
  ``stability/r_block`` on log–log axes, coloured by precision (from
  ``stability/eps_mach``), all runs together;
* ``ln_eps_<run>.png`` — ``ln_eps/<layer>`` over steps, when logged.

The plots need matplotlib (the ``plot`` extra); without it the Markdown is
still written and one message says how to get the plots.

Step units: lead–lag parameters (``max_lag``, ``horizon``, ``window``) are given
in **training steps**, as in the paper (which logs every step). When a run logs
every ``k`` steps, they are converted to samples by dividing by ``k`` (rounded),
and lags are reported back in steps (samples × ``k``); every number the report
prints is in steps or says "logged points".

Step alignment: series are joined on their logged step. ``StabilityMonitor`` logs a
measurement made after optimizer step N under step N − 1, Lightning's own step for
that batch's ``training_step`` values, so ``stability/*`` and ``train_loss`` share
steps (logs written before this rule, at step N, join a loss one batch later).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .leadlag import lead_lag, lead_lag_permutation_test
from .logs import Run, Series, align, load_runs, step_stride
from .regression import predictor_regression
from .spikes import spike_precision_at_k
from .verdict import KappaLead, RunVerdict, run_verdict, verdict_markdown

__all__ = [
    "MATPLOTLIB_MISSING",
    "LeadLagRow",
    "NoEventFilesError",
    "RegressionRow",
    "Report",
    "build_report",
]

MATPLOTLIB_MISSING = 'matplotlib is not installed: pip install "lightning-stability[plot]" to get the plots'

SIGNAL_TAG = "stability/kappa_softmax_max"
MISMATCH_TAG = "stability/r_block"
EPS_TAG = "stability/eps_mach"
#: Loss tags tried, in order, for the "loss" rows of the lead–lag table (paper: no consistent lead).
LOSS_TAG_CANDIDATES = ("train_loss", "train/loss", "loss", "train_loss_step", "train/loss_step")

_PRECISIONS = {"bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 2.0**-23}


class NoEventFilesError(FileNotFoundError):
    """The log root holds no ``events.out.tfevents.*`` file."""


@dataclass(frozen=True)
class RegressionRow:
    """One row of the Table-2-like table (``stats`` is None when not computable; see ``note``)."""

    proxy: str
    source: str
    n: int
    pearson_log: float = math.nan
    spearman: float = math.nan
    r2: float = math.nan
    slope: float = math.nan
    note: str = ""


@dataclass(frozen=True)
class LeadLagRow:
    """One row of the Table-3-like table. ``lag`` is in training steps (positive: signal leads)."""

    run: str
    target: str
    target_tag: str
    T: int
    stride: int
    lag: int | None = None
    corr: float = math.nan
    p_value: float = math.nan
    precision_at_k: float = math.nan
    note: str = ""
    lags: tuple[int, ...] = field(default=(), repr=False)
    curve: tuple[float, ...] = field(default=(), repr=False)


@dataclass
class Report:
    """What :func:`build_report` produced."""

    out_dir: Path
    markdown: Path
    runs: list[str]
    regression: list[RegressionRow]
    leadlag: list[LeadLagRow]
    figures: list[Path]
    plots_skipped: str | None = None
    verdicts: list[RunVerdict] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")
    return s or "run"


def _unique_slugs(names: Sequence[str]) -> dict[str, str]:
    """File-name-safe, collision-free slug of each run name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = slug = _slug(name)
        i = 2
        while slug in used:
            slug, i = f"{base}_{i}", i + 1
        used.add(slug)
        out[name] = slug
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if v != 0 and abs(v) < 0.5 * 10**-digits:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _block_max(run: Run, name: str) -> Series | None:
    """Per-step max over ``stability/block{i}/<name>`` (steps: union; NaN-ignoring)."""
    tags = run.tags_matching(rf"stability/block\d+/{re.escape(name)}")
    series = [s for s in (run.get(t) for t in tags) if s is not None]
    if not series:
        return None
    steps = np.unique(np.concatenate([s.steps for s in series]))
    acc = np.full(steps.shape, np.nan)
    for s in series:
        vals = np.full(steps.shape, np.nan)
        vals[np.searchsorted(steps, s.steps)] = s.values
        acc = np.fmax(acc, vals)
    return Series(steps=steps, values=acc)


def _proxies() -> list[tuple[str, str, Callable[[Run], Series | None]]]:
    """(label, source description, getter) for each row of the regression table."""

    def tag(t: str) -> Callable[[Run], Series | None]:
        return lambda run: run.get(t)

    def block(name: str, fallback: str | None = None) -> Callable[[Run], Series | None]:
        def get(run: Run) -> Series | None:
            s = _block_max(run, name)
            return s if s is not None or fallback is None else run.get(fallback)

        return get

    return [
        ("combined·ε_mach", "`stability/predictor_scaled`", tag("stability/predictor_scaled")),
        ("combined", "`stability/predictor`", tag("stability/predictor")),
        (
            "κ_softmax",
            "max over blocks of `stability/block{i}/kappa_softmax` (else `kappa_softmax_max`)",
            block("kappa_softmax", SIGNAL_TAG),
        ),
        ("κ_score", "max over blocks of `stability/block{i}/kappa_score`", block("kappa_score")),
        ("κ(V)", "max over blocks of `stability/block{i}/kappa_v`", block("kappa_v")),
    ]


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


# --------------------------------------------------------------------------- tables


def _regression_rows(runs: Sequence[Run]) -> list[RegressionRow]:
    rows = []
    for label, source, get in _proxies():
        xs, ys = [], []
        for run in runs:
            p, m = get(run), run.get(MISMATCH_TAG)
            if p is None or m is None:
                continue
            _, (pv, mv) = align(p, m)
            xs.append(pv)
            ys.append(mv)
        if not xs:
            rows.append(RegressionRow(label, source, 0, note="not logged"))
            continue
        x, y = np.concatenate(xs), np.concatenate(ys)
        try:
            r = predictor_regression(x, y)
        except ValueError as exc:
            rows.append(RegressionRow(label, source, int(x.size), note=f"not computable: {exc}"))
            continue
        note = f"{r.n_dropped} non-positive/non-finite pairs dropped" if r.n_dropped else ""
        rows.append(RegressionRow(label, source, r.n, r.pearson_log, r.spearman, r.r2, r.slope, note))
    return rows


def _leadlag_row(
    run: Run,
    target: str,
    target_tag: str,
    *,
    max_lag: int,
    n_permutations: int,
    seed: int,
    horizon: int,
    window: int,
    z: float,
    k: int | None,
) -> LeadLagRow:
    s, t = run.get(SIGNAL_TAG), run.get(target_tag)
    if s is None or t is None:
        missing = SIGNAL_TAG if s is None else target_tag
        return LeadLagRow(run.name, target, target_tag, 0, 1, note=f"`{missing}` not logged")
    steps, (sv, tv) = align(s, t)  # joined on the logged step (see "Step alignment" above)
    T = int(steps.size)
    stride = step_stride(steps)
    notes = []
    if T >= 2 and not np.all(np.diff(steps) == stride):
        notes.append(f"irregular step grid (median stride {stride} used)")
    n_bad = int((~np.isfinite(sv) | ~np.isfinite(tv)).sum())
    if n_bad:
        notes.append(f"{n_bad} non-finite steps dropped pairwise")
    ml = max(1, round(max_lag / stride))
    hz = max(1, round(horizon / stride))
    win = max(2, round(window / stride))
    row: dict[str, Any] = {
        "run": run.name,
        "target": target,
        "target_tag": target_tag,
        "T": T,
        "stride": stride,
    }
    try:
        ll = lead_lag(sv, tv, max_lag=ml)
        pt = lead_lag_permutation_test(sv, tv, max_lag=ml, n_permutations=n_permutations, seed=seed)
        row.update(
            lag=ll.lag * stride,
            corr=ll.corr,
            p_value=pt.p_value,
            lags=tuple(v * stride for v in ll.lags),
            curve=ll.curve,
        )
    except ValueError as exc:
        if ml + 10 > T:  # lead_lag's min_overlap; say it in logged points and steps, not samples
            notes.append(
                f"lead–lag not computed: series too short: {T} logged points (one every {stride} "
                f"step(s)); a ±{ml * stride}-step scan needs at least {ml + 10} — log more often "
                f"or pass --max-lag {max(0, (T - 10) * stride)}"
            )
        else:
            notes.append(f"lead–lag not computed: {exc}")
    try:
        row["precision_at_k"] = spike_precision_at_k(sv, tv, k=k, horizon=hz, window=win, z=z)
    except ValueError as exc:
        notes.append(f"Prec@K not computed ({exc})")
    return LeadLagRow(**row, note="; ".join(notes))


def lead_reading(row: LeadLagRow, alpha: float = 0.05) -> str:
    """The lead–lag row in plain words; "leads by" only for a significant lead inside the scan.

    A best lag at the edge of the scanned range (``±max_lag``) is not a lead: the curve was
    still rising where the scan stopped, or the maximum is an end effect.
    """
    if row.lag is None:
        return "not computed"
    edge = max((abs(v) for v in row.lags), default=abs(row.lag))
    p = _fmt_p(row.p_value)
    if edge and abs(row.lag) >= edge:
        return f"no lead: the best lag ({row.lag} steps) sits at the edge of the ±{edge}-step scan (p {p})"
    if not (row.p_value < alpha):
        return f"no significant lead (best lag {row.lag} steps, corr {_fmt(row.corr)}, p {p} ≥ {alpha})"
    if row.lag <= 0:
        return f"κ_softmax does not lead: best lag {row.lag} steps (p {p})"
    return f"κ_softmax leads {row.target} by {row.lag} steps (p {p})"


def _verdict_lead(row: LeadLagRow | None) -> KappaLead | None:
    """A run's κ_softmax → r_block test, for the verdict's sentence on κ_softmax (None: it did not run)."""
    if row is None or row.lag is None:
        return None
    reading = lead_reading(row)
    return KappaLead(row.lag, row.p_value, reading.startswith("κ_softmax leads"), reading)


def _bound_gap(runs: Sequence[Run]) -> tuple[int, float, float] | None:
    """(points, median log10(mismatch / predictor·ε_mach), fraction above y = x), pooled."""
    ratios = []
    for run in runs:
        p, m = run.get("stability/predictor_scaled"), run.get(MISMATCH_TAG)
        if p is None or m is None:
            continue
        _, (pv, mv) = align(p, m)
        ok = np.isfinite(pv) & np.isfinite(mv) & (pv > 0) & (mv > 0)
        ratios.append(np.log10(mv[ok] / pv[ok]))
    if not ratios or not np.concatenate(ratios).size:
        return None
    r = np.concatenate(ratios)
    return int(r.size), float(np.median(r)), float(np.mean(r > 0))


# --------------------------------------------------------------------------- plots


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
        p, m = run.get("stability/predictor_scaled"), run.get(MISMATCH_TAG)
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
        (r"stability/block\d+/r_local", "block-local error r_local", True),
        (r"stability/block\d+/r_block", "forward mismatch r_block", True),
        (r"stability/block\d+/kappa_softmax", "κ_softmax", True),
        (r"stability/block\d+/predictor", "combined predictor", True),
        (r"stability/block\d+/attn_logit_max", "max attention logit", True),
        (r"stability/block\d+/rank_collapse", "rank collapse ‖X−1x̄ᵀ‖/‖X‖", True),
        (r"stability/block\d+/theta", "balanced mass θ(p)", False),
    ]
    panels = [(pat, label, log) for pat, label, log in panels if run.tags_matching(pat)]
    if not panels:
        return False
    fig = Figure(figsize=(8, 2.3 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (pattern, label, log) in zip(axes, panels, strict=True):
        tags = sorted(run.tags_matching(pattern), key=lambda t: int(t.split("/")[1].removeprefix("block")))
        for tag in tags:
            series = run.get(tag)
            if series is not None:
                ax.plot(series.steps, series.values, label=tag.split("/")[1], lw=1.2)
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


# --------------------------------------------------------------------------- markdown

HOW_TO_READ = """\
**Predictor vs mismatch (Table 2 shape).** Each row regresses the observed
forward mismatch `stability/r_block` (last block, low precision vs FP32) on one
proxy, pooling every logged step of every run. `Pearson_log` is the Pearson
correlation of the log10 values, `Spearman` the rank correlation, and `R²` /
`slope` come from a least-squares line *in linear space* (mismatch ≈ slope ·
proxy + intercept), the space that reproduces the paper's numbers. The
ε-scaled combined predictor should sit near the diagonal of the scatter plot
(slope near 1, high `Pearson_log`), with FP16 and BF16 points on one line; the
unscaled predictor and single terms are expected to be weaker. The paper uses one
point per configuration (95th-percentile tails); here it is one point per step,
so within-run correlation over time enters too.

**Lead–lag (Table 3 shape).** Both series are z-scored and correlated at every
lag in ±max_lag; `best lag` > 0 means `stability/kappa_softmax_max` moves
*before* the target by that many steps (an early warning). The `p-value` comes
from a permutation test that re-selects the best lag for every shuffled signal;
the smallest possible value is 1/(n_permutations+1). Shuffling destroys
autocorrelation, so for smooth series the p-value is optimistic: read it with
the correlation's size. `Prec@K` is the fraction of the K = ⌈0.1·T⌉ steps where
κ_softmax's rolling z-score (previous `window` steps) is highest that are followed
within `horizon` steps by a target spike (rolling z > Z). With targets that rarely
spike, Prec@K is low whatever the signal. A row that says the series is too short
needs more logged points (at least max_lag / stride + 10, where stride is the
logging interval in steps) or a smaller `--max-lag`. `T` counts logged points;
lags, horizon and window are in training steps. The reading column says "leads by"
only for a lag > 0 with p < 0.05 that is not at the edge of the scan.
"""


def _markdown(
    logdir: Path,
    runs: Sequence[Run],
    reg: Sequence[RegressionRow],
    ll: Sequence[LeadLagRow],
    figures: Sequence[Path],
    out_dir: Path,
    params: dict[str, Any],
    plots_skipped: str | None,
    verdicts: Sequence[RunVerdict] = (),
) -> str:
    lines = ["# Stability report", ""]
    lines.append(f"Log root: `{logdir}` — {len(runs)} run(s).")
    lines.append("")
    if verdicts:
        fwd = {r.run: r for r in ll if r.target_tag == MISMATCH_TAG}
        leads = {v.run: t for v in verdicts if (t := _verdict_lead(fwd.get(v.run))) is not None}
        lines += verdict_markdown(list(verdicts), leads)
    lines.append("| run | logged steps (r_block) | scalar tags |")
    lines.append("|---|---|---|")
    for run in runs:
        m = run.get(MISMATCH_TAG)
        lines.append(f"| {_md_cell(run.name)} | {len(m) if m is not None else 0} | {len(run.scalars)} |")
    lines += ["", "## Predictor vs observed mismatch (cf. paper Table 2)", ""]
    lines.append("Target: `stability/r_block`; all runs pooled, one point per logged step.")
    lines.append("")
    lines.append("| proxy | n | Pearson_log | Spearman | R² | slope | source / note |")
    lines.append("|---|---|---|---|---|---|---|")
    for g in reg:
        note = g.source + (f"; {g.note}" if g.note else "")
        lines.append(
            f"| {g.proxy} | {g.n} | {_fmt(g.pearson_log)} | {_fmt(g.spearman)} | {_fmt(g.r2)} | "
            f"{_fmt(g.slope)} | {_md_cell(note)} |"
        )
    gap = _bound_gap(runs)
    if gap is not None:
        n, med, above = gap
        lines += [
            "",
            f"**Reading the predictor row.** The ε-scaled predictor is an upper-bound-style quantity "
            f"(SPEC §4: the forward mismatch is at most about predictor × ε_mach, up to constants), "
            f"not an estimate: points are expected on or below y = x. Here the observed mismatch sits "
            f"a median {abs(med):.1f} decade(s) {'below' if med <= 0 else 'above'} the predictor "
            f"({above:.0%} of {n} points above y = x). "
            + (
                "When the points sit far below the line and spread along it, the linear-space slope "
                "measures how loose the bound is for this model (a slope far below 1, even a tiny "
                "negative one, is what a loose but respected bound looks like); read `Pearson_log` and "
                "the scatter plot for whether the predictor *tracks* the mismatch."
                if med < -1
                else "The slope near 1 means the bound is nearly tight here."
                if abs(med) <= 1
                else "Points above y = x mean the bound's constants are too small for this model."
            ),
        ]
        scaled = next((g for g in reg if g.proxy == "combined·ε_mach"), None)
        if scaled is not None and math.isfinite(scaled.pearson_log):
            tracks = scaled.pearson_log >= 0.5
            lines[-1] += (
                f" Here `Pearson_log` = {scaled.pearson_log:.2f}: the predictor "
                + ("tracks the mismatch." if tracks else "does not track the mismatch over these steps.")
            )
    lines += ["", "## Lead–lag: κ_softmax as an early warning (cf. paper Table 3)", ""]
    lines.append(
        f"Signal: `{SIGNAL_TAG}`. Lags in steps (> 0: the signal leads), scanned in ±{params['max_lag']}; "
        f"{params['n_permutations']} permutations (seed {params['seed']}); Prec@K with "
        f"K = {'⌈0.1·T⌉' if params['k'] is None else params['k']}, horizon {params['horizon']}, "
        f"window {params['window']}, Z = {params['z']}."
    )
    lines.append("")
    lines.append(
        "| run | target | T (points) | best lag (steps) | best corr | p-value | Prec@K | note | reading |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in ll:
        lag = "—" if r.lag is None else str(r.lag)
        lines.append(
            f"| {_md_cell(r.run)} | {r.target} | {r.T} | {lag} | {_fmt(r.corr)} | {_fmt_p(r.p_value)} | "
            f"{_fmt(r.precision_at_k)} | {_md_cell(r.note)} | {_md_cell(lead_reading(r))} |"
        )
    for target in dict.fromkeys(r.target for r in ll):
        ok = [r for r in ll if r.target == target and r.lag is not None]
        if len(ok) >= 2:
            prec = [r.precision_at_k for r in ok if math.isfinite(r.precision_at_k)]
            lines.append(
                f"| **mean** | {target} | | {np.mean([r.lag for r in ok]):.1f} | "
                f"{_fmt(float(np.mean([r.corr for r in ok])))} | — | "
                f"{_fmt(float(np.mean(prec)) if prec else math.nan)} | {len(ok)} runs |"
            )
    lines += ["", "## Figures", ""]
    if plots_skipped:
        lines.append(f"No figures: {plots_skipped}.")
    elif not figures:
        lines.append("No figure could be drawn (the needed tags were not logged).")
    for f in figures:
        lines.append(f"![{f.stem}]({f.relative_to(out_dir).as_posix()})")
        lines.append("")
    lines += ["", "## How to read this", "", HOW_TO_READ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def build_report(
    logdir: str | Path,
    out: str | Path | None = None,
    *,
    max_lag: int = 60,
    n_permutations: int = 1000,
    seed: int = 0,
    horizon: int = 40,
    window: int = 20,
    z: float = 1.5,
    k: int | None = None,
    loss_tags: Sequence[str] | None = None,
    plots: bool = True,
    progress: bool = True,
) -> Report:
    """Read the runs under ``logdir`` and write ``report.md`` (and PNGs) into ``out``.

    Args:
        logdir: Log root; every directory below it holding ``events.out.tfevents.*`` is a run.
        out: Output directory; default ``logdir/stability_report``.
        max_lag: Lead–lag scan range in steps (paper: 60).
        n_permutations: Permutations of the lead–lag test (paper: 1000).
        seed: Seed of the permutation test.
        horizon: Prec@K horizon in steps (paper: 40).
        window: Rolling window of the z-scores in steps (paper: 20).
        z: Target spike threshold (paper: 1.5).
        k: Prec@K's K; ``None`` → ``⌈0.1·T⌉``.
        loss_tags: Loss tags to add as lead–lag targets (the paper's "loss" control);
            ``None`` → the first of :data:`LOSS_TAG_CANDIDATES` present in each run.
        plots: Draw the PNGs (needs matplotlib).
        progress: Progress bar while reading event files.

    Returns:
        A :class:`Report` describing what was written.

    Raises:
        NoEventFilesError: When ``logdir`` holds no event file.
    """
    logdir = Path(logdir)
    runs = load_runs(logdir, progress=progress)
    if not runs:
        raise NoEventFilesError(f"no TensorBoard event files (events.out.tfevents.*) under {logdir}")
    out_dir = Path(out) if out is not None else logdir / "stability_report"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {
        "max_lag": max_lag,
        "n_permutations": n_permutations,
        "seed": seed,
        "horizon": horizon,
        "window": window,
        "z": z,
        "k": k,
    }

    reg = _regression_rows(runs)
    ll: list[LeadLagRow] = []
    for run in runs:
        targets = [("fwd error", MISMATCH_TAG)]
        candidates = list(loss_tags) if loss_tags is not None else list(LOSS_TAG_CANDIDATES)
        present = [t for t in candidates if run.get(t) is not None]
        if loss_tags is None:
            present = present[:1]
        targets += [("loss", t) for t in present]
        for name, tag in targets:
            ll.append(
                _leadlag_row(
                    run,
                    name,
                    tag,
                    max_lag=max_lag,
                    n_permutations=n_permutations,
                    seed=seed,
                    horizon=horizon,
                    window=window,
                    z=z,
                    k=k,
                )
            )

    figures: list[Path] = []
    plots_skipped: str | None = None
    if plots:
        Figure = _load_figure_class()
        if Figure is None:
            plots_skipped = MATPLOTLIB_MISSING
            print(MATPLOTLIB_MISSING, file=sys.stderr)
        else:
            rows_by_run = {r.run: r for r in ll if r.target_tag == MISMATCH_TAG}
            slugs = _unique_slugs([run.name for run in runs])
            for run in runs:
                p = out_dir / f"leadlag_{slugs[run.name]}.png"
                if run.name in rows_by_run and _plot_leadlag(Figure, run, rows_by_run[run.name], p):
                    figures.append(p)
            p = out_dir / "predictor_vs_mismatch.png"
            if _plot_scatter(Figure, runs, p):
                figures.append(p)
            for run in runs:
                p = out_dir / f"curves_{slugs[run.name]}.png"
                if _plot_curves(Figure, run, p):
                    figures.append(p)
            for run in runs:
                p = out_dir / f"ln_eps_{slugs[run.name]}.png"
                if _plot_ln_eps(Figure, run, p):
                    figures.append(p)
    else:
        plots_skipped = "plots disabled"

    verdicts = [run_verdict(run) for run in runs]
    md = out_dir / "report.md"
    md.write_text(
        _markdown(logdir, runs, reg, ll, figures, out_dir, params, plots_skipped, verdicts), encoding="utf-8"
    )
    return Report(
        out_dir=out_dir,
        markdown=md,
        runs=[r.name for r in runs],
        regression=reg,
        leadlag=ll,
        figures=figures,
        plots_skipped=plots_skipped,
        verdicts=verdicts,
    )

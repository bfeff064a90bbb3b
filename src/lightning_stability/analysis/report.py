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
steps.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._format import _fmt, _fmt_p, _md_cell, _unique_slugs
from .figures import _load_figure_class, _plot_curves, _plot_leadlag, _plot_ln_eps, _plot_scatter
from .logs import Run, load_runs
from .report_tables import (
    MISMATCH_TAG,
    SIGNAL_TAG,
    LeadLagRow,
    RegressionRow,
    _bound_gap,
    _leadlag_row,
    _regression_rows,
    lead_reading,
)
from .verdict import KappaLead, RunVerdict, run_verdict, verdict_markdown

__all__ = [
    "MATPLOTLIB_MISSING",
    "LeadLagRow",
    "NoEventFilesError",
    "RegressionRow",
    "Report",
    "build_report",
    "lead_reading",
]

MATPLOTLIB_MISSING = 'matplotlib is not installed: pip install "lightning-stability[plot]" to get the plots'


LOSS_TAG_CANDIDATES = ("train_loss", "train/loss", "loss", "train_loss_step", "train/loss_step")


class NoEventFilesError(FileNotFoundError):
    """The log root holds no ``events.out.tfevents.*`` file."""


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


def _verdict_lead(row: LeadLagRow | None) -> KappaLead | None:
    """A run's κ_softmax → r_block test, for the verdict's sentence on κ_softmax (None: it did not run)."""
    if row is None or row.lag is None:
        return None
    reading = lead_reading(row)
    return KappaLead(row.lag, row.p_value, reading.startswith("κ_softmax leads"), reading)


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
    """The text of ``report.md``."""
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
    lines += _regression_section(runs, reg)
    lines += _leadlag_section(ll, params)
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


def _regression_section(runs: Sequence[Run], reg: Sequence[RegressionRow]) -> list[str]:
    """The predictor-vs-mismatch table and how to read its predictor row."""
    lines = ["", "## Predictor vs observed mismatch (cf. paper Table 2)", ""]
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
    return lines


def _leadlag_section(ll: Sequence[LeadLagRow], params: dict[str, Any]) -> list[str]:
    """The lead–lag table, with a mean row per target over the runs where it was computed."""
    lines = ["", "## Lead–lag: κ_softmax as an early warning (cf. paper Table 3)", ""]
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
    return lines


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
    ll = _leadlag_rows(runs, loss_tags, params)
    figures: list[Path] = []
    plots_skipped: str | None = None
    if plots:
        Figure = _load_figure_class()
        if Figure is None:
            plots_skipped = MATPLOTLIB_MISSING
            print(MATPLOTLIB_MISSING, file=sys.stderr)
        else:
            figures = _draw_figures(Figure, runs, ll, out_dir)
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


def _leadlag_rows(
    runs: Sequence[Run], loss_tags: Sequence[str] | None, params: dict[str, Any]
) -> list[LeadLagRow]:
    """Per run: κ_softmax against the mismatch, and against the loss tags (``None``: the first of
    :data:`LOSS_TAG_CANDIDATES` present); ``params``: the lead–lag parameters of :func:`build_report`."""
    ll: list[LeadLagRow] = []
    for run in runs:
        targets = [("fwd error", MISMATCH_TAG)]
        candidates = list(loss_tags) if loss_tags is not None else list(LOSS_TAG_CANDIDATES)
        present = [t for t in candidates if run.get(t) is not None]
        if loss_tags is None:
            present = present[:1]
        targets += [("loss", t) for t in present]
        ll += [_leadlag_row(run, name, tag, **params) for name, tag in targets]
    return ll


def _draw_figures(Figure: Any, runs: Sequence[Run], ll: Sequence[LeadLagRow], out_dir: Path) -> list[Path]:
    """Draw every figure whose tags were logged into ``out_dir``; the paths written, in report order."""
    figures: list[Path] = []
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
    return figures

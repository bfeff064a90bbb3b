"""The report's tables: predictor vs mismatch (the paper's Table 2 shape) and lead–lag (Table 3).

Each row is a record (:class:`RegressionRow`, :class:`LeadLagRow`) computed from the logged
series of :mod:`lightning_stability.analysis.logs`; :func:`lead_reading` says a lead–lag row in
words. Step units and alignment are those of :mod:`lightning_stability.analysis.report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_stability.metrics import BY_NAME, tag

from ._format import _fmt, _fmt_p
from .leadlag import lead_lag, lead_lag_permutation_test
from .logs import Run, Series, align, step_stride
from .regression import predictor_regression
from .spikes import spike_precision_at_k

SIGNAL_TAG = tag(BY_NAME["kappa_softmax_max"])
MISMATCH_TAG = tag(BY_NAME["r_block"])
EPS_TAG = tag(BY_NAME["eps_mach"])
PREDICTOR_SCALED_TAG = tag(BY_NAME["predictor_scaled"])


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


def _block_max(run: Run, name: str) -> Series | None:
    """Per-step max over ``stability/block{i}/<name>`` (steps: union; NaN-ignoring)."""
    tags = [t for _, t in run.block_tags(name)]
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
    row.update(_lead_lag_fields(sv, tv, ml, stride, n_permutations, seed, notes))
    try:
        row["precision_at_k"] = spike_precision_at_k(sv, tv, k=k, horizon=hz, window=win, z=z)
    except ValueError as exc:
        notes.append(f"Prec@K not computed ({exc})")
    return LeadLagRow(**row, note="; ".join(notes))


def _lead_lag_fields(
    sv: np.ndarray, tv: np.ndarray, ml: int, stride: int, n_permutations: int, seed: int, notes: list[str]
) -> dict[str, Any]:
    """The lead–lag fields of a row (lags in steps: samples × ``stride``), or a note why there are none."""
    try:
        ll = lead_lag(sv, tv, max_lag=ml)
        pt = lead_lag_permutation_test(sv, tv, max_lag=ml, n_permutations=n_permutations, seed=seed)
    except ValueError as exc:
        T = int(sv.size)
        if ml + 10 > T:  # lead_lag's min_overlap; say it in logged points and steps, not samples
            notes.append(
                f"lead–lag not computed: series too short: {T} logged points (one every {stride} "
                f"step(s)); a ±{ml * stride}-step scan needs at least {ml + 10} — log more often "
                f"or pass --max-lag {max(0, (T - 10) * stride)}"
            )
        else:
            notes.append(f"lead–lag not computed: {exc}")
        return {}
    return {
        "lag": ll.lag * stride,
        "corr": ll.corr,
        "p_value": pt.p_value,
        "lags": tuple(v * stride for v in ll.lags),
        "curve": ll.curve,
    }


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


def _bound_gap(runs: Sequence[Run]) -> tuple[int, float, float] | None:
    """(points, median log10(mismatch / predictor·ε_mach), fraction above y = x), pooled."""
    ratios = []
    for run in runs:
        p, m = run.get(PREDICTOR_SCALED_TAG), run.get(MISMATCH_TAG)
        if p is None or m is None:
            continue
        _, (pv, mv) = align(p, m)
        ok = np.isfinite(pv) & np.isfinite(mv) & (pv > 0) & (mv > 0)
        ratios.append(np.log10(mv[ok] / pv[ok]))
    if not ratios or not np.concatenate(ratios).size:
        return None
    r = np.concatenate(ratios)
    return int(r.size), float(np.median(r)), float(np.mean(r > 0))

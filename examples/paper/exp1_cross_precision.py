"""Exp-1 of the paper: cross-precision mismatch (Table 2), with the statistics the paper does not report.

Protocol (paper §4.2): pre-LN Tiny-ViT, d_model ∈ {96, 128}, 5 seeds, 160 steps; per
configuration (width, seed, precision) the 95th-percentile tails over the sampled
steps of the block-output mismatch ``r_block`` and of the predictors; then regress
mismatch on ``combined·ε_mach``, ``combined``, ``κ_softmax``, ``κ_score``, ``κ(V)``
(Pearson_log, Spearman, R², slope; :func:`lightning_stability.analysis.predictor_regression`).

Here each (width, seed) is trained **once, in FP32**, and three ``StabilityMonitor``s
measure the same sampled batches under BF16, FP16 and FP32 autocast (the what-if).
The paper trains one run per precision; see docs/REPRODUCTION.md for what that changes.

Added beyond the paper: the regressions **within one precision** (is the correlation
carried by the BF16/FP16 split of ε_mach, or does the predictor rank configurations
at fixed ε_mach?) and, once the monitor logs ``stability/block{i}/r_local``, the same
with the per-block local error as the target.

Usage::

    python examples/paper/exp1_cross_precision.py              # full protocol
    python examples/paper/exp1_cross_precision.py --quick      # CI smoke (seconds)
    python examples/paper/exp1_cross_precision.py --tables_only  # tables from results/exp1*.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    EPS_MACH,
    RunConfig,
    RunResult,
    block_max,
    eta,
    fmt,
    has_tag,
    load_raw,
    load_summary,
    log,
    markdown_table,
    provenance_line,
    run_fit,
    run_info,
    save_raw,
    save_summary,
    series,
)

from lightning_stability.analysis import predictor_regression

NAME = "exp1"
LOW = ("bf16", "fp16")
#: (label, getter kind, name): model-level tag or max over blocks of a per-block tag.
PROXIES = (
    ("combined·ε_mach", "tag", "stability/predictor_scaled"),
    ("combined", "tag", "stability/predictor"),
    ("κ_softmax", "block", "kappa_softmax"),
    ("κ_score", "block", "kappa_score"),
    ("κ(V)", "block", "kappa_v"),
    ("ε_mach alone (control, ours)", "tag", "stability/eps_mach"),
)
#: The paper's Table 2 (mixed precision): Pearson_log, Spearman, R², slope.
PAPER = {
    "combined": (-0.261, -0.124, 0.001, 0.082),
    "combined·ε_mach": (0.984, 0.871, 0.780, 0.827),
    "κ_softmax": (0.101, 0.117, 0.0, 0.017),
    "κ_score": (-0.100, -0.204, 0.027, -1.112),
    "κ(V)": (-0.304, -0.297, 0.0, -0.016),
}
SECONDS_PER_RUN = {
    96: 75.0,
    128: 110.0,
}  # one idle CPU core (timed at 20 steps), 160 steps, 3 monitors every 5 steps; a busy machine takes longer


def get(result: RunResult, precision: str, kind: str, name: str) -> np.ndarray:
    """Values over the sampled steps of a model-level tag or of the per-step max over blocks."""
    if kind == "tag":
        return series(result, precision, name)[1]
    return block_max(result, precision, name)[1]


def tail(values: np.ndarray, q: float = 95.0) -> float:
    """95th percentile over the finite values (NaN when none)."""
    v = values[np.isfinite(values)]
    return float(np.percentile(v, q)) if v.size else math.nan


def config_points(results: list[RunResult], targets: dict[str, tuple[str, str]]) -> list[dict]:
    """One point per (width, seed, measured precision): tails of every proxy and target."""
    points = []
    for r in results:
        for p in r.metrics:
            point = {"d_model": r.config["d_model"], "seed": r.config["seed"], "precision": p}
            for label, kind, name in PROXIES:
                point[label] = tail(get(r, p, kind, name))
            for label, (kind, name) in targets.items():
                point[label] = tail(get(r, p, kind, name))
            points.append(point)
    return points


def summarize(results: list[RunResult], finished: float | None = None) -> dict[str, Any]:
    """The numbers behind the tables: one point per configuration, the set-up and the provenance."""
    targets = {"r_block": ("tag", "stability/r_block"), "r_block_b0": ("tag", "stability/block0/r_block")}
    local = has_tag(results, "r_local")
    if local:
        targets["r_local"] = ("block", "r_local")
    cfg = results[0].config
    return {
        "experiment": NAME,
        "setup": {
            "sample_size": cfg["sample_size"],
            "every": next(iter(cfg["measure"].values())),
            "steps": cfg["steps"],
            "real_data": bool(cfg["data_dir"]),
        },
        "local": local,
        "points": config_points(results, targets),
        "info": run_info(results, finished),
    }


def regression_rows(points: list[dict], target: str, paper: bool) -> list[list[str]]:
    """Table-2 rows (one per proxy) on the given points, optionally beside the paper's numbers."""
    rows = []
    for label, _, _ in PROXIES:
        x = [pt[label] for pt in points]
        y = [pt[target] for pt in points]
        try:
            r = predictor_regression(x, y)
            ours = [fmt(r.pearson_log), fmt(r.spearman), fmt(r.r2), fmt(r.slope), str(r.n)]
        except ValueError as exc:
            ours = ["—"] * 4 + [f"0 ({exc})"]
        row = [label, *ours]
        if paper:
            row += [" / ".join(fmt(v) for v in PAPER[label]) if label in PAPER else "not in the paper"]
        rows.append(row)
    return rows


def within_rows(points: list[dict], targets: list[str]) -> list[list[str]]:
    """``combined·ε_mach`` against each target within one width and one precision (across seeds)."""
    rows = []
    for d in sorted({pt["d_model"] for pt in points}):
        for p in LOW:
            sel = [pt for pt in points if pt["d_model"] == d and pt["precision"] == p]
            for target in targets:
                try:
                    r = predictor_regression(
                        [pt["combined·ε_mach"] for pt in sel], [pt[target] for pt in sel]
                    )
                    rows.append(
                        [str(d), p.upper(), f"`{target}`", fmt(r.pearson_log), fmt(r.spearman), str(r.n)]
                    )
                except ValueError as exc:
                    rows.append([str(d), p.upper(), f"`{target}`", "—", "—", f"0 ({exc})"])
    return rows


def tails_table(points: list[dict], local: bool) -> str:
    """Per (width, measured precision): mean ± std over seeds of each configuration's p95 tails."""
    widths = sorted({pt["d_model"] for pt in points})
    precs = [p for p in ("fp32", "bf16", "fp16") if any(pt["precision"] == p for pt in points)]
    rows = []
    for d in widths:
        for p in precs:
            sel = [pt for pt in points if pt["d_model"] == d and pt["precision"] == p]

            def ms(key: str, sel: list[dict] = sel) -> str:
                v = np.array([pt[key] for pt in sel])
                return f"{fmt(float(np.mean(v)))} ± {fmt(float(np.std(v)))}"

            row = [str(d), p.upper(), fmt(EPS_MACH[p]), ms("r_block_b0"), ms("r_block")]
            row += [ms("combined"), ms("combined·ε_mach")]
            if local:
                row.append(ms("r_local"))
            rows.append(row)
    header = ["d_model", "measured", "ε_mach", "p95 r_block, block 0", "p95 r_block, last block"]
    header += ["p95 combined", "p95 combined·ε_mach"]
    return markdown_table(header + (["p95 max r_local"] if local else []), rows)


REGRESSION_HEADER = ["proxy", "Pearson_log", "Spearman", "R²", "slope", "n"]


def regression_sections(points: list[dict], local: bool) -> list[str]:
    """Table 2 on the mixed points, then within each low precision, then (if logged) on ``r_local``."""
    mixed = [pt for pt in points if pt["precision"] in LOW]
    hdr = REGRESSION_HEADER
    out = [
        "",
        "**Table 2, mixed precision** (BF16 + FP16 points; target p95 `r_block`; "
        "paper: Pearson_log / Spearman / R² / slope):",
        "",
        markdown_table([*hdr, "paper"], regression_rows(mixed, "r_block", paper=True)),
    ]
    for p in LOW:
        sel = [pt for pt in points if pt["precision"] == p]
        out += [
            "",
            f"**Within {p.upper()} only** (ε_mach fixed; not in the paper):",
            "",
            markdown_table(hdr, regression_rows(sel, "r_block", paper=False)),
        ]
    if local:
        for name, sel in (
            ("mixed", mixed),
            *((p.upper(), [pt for pt in points if pt["precision"] == p]) for p in LOW),
        ):
            out += [
                "",
                f"**Target p95 of max-over-blocks `r_local`, {name}** (not in the paper):",
                "",
                markdown_table(hdr, regression_rows(sel, "r_local", paper=False)),
            ]
    else:
        out += [
            "",
            "`stability/block{i}/r_local` was not logged by this version of the monitor: "
            "the r_local tables appear when it is (rerun this script).",
        ]
    return out


def render(summary: dict[str, Any]) -> str:
    """Markdown: configuration tails, then the regressions (mixed, within each precision, r_local)."""
    points, setup, local = summary["points"], summary["setup"], summary["local"]
    widths = sorted({pt["d_model"] for pt in points})
    precs = [p for p in ("fp32", "bf16", "fp16") if any(pt["precision"] == p for pt in points)]
    seeds = sorted({pt["seed"] for pt in points})
    out = [
        f"Trained: FP32 (`32-true`). Measured: {', '.join(p.upper() for p in precs)} autocast what-if "
        f"vs exact FP32 on the same {setup['sample_size']} sampled examples, every {setup['every']} steps. "
        f"Widths {widths}, seeds {seeds}, {setup['steps']} steps, "
        f"{'real CIFAR-10' if setup['real_data'] else 'synthetic CIFAR-shaped data'}.",
        provenance_line(summary["info"]),
        "",
        "**Per-configuration tails** (95th percentile over sampled steps; mean ± std over seeds):",
        "",
        tails_table(points, local),
        *regression_sections(points, local),
        "",
        "**Within one width and one precision** (`combined·ε_mach` against each target across the seeds; "
        "not in the paper):",
        "",
        markdown_table(
            ["d_model", "measured", "target (p95)", "Pearson_log", "Spearman", "n"],
            within_rows(points, ["r_block", "r_local"] if local else ["r_block"]),
        ),
    ]
    return "\n".join(out) + "\n"


def tables(results: list[RunResult]) -> str:
    """Markdown tables of a set of runs (:func:`summarize`, then :func:`render`)."""
    return render(summarize(results))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny model, 6 steps, 2 seeds")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--widths", type=int, nargs="+", default=[96, 128])
    ap.add_argument("--every", type=int, default=5, help="measure every N steps")
    ap.add_argument("--data_dir", default=None, help="CIFAR-10 python batches (default: synthetic)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument(
        "--tables_only",
        action="store_true",
        help="rebuild from <out>/exp1.json, else <out>/exp1_summary.json",
    )
    args = ap.parse_args(argv)
    raw = args.out / f"{NAME}.json"
    if args.tables_only:
        summary = (
            summarize(load_raw(raw), raw.stat().st_mtime) if raw.exists() else load_summary(args.out, NAME)
        )
    else:
        if args.quick:
            args.seeds, args.steps, args.widths, args.every = 2, 6, [32], 2
        configs = [
            RunConfig(
                seed=s,
                steps=args.steps,
                d_model=d,
                depth=2 if args.quick else 6,
                batch_size=16 if args.quick else 64,
                synthetic_size=256 if args.quick else 4096,
                measure={"bf16": args.every, "fp16": args.every, "fp32": args.every},
                sample_size=4 if args.quick else 16,
                data_dir=args.data_dir,
            )
            for s in range(args.seeds)  # seed-major: a job stopped early still has every width
            for d in args.widths
        ]
        expected = sum(SECONDS_PER_RUN.get(c.d_model, 90.0) * c.steps / 160 for c in configs)
        log(f"Exp-1: {len(configs)} runs, expected wall time {eta(1, expected)} on an idle CPU core")
        results = []
        for c in configs:
            results.append(run_fit(c))
            save_raw(args.out, NAME, results)  # after every run: a killed job keeps what it measured
            log(f"d={c.d_model} seed={c.seed}: {results[-1].wall_s:.0f} s")
        summary = summarize(results)
    save_summary(args.out, NAME, summary)
    md = render(summary)
    (args.out / f"{NAME}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

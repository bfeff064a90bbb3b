"""Exp-2 of the paper: does max κ_softmax forecast the forward mismatch? (Table 3)

Protocol (paper §4.3, SPEC §7): FP16, 5 seeds, 195 steps, every step measured.
Per seed: z-score ``stability/kappa_softmax_max`` and ``stability/r_block``, scan
lags in ±60 steps, best lag by correlation
(:func:`~lightning_stability.analysis.lead_lag`), permutation p-value that
re-selects the best lag per permutation
(:func:`~lightning_stability.analysis.lead_lag_permutation_test`, 1000 permutations),
Spike Precision@K with K = ⌈0.1·T⌉, H = 40, window 20, Z = 1.5
(:func:`~lightning_stability.analysis.spike_precision_at_k`). Control rows: the
same statistics with the training **loss** as target (does κ_softmax lead the loss?)
and with the loss as the **signal** for the mismatch (does the loss itself warn?).

Trained in FP32; the monitor measures every step under the FP16 autocast what-if.

Usage::

    python examples/paper/exp2_forecasting.py             # full protocol
    python examples/paper/exp2_forecasting.py --quick     # CI smoke (seconds)
    python examples/paper/exp2_forecasting.py --tables_only
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RunConfig,
    RunResult,
    eta,
    fmt,
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

from lightning_stability.analysis import (
    lead_lag,
    lead_lag_permutation_test,
    spike_precision_at_k,
)

NAME = "exp2"
SIGNAL = "stability/kappa_softmax_max"
TARGET = "stability/r_block"
#: The paper's Table 3 (target fwd error): seed -> (best lag, best corr, p, Prec@K).
PAPER = {
    0: (16, 0.823, 0.001, 0.895),
    1: (19, 0.707, 0.001, 0.947),
    2: (20, 0.674, 0.001, 0.947),
    3: (24, 0.653, 0.001, 1.000),
    4: (19, 0.755, 0.001, 0.895),
}
PAPER_MEAN = (19.6, 0.722, None, 0.937)
SECONDS_PER_RUN = 110.0  # idle CPU core: 195 steps, FP16 what-if every step, d=96


def aligned(result: RunResult) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Signal, mismatch and loss on the common step grid (the loss of the batch the monitor measured)."""
    steps, kappa = series(result, "fp16", SIGNAL)
    s2, r = series(result, "fp16", TARGET)
    if not np.array_equal(steps, s2):
        raise ValueError("kappa_softmax_max and r_block were logged at different steps")
    loss = np.array([result.loss.get(int(s), math.nan) for s in steps])
    return steps, {"kappa": kappa, "r_block": r, "loss": loss}


def stats(signal: np.ndarray, target: np.ndarray, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Best lag, its correlation, permutation p and Precision@K of one (signal, target) pair."""
    out: dict[str, float] = {"lag": math.nan, "corr": math.nan, "p": math.nan, "prec": math.nan}
    out["chance"] = math.nan
    try:
        ll = lead_lag(signal, target, max_lag=args.max_lag)
        pt = lead_lag_permutation_test(
            signal, target, max_lag=args.max_lag, n_permutations=args.permutations, seed=seed
        )
        out.update(lag=ll.lag, corr=ll.corr, p=pt.p_value)
    except ValueError as exc:
        log(f"lead-lag not computed: {exc}")
    try:
        out["prec"] = spike_precision_at_k(signal, target, horizon=args.horizon, window=args.window, z=args.z)
        # chance level: every step with a defined z-score raises an alarm (K = T)
        out["chance"] = spike_precision_at_k(
            signal, target, k=len(signal), horizon=args.horizon, window=args.window, z=args.z
        )
    except ValueError as exc:
        log(f"Precision@K not computed: {exc}")
    return out


PAIRS = (
    ("fwd error", "kappa", "r_block"),
    ("loss (control)", "kappa", "loss"),
    ("fwd error, loss as signal (control)", "loss", "r_block"),
)


def summarize(results: list[RunResult], args: argparse.Namespace, finished: float | None = None) -> dict:
    """The numbers behind the table: each seed's statistics per (signal, target), the series' ends."""
    rows: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in PAIRS}
    ends = []
    T = 0
    for r in results:
        seed = r.config["seed"]
        steps, s = aligned(r)
        T = int(steps.size)
        for label, sig, tgt in PAIRS:
            rows[label].append({"seed": seed, **stats(s[sig], s[tgt], args, seed)})
        tail = slice(-min(20, T), None)
        ends.append(
            {
                "seed": seed,
                "kappa_first": float(s["kappa"][0]),
                "kappa_last20": float(np.median(s["kappa"][tail])),
                "r_block_first": float(s["r_block"][0]),
                "r_block_last20": float(np.median(s["r_block"][tail])),
            }
        )
    cfg = results[0].config
    return {
        "experiment": NAME,
        "setup": {
            "every": cfg["measure"]["fp16"],
            "sample_size": cfg["sample_size"],
            "d_model": cfg["d_model"],
            "steps": cfg["steps"],
            "real_data": bool(cfg["data_dir"]),
            "max_lag": args.max_lag,
            "permutations": args.permutations,
            "horizon": args.horizon,
            "window": args.window,
            "z": args.z,
        },
        "T": T,
        "rows": rows,
        "ends": ends,
        "info": run_info(results, finished),
    }


def pair_rows(label: str, st: list[dict[str, float]]) -> list[list[str]]:
    """One row per seed of one (signal, target) pair (beside the paper's where it has one), then the mean."""
    rows = []
    for x in st:
        row = [
            str(x["seed"]),
            label,
            fmt(x["lag"], 0) if math.isfinite(x["lag"]) else "—",
            fmt(x["corr"]),
            fmt(x["p"]),
            fmt(x["prec"]),
            fmt(x["chance"]),
        ]
        if label == "fwd error" and x["seed"] in PAPER:
            lag, corr, p, prec = PAPER[x["seed"]]
            row.append(f"{lag} / {fmt(corr)} / {fmt(p)} / {fmt(prec)}")
        else:
            row.append("")
        rows.append(row)
    mean = [float(np.nanmean([x[k] for x in st])) for k in ("lag", "corr", "prec", "chance")]
    std = [float(np.nanstd([x[k] for x in st])) for k in ("lag", "corr", "prec", "chance")]
    paper = "19.6 / 0.722 / — / 0.937" if label == "fwd error" else ""
    rows.append(
        [
            "mean ± std",
            label,
            f"{mean[0]:.1f} ± {std[0]:.1f}",
            f"{fmt(mean[1])} ± {fmt(std[1])}",
            f"max {fmt(max(x['p'] for x in st))}",
            f"{fmt(mean[2])} ± {fmt(std[2])}",
            f"{fmt(mean[3])} ± {fmt(std[3])}",
            paper,
        ]
    )
    return rows


def head_lines(summary: dict) -> list[str]:
    """The set-up, the statistics' parameters and the provenance, above the table."""
    setup, T = summary["setup"], summary["T"]
    seeds = [x["seed"] for x in summary["ends"]]
    k = math.ceil(0.1 * T)
    return [
        f"Trained: FP32 (`32-true`). Measured: FP16 autocast what-if vs exact FP32, every "
        f"{setup['every']} step(s), {setup['sample_size']} sampled examples. d_model={setup['d_model']}, "
        f"{setup['steps']} steps (T = {T} measured), seeds {seeds}, "
        f"{'real CIFAR-10' if setup['real_data'] else 'synthetic CIFAR-shaped data'}.",
        f"Lags ±{setup['max_lag']} (positive: the signal leads), {setup['permutations']} permutations "
        f"re-selecting the lag, Precision@K with K = ⌈0.1·T⌉ = {k}, H = {setup['horizon']}, "
        f"window {setup['window']}, Z = {setup['z']}.",
        provenance_line(summary["info"]),
        "'chance Prec (K = T)': the same precision with every step as an alarm — what Prec@K is worth "
        "without a signal.",
        "",
    ]


def ends_table(ends: list[dict]) -> str:
    """Per seed: the signal and the mismatch at the first step and over the last 20 measured steps."""
    return markdown_table(
        [
            "seed",
            "max κ_softmax: first step",
            "median of the last 20",
            "r_block: first step",
            "median of the last 20",
        ],
        [
            [
                str(e["seed"]),
                fmt(e["kappa_first"]),
                fmt(e["kappa_last20"]),
                fmt(e["r_block_first"]),
                fmt(e["r_block_last20"]),
            ]
            for e in ends
        ],
    )


def render(summary: dict) -> str:
    """Markdown: one row per seed and (signal, target), the means, and the series' ends."""
    rows = [row for label, st in summary["rows"].items() for row in pair_rows(label, st)]
    table = markdown_table(
        [
            "seed",
            "target",
            "best lag",
            "best corr",
            "p-value",
            "Prec@K",
            "chance Prec (K = T)",
            "paper (lag / corr / p / Prec@K)",
        ],
        rows,
    )
    return (
        "\n".join(head_lines(summary))
        + "\n"
        + table
        + "\n\n**The two series over the run** (FP16 what-if; the first row's signal and target):\n\n"
        + ends_table(summary["ends"])
        + "\n"
    )


def tables(results: list[RunResult], args: argparse.Namespace) -> str:
    """Markdown table of a set of runs (:func:`summarize`, then :func:`render`)."""
    return render(summarize(results, args))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny model, 40 steps, 1 seed")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=195)
    ap.add_argument("--d_model", type=int, default=96)
    ap.add_argument("--max_lag", type=int, default=60)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--horizon", type=int, default=40)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--z", type=float, default=1.5)
    ap.add_argument("--data_dir", default=None, help="CIFAR-10 python batches (default: synthetic)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument(
        "--tables_only",
        action="store_true",
        help="rebuild from <out>/exp2.json, else <out>/exp2_summary.json",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.d_model = 1, 40, 32
        args.max_lag, args.horizon, args.window, args.permutations = 10, 8, 5, 50
    raw = args.out / f"{NAME}.json"
    if args.tables_only:
        if raw.exists():
            summary = summarize(load_raw(raw), args, raw.stat().st_mtime)
        else:
            summary = load_summary(args.out, NAME)
    else:
        configs = [
            RunConfig(
                seed=s,
                steps=args.steps,
                d_model=args.d_model,
                depth=2 if args.quick else 6,
                batch_size=16 if args.quick else 64,
                synthetic_size=256 if args.quick else 4096,
                measure={"fp16": 1},
                sample_size=4 if args.quick else 16,
                data_dir=args.data_dir,
            )
            for s in range(args.seeds)
        ]
        log(
            f"Exp-2: {len(configs)} runs, expected wall time "
            f"{eta(len(configs), SECONDS_PER_RUN * args.steps / 195 * (0.1 if args.quick else 1))}"
        )
        results = []
        for c in configs:
            results.append(run_fit(c))
            save_raw(args.out, NAME, results)
            log(f"seed={c.seed}: {results[-1].wall_s:.0f} s")
        summary = summarize(results, args)
    save_summary(args.out, NAME, summary)
    md = render(summary)
    (args.out / f"{NAME}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

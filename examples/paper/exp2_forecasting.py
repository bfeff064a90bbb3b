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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RunConfig,
    RunResult,
    environment,
    eta,
    fmt,
    load_raw,
    log,
    markdown_table,
    provenance,
    run_fit,
    save_raw,
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


def tables(results: list[RunResult], args: argparse.Namespace, wall: float | None, command: str) -> str:
    rows_by_target: dict[str, list[list[str]]] = {}
    summary: dict[str, list[dict[str, float]]] = {}
    pairs = (
        ("fwd error", "kappa", "r_block"),
        ("loss (control)", "kappa", "loss"),
        ("fwd error, loss as signal (control)", "loss", "r_block"),
    )
    T = 0
    for r in results:
        seed = r.config["seed"]
        steps, s = aligned(r)
        T = int(steps.size)
        for label, sig, tgt in pairs:
            st = stats(s[sig], s[tgt], args, seed)
            summary.setdefault(label, []).append(st)
            row = [
                str(seed),
                label,
                fmt(st["lag"], 0) if math.isfinite(st["lag"]) else "—",
                fmt(st["corr"]),
                fmt(st["p"]),
                fmt(st["prec"]),
                fmt(st["chance"]),
            ]
            if label == "fwd error" and seed in PAPER:
                lag, corr, p, prec = PAPER[seed]
                row.append(f"{lag} / {fmt(corr)} / {fmt(p)} / {fmt(prec)}")
            else:
                row.append("")
            rows_by_target.setdefault(label, []).append(row)
    rows = []
    for label, rs in rows_by_target.items():
        rows += rs
        st = summary[label]
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
    cfg = results[0].config
    k = math.ceil(0.1 * T)
    head = [
        f"Trained: FP32 (`32-true`). Measured: FP16 autocast what-if vs exact FP32, every "
        f"{cfg['measure']['fp16']} step(s), {cfg['sample_size']} sampled examples. d_model={cfg['d_model']}, "
        f"{cfg['steps']} steps (T = {T} measured), seeds {[r.config['seed'] for r in results]}, "
        f"{'real CIFAR-10' if cfg['data_dir'] else 'synthetic CIFAR-shaped data'}.",
        f"Lags ±{args.max_lag} (positive: the signal leads), {args.permutations} permutations re-selecting "
        f"the lag, Precision@K with K = ⌈0.1·T⌉ = {k}, H = {args.horizon}, "
        f"window {args.window}, Z = {args.z}.",
        provenance(command, wall, results),
        f"Environment: {environment()}",
        "'chance Prec (K = T)': the same precision with every step as an alarm — what Prec@K is worth "
        "without a signal.",
        "",
    ]
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
    return "\n".join(head) + "\n" + table + "\n"


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
    ap.add_argument("--tables_only", action="store_true", help="rebuild the table from <out>/exp2.json")
    args = ap.parse_args(argv)
    command = "python examples/paper/exp2_forecasting.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.quick:
        args.seeds, args.steps, args.d_model = 1, 40, 32
        args.max_lag, args.horizon, args.window, args.permutations = 10, 8, 5, 50
    if args.tables_only:
        results, wall = load_raw(args.out / f"{NAME}.json"), None
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
        start = time.perf_counter()
        results = []
        for c in configs:
            results.append(run_fit(c))
            save_raw(args.out, NAME, results)
            log(f"seed={c.seed}: {results[-1].wall_s:.0f} s")
        wall = time.perf_counter() - start
    md = tables(results, args, wall, command)
    (args.out / f"{NAME}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

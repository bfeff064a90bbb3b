"""Candidates for the probe's weight terms, side by side: time and accuracy against float64 ``svdvals``.

The probe needs, per weight, ``σmax`` (``‖W_O‖₂``) and for ``κ(W)`` also ``σmin``, to 1e-4
relative. Compared on Llama-shaped matrices (FFN ``I × d`` with ``I = 8d/3`` rounded up to 256, as
Llama's configs; ``W_O`` ``d × d``), at random init (Gaussian, std 0.02, as transformers
initializes) and with a prescribed ill-conditioned spectrum (``κ = 100``, log-spaced: small gaps
at the bottom):

- both ends: ``exact`` (``linear.extreme_singular_values``: float64 Gram ``eigvalsh``, ``svdvals``
  above κ = 10³), ``svdvals`` (float64), ``dense`` (``extremal``'s dense route: upper block
  triangle of the Gram, ``eigvalsh``, rounding-model bound), ``mixed`` (``extremal``'s float32 Gram
  + Cholesky + block Krylov, float64 certificate, fallbacks), ``certified`` (what the probe
  calls: ``extremal.singular_value_bounds`` with its thresholds — LU route for square matrices
  from ``SQUARE_MIN_N``, mixed from ``MIXED_MIN_N``), ``lobpcg`` (``torch.lobpcg`` on the
  float64 Gram, both ends; with ``--lobpcg``, up to d = 1024);
- ``σmax`` alone: ``exact`` (the same call as above: what ``weight_spectra="exact"`` pays for ``‖W_O‖₂``),
  ``dense``, ``krylov`` (``extremal.largest_singular_value``: float32 block Krylov on ``WᵀW``
  without forming it, float64 certificate), ``power`` (float64 power iteration to a relative
  change below 1e-7: no certificate, for the iteration count).

Times are medians of interleaved repetitions; by default CPU seconds of this process with one
torch thread (robust to other jobs on a shared machine), ``--threads 2`` for wall seconds.

    python examples/benchmarks/bench_extremal_sv.py [--d 512 768 1024] [--reps 3] [--threads 1]
                                                    [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timing helpers

from bench_overhead import machine_line

from lightning_stability.diagnostics import extremal, linear

Result = tuple[Tensor, Tensor]


def ffn_width(d: int) -> int:
    """Llama's intermediate size: ``2·4d/3`` rounded up to a multiple of 256."""
    return 256 * math.ceil(int(8 * d / 3) / 256)


def matrices(d: int, kind: str, count: int) -> dict[str, Tensor]:
    """``count`` FFN-shaped and ``count`` ``W_O``-shaped float64 matrices of the given kind."""
    gen = torch.Generator().manual_seed(d)
    out: dict[str, Tensor] = {}
    for name, (m, n) in (("ffn", (ffn_width(d), d)), ("wo", (d, d))):
        if kind == "init":
            out[name] = torch.randn(count, m, n, generator=gen, dtype=torch.float64) * 0.02
        else:
            s = torch.logspace(0, -2, n, dtype=torch.float64)
            u = torch.linalg.qr(torch.randn(count, m, n, generator=gen, dtype=torch.float64)).Q
            v = torch.linalg.qr(torch.randn(count, n, n, generator=gen, dtype=torch.float64)).Q
            out[name] = (u * s) @ v.mT
    return out


def power(w: Tensor, tol: float = 1e-7, cap: int = 5000) -> tuple[Tensor, int]:
    """Float64 power iteration on ``WᵀW`` until the estimate changes by less than ``tol``."""
    x = torch.ones(w.shape[0], w.shape[-1], 1, dtype=w.dtype)
    est = torch.zeros(w.shape[0], dtype=w.dtype)
    for it in range(1, cap + 1):
        y = w.mT @ (w @ x)
        new = y.norm(dim=(-2, -1)).sqrt()
        x = y / y.norm(dim=(-2, -1), keepdim=True)
        if bool(((new - est).abs() <= tol * new).all()):
            return new, it
        est = new
    return est, cap


def lobpcg_both(w: Tensor) -> Result:
    hi, lo = [], []
    for x in w:
        g = x.mT @ x
        top = torch.lobpcg(g, k=1, largest=True, tol=1e-10, niter=2000)[0]
        bottom = torch.lobpcg(g, k=1, largest=False, tol=1e-10, niter=2000)[0]
        hi.append(top.sqrt())
        lo.append(bottom.clamp_min(0).sqrt())
    return torch.cat(hi), torch.cat(lo)


def routed(w: Tensor, mixed_min_n: int, square_min_n: int) -> Result:
    """``singular_value_bounds`` with the routes' thresholds set for one call."""
    saved = extremal.MIXED_MIN_N, extremal.SQUARE_MIN_N
    extremal.MIXED_MIN_N, extremal.SQUARE_MIN_N = mixed_min_n, square_min_n
    try:
        hi, lo, _, _ = extremal.singular_value_bounds(w)
    finally:
        extremal.MIXED_MIN_N, extremal.SQUARE_MIN_N = saved
    return hi, lo


def mixed(w: Tensor) -> Result:
    return routed(w, 0, 1 << 30)


def dense(w: Tensor) -> Result:
    return routed(w, 1 << 30, 1 << 30)


def certified(w: Tensor) -> Result:
    """What the probe calls by default: every route at its default threshold."""
    hi, lo, _, _ = extremal.singular_value_bounds(w)
    return hi, lo


def candidates(d: int, lobpcg: bool = False) -> dict[str, dict[str, Callable[[Tensor], Any]]]:
    """The candidates run at width ``d`` (the slow ones only where they finish in seconds)."""
    both: dict[str, Callable[[Tensor], Any]] = {"exact": linear.extreme_singular_values}
    if d <= 2048:
        both["svdvals"] = lambda w: (lambda s: (s[..., 0], s[..., -1]))(torch.linalg.svdvals(w))
    both.update({"dense": dense, "mixed": mixed, "certified": certified})
    if lobpcg and d <= 1024:
        both["lobpcg"] = lobpcg_both
    top: dict[str, Callable[[Tensor], Any]] = {
        "exact": linear.extreme_singular_values,
        "dense": lambda w: extremal._dense(extremal.tall(w))[:1],
        "krylov": extremal.largest_singular_value,
    }
    if d <= 1024:
        top["power"] = power
    return {"both": both, "top": top}


def timed(fn: Callable[[], Any], wall: bool) -> tuple[float, Any]:
    clock = time.perf_counter if wall else time.process_time
    t0 = clock()
    out = fn()
    return clock() - t0, out


def bench(d: int, kind: str, cfg: argparse.Namespace) -> list[dict[str, Any]]:
    mats = matrices(d, kind, cfg.count)
    rows: list[dict[str, Any]] = []
    for need, table in candidates(d, getattr(cfg, "lobpcg", False)).items():
        for which, w in mats.items():
            if need == "top" and which == "ffn":
                continue  # σmax alone is what W_O needs; the FFN weights need both ends
            ref = torch.linalg.svdvals(w)
            times: dict[str, list[float]] = {k: [] for k in table}
            outs: dict[str, Any] = {}
            for _ in range(cfg.reps):
                for name, fn in table.items():
                    seconds, outs[name] = timed(lambda fn=fn, w=w: fn(w), cfg.threads > 1)
                    times[name].append(seconds / w.shape[0])
            for name, out in outs.items():
                row: dict[str, Any] = {
                    "d": d,
                    "matrix": which,
                    "shape": list(w.shape[1:]),
                    "kind": kind,
                    "need": need,
                    "candidate": name,
                    "seconds_per_matrix": statistics.median(times[name]),
                    "rel_err_max": float(((out[0] - ref[:, 0]) / ref[:, 0]).abs().max()),
                }
                if name == "power":
                    row["iterations"] = out[1]
                if need == "both":
                    row["rel_err_min"] = float(((out[1] - ref[:, -1]) / ref[:, -1]).abs().max())
                    kappa, ref_kappa = out[0] / out[1], ref[:, 0] / ref[:, -1]
                    row["rel_err_kappa"] = float(((kappa - ref_kappa) / ref_kappa).abs().max())
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, nargs="+", default=[256, 512, 768, 1024, 1536, 2048])
    ap.add_argument("--kinds", nargs="+", default=["init", "kappa100"], choices=["init", "kappa100"])
    ap.add_argument("--count", type=int, default=2, help="matrices of each shape (a stack)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lobpcg", action="store_true", help="also torch.lobpcg (slow) up to d = 1024")
    ap.add_argument("--out", type=Path)
    cfg = ap.parse_args()
    torch.set_num_threads(cfg.threads)
    machine = machine_line(torch.device("cpu"))
    print(machine, flush=True)
    rows = [row for d in cfg.d for kind in cfg.kinds for row in bench(d, kind, cfg)]
    result = {
        "command": "python examples/benchmarks/bench_extremal_sv.py " + " ".join(sys.argv[1:]),
        "machine_before": machine,
        "machine_after": machine_line(torch.device("cpu")),
        "clock": "wall" if cfg.threads > 1 else "process CPU",
        "rows": rows,
    }
    if cfg.out:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

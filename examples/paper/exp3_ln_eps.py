"""Exp-3 of the paper: LayerNorm-ε bump (Algorithm 1), matched control vs intervention (Table 4).

Protocol (paper §4.4, SPEC §6): every t = 5 steps, on a 16-example sub-batch, each
LayerNorm with ``ρ_LN(ε) < 1`` gets ``ε_new = clip(median σ²·d·ε_mach/ρ*, ε_min, ε_max)``
if that is larger than its ε (:class:`~lightning_stability.LNEpsilonBump`). Sweep
ρ* ∈ {0.5, 0.6, 0.7} × ε_max ∈ {5e-3, 1e-2}, ε_min = 1e-6, 5 seeds, FP16, 195 steps.
Control and intervention of a seed share the initial weights and the minibatch order
(the data module's shuffle generator is seeded by the seed; the model has no dropout
and both callbacks restore the RNG state), so the only difference is the ε bump.
Reported: tail means over the last 50 steps of the training loss and of the forward
mismatch ``r_block`` (FP16 what-if, measured every 5 steps), Δ = control − intervention
(positive = the bump helped) as mean and sample std over seeds; how many layers were
bumped and when.

Trained in FP32; ρ_LN uses FP16's ε_mach = 2⁻¹⁰ (``LNEpsilonBump(eps_mach=2**-10)``) and
the mismatch is the FP16 autocast what-if.

Two model configurations: ``paper`` (the Tiny-ViT as in the paper) and ``ours`` (not in
the paper): the token embedding multiplied by a constant ``--ours_embed_scale`` (0.01),
which puts the first block's norms in the ε-dominated regime, because in the ``paper``
configuration no norm is ε-dominated (ρ_LN ≈ 3000 at init).

Usage::

    python examples/paper/exp3_ln_eps.py                 # full protocol (both configurations)
    python examples/paper/exp3_ln_eps.py --quick         # CI smoke (seconds)
    python examples/paper/exp3_ln_eps.py --tables_only
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    EPS_MACH,
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

NAME = "exp3"
#: The paper's Table 4: (ρ*, cap) -> (Δloss, std, Δr, std).
PAPER = {
    (0.5, 0.005): (-4.452e-3, 1.961e-2, 1.766e-5, 2.982e-5),
    (0.5, 0.01): (-7.939e-3, 8.202e-3, 1.114e-5, 2.198e-5),
    (0.6, 0.005): (-5.422e-3, 1.976e-2, 1.1e-5, 3.519e-5),
    (0.6, 0.01): (9.265e-3, 1.892e-2, -1.839e-5, 3.858e-5),
    (0.7, 0.005): (9.795e-3, 2.055e-2, -1.081e-5, 5.336e-5),
    (0.7, 0.01): (4.433e-3, 7.523e-3, 2.828e-6, 5.117e-5),
}
SECONDS_PER_RUN = 60.0  # idle CPU core: 195 steps, FP16 what-if every 5 steps, d=96


def tail_means(r: RunResult, last: int) -> tuple[float, float]:
    """Mean training loss over the last ``last`` steps and mean measured ``r_block`` in that window."""
    end = r.config["steps"]
    loss = [v for s, v in r.loss.items() if s > end - last]
    steps, rb = series(r, "fp16", "stability/r_block")
    sel = rb[steps > end - last]
    return float(np.mean(loss)), float(np.mean(sel)) if sel.size else math.nan


def sd(v: list[float]) -> float:
    """Sample standard deviation (NaN for a single seed)."""
    return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def key(r: RunResult) -> tuple[str, int, float | None, float | None]:
    """``(configuration, seed, ρ*, cap)`` of a run (``ρ*``, ``cap`` None for a control)."""
    return config_key(r.config)


def config_key(cfg: dict) -> tuple[str, int, float | None, float | None]:
    b = cfg["ln_bump"]
    name = "ours" if cfg["embed_scale"] != 1.0 else "paper"
    return (name, cfg["seed"], b["target_rho"] if b else None, b["eps_max"] if b else None)


def rho_extremes(controls: list[RunResult]) -> dict[str, float] | None:
    """Min over blocks of ρ_LN (FP16 ε_mach) in the controls: at the first measured step and overall."""
    first, whole = [], []
    for r in controls:
        rows = r.metrics["fp16"]
        mins = [min(v for t, v in m.items() if t.endswith("/rho_ln")) for _, m in sorted(rows.items())]
        if mins:
            first.append(mins[0])
            whole.append(min(mins))
    if not first:
        return None
    return {"first_min": min(first), "first_max": max(first), "lowest": min(whole)}


def _cell(controls: dict[int, RunResult], inters: dict[int, RunResult], last: int) -> dict[str, Any]:
    """Per-seed Δ and bump record of one (ρ*, cap) cell against the matched controls."""
    cell: dict[str, Any] = {"dloss": [], "dr": [], "n_bumped": [], "when": [], "eps_to": [], "identical": 0}
    for seed, ctrl in sorted(controls.items()):
        inter = inters.get(seed)
        if inter is None:
            continue
        lc, rc = tail_means(ctrl, last)
        li, ri = tail_means(inter, last)
        cell["dloss"].append(lc - li)
        cell["dr"].append(rc - ri)
        cell["n_bumped"].append(len(inter.bumped_layers))
        cell["when"] += [b["step"] for b in inter.bumps]
        cell["eps_to"] += [b["eps_to"] for b in inter.bumps]
        cell["identical"] += int(inter.loss == ctrl.loss)
    return cell


def summarize(results: list[RunResult], last: int, finished: float | None = None) -> dict[str, Any]:
    """The numbers behind the tables: per configuration its controls and, per cell, each seed's Δ."""
    by_key = {key(r): r for r in results}
    configs = []
    for cname in [c for c in ("paper", "ours") if any(k[0] == c for k in by_key)]:
        controls = {k[1]: r for k, r in by_key.items() if k[0] == cname and k[2] is None}
        cells = []
        for rho, cap in sorted({(k[2], k[3]) for k in by_key if k[0] == cname and k[2] is not None}):
            inters = {k[1]: r for k, r in by_key.items() if k[0] == cname and (k[2], k[3]) == (rho, cap)}
            cell = _cell(controls, inters, last)
            if cell["dloss"]:
                cells.append({"rho": rho, "cap": cap, **cell})
        base = [tail_means(r, last) for r in controls.values()]
        configs.append(
            {
                "name": cname,
                "embed_scale": next(r.config["embed_scale"] for k, r in by_key.items() if k[0] == cname),
                "control_loss": float(np.mean([b[0] for b in base])),
                "control_r_block": float(np.mean([b[1] for b in base])),
                "rho_ln": rho_extremes(list(controls.values())),
                "bumped_layers": sorted(
                    {n for k, r in by_key.items() if k[0] == cname for n in r.bumped_layers}
                ),
                "cells": cells,
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
            "last": last,
            "real_data": bool(cfg["data_dir"]),
        },
        "configs": configs,
        "info": run_info(results, finished),
    }


def _cell_row(cell: dict[str, Any], paper: tuple[float, ...] | None) -> list[str]:
    nb, when, top = cell["n_bumped"], cell["when"], cell["eps_to"]
    bumps = (
        f"{np.mean(nb):.1f} (max {max(nb)}); steps {min(when)}–{max(when)}, {len(when)} bumps, "
        f"largest ε {fmt(max(top))}"
        if when
        else "0"
    )
    return [
        str(cell["rho"]),
        str(cell["cap"]),
        fmt(float(np.mean(cell["dloss"]))),
        fmt(sd(cell["dloss"])),
        fmt(float(np.mean(cell["dr"]))),
        fmt(sd(cell["dr"])),
        str(len(cell["dloss"])),
        bumps,
        f"{cell['identical']}/{len(cell['dloss'])}",
        " / ".join(fmt(v) for v in paper) if paper else "",
    ]


def render(summary: dict[str, Any]) -> str:
    """Markdown: per configuration its controls, then one row per (ρ*, cap) cell."""
    setup = summary["setup"]
    out = []
    for c in summary["configs"]:
        rows = [
            _cell_row(cell, PAPER.get((cell["rho"], cell["cap"])) if c["name"] == "paper" else None)
            for cell in c["cells"]
        ]
        title = (
            "the paper's Tiny-ViT"
            if c["name"] == "paper"
            else f"**ours, not in the paper**: token embedding × {c['embed_scale']} (ε-dominated first block)"
        )
        rho = c["rho_ln"]
        rho_text = (
            "ρ_LN not logged"
            if rho is None
            else f"min over blocks of ρ_LN (FP16 ε_mach) in the controls: first measured step "
            f"{fmt(rho['first_min'])}…{fmt(rho['first_max'])}, lowest over the run {fmt(rho['lowest'])}"
        )
        out += [
            f"**{c['name']}** — {title}. Control tail loss {fmt(c['control_loss'])}, "
            f"control tail r_block {fmt(c['control_r_block'])} (means over seeds). {rho_text}.",
            f"Layers bumped in any run: {', '.join(f'`{n}`' for n in c['bumped_layers']) or 'none'}.",
            "",
            markdown_table(
                [
                    "ρ*",
                    "cap",
                    "Δloss",
                    "std",
                    "Δr",
                    "std",
                    "seeds",
                    "layers bumped (mean per run); when",
                    "identical to control",
                    "paper (Δloss / std / Δr / std)",
                ],
                rows,
            ),
            "",
        ]
    head = [
        f"Trained: FP32 (`32-true`). ρ_LN with FP16 ε_mach = {fmt(EPS_MACH['fp16'])}; "
        f"r_block measured by the FP16 autocast what-if every {setup['every']} steps "
        f"on {setup['sample_size']} examples. "
        f"d_model={setup['d_model']}, {setup['steps']} steps, tails over the last {setup['last']} steps, "
        f"{'real CIFAR-10' if setup['real_data'] else 'synthetic CIFAR-shaped data'}. "
        "Δ = control − intervention (positive: the bump helped), mean and sample std over seeds; "
        "'identical to control' counts seeds whose intervention loss curve equals the control's bit for bit.",
        provenance_line(summary["info"]),
        "",
    ]
    return "\n".join(head + out)


def tables(results: list[RunResult], last: int) -> str:
    """Markdown tables of a set of runs (:func:`summarize`, then :func:`render`)."""
    return render(summarize(results, last))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--quick`` shrinks the sweep to one seed and one cell)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny model, 20 steps, 1 seed, 1 cell")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=195)
    ap.add_argument("--d_model", type=int, default=96)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--caps", type=float, nargs="+", default=[5e-3, 1e-2])
    ap.add_argument("--configs", nargs="+", choices=["paper", "ours"], default=["paper", "ours"])
    ap.add_argument(
        "--paper_seeds", type=int, default=None, help="seeds of the `paper` configuration (reduced runs)"
    )
    ap.add_argument("--ours_embed_scale", type=float, default=0.01)
    ap.add_argument("--last", type=int, default=50, help="tail window (steps)")
    ap.add_argument("--data_dir", default=None, help="CIFAR-10 python batches (default: synthetic)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default=NAME, help="file stem of the outputs under --out")
    ap.add_argument("--resume", action="store_true", help="keep the runs in <out>/<name>.json, run the rest")
    ap.add_argument(
        "--tables_only",
        action="store_true",
        help="rebuild from <out>/<name>.json, else <out>/<name>_summary.json",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.d_model, args.rhos, args.caps, args.last = 1, 20, 32, [0.6], [1e-2], 10
    return args


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """Seed-major: per seed and configuration, the control then one run per (ρ*, cap) cell."""
    small = {"depth": 2, "batch_size": 16, "synthetic_size": 256, "sample_size": 4} if args.quick else {}
    configs = []
    for seed, cname in itertools.product(range(args.seeds), args.configs):  # seed-major (see Exp-1)
        if cname == "paper" and args.paper_seeds is not None and seed >= args.paper_seeds:
            continue
        scale = 1.0 if cname == "paper" else args.ours_embed_scale
        bumps = [None] + [
            {
                "target_rho": rho,
                "eps_min": 1e-6,
                "eps_max": cap,
                "every_n_steps": 5,
                "sample_size": 16,
                "eps_mach": EPS_MACH["fp16"],
            }
            for rho, cap in itertools.product(args.rhos, args.caps)
        ]
        configs += [
            RunConfig(
                seed=seed,
                steps=args.steps,
                d_model=args.d_model,
                embed_scale=scale,
                measure={"fp16": 5},
                ln_bump=b,
                data_dir=args.data_dir,
                **small,
            )
            for b in bumps
        ]
    return configs


def run_all(args: argparse.Namespace, raw: Path) -> list[RunResult]:
    """Every run of the sweep (with ``--resume``, those not already in ``raw``), saved after each."""
    configs = run_configs(args)
    log(
        f"Exp-3: {len(configs)} runs, expected wall time "
        f"{eta(len(configs), SECONDS_PER_RUN * args.steps / 195 * (0.05 if args.quick else 1))}"
    )
    results = []
    if args.resume and raw.exists():
        results = load_raw(raw)
        done = {key(r) for r in results}
        configs = [c for c in configs if config_key(asdict(c)) not in done]
        log(f"resuming: {len(results)} runs loaded, {len(configs)} to go")
    for c in configs:
        results.append(run_fit(c))
        save_raw(args.out, args.name, results)
        r = results[-1]
        log(f"{key(r)}: {r.wall_s:.0f} s, bumped {len(r.bumped_layers)} layers")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raw = args.out / f"{args.name}.json"
    if args.tables_only:
        if raw.exists():
            summary = summarize(load_raw(raw), args.last, raw.stat().st_mtime)
        else:
            summary = load_summary(args.out, args.name)
    else:
        summary = summarize(run_all(args, raw), args.last)
    save_summary(args.out, args.name, summary)
    md = render(summary)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

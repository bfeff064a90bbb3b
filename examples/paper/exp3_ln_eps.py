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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    EPS_MACH,
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


def rho_summary(controls: list[RunResult]) -> str:
    """Min over blocks of ρ_LN (FP16 ε_mach) at the first measured step and over the whole run."""
    first, whole = [], []
    for r in controls:
        rows = r.metrics["fp16"]
        mins = [min(v for t, v in m.items() if t.endswith("/rho_ln")) for _, m in sorted(rows.items())]
        if mins:
            first.append(mins[0])
            whole.append(min(mins))
    if not first:
        return "ρ_LN not logged"
    return (
        f"min over blocks of ρ_LN (FP16 ε_mach) in the controls: first measured step "
        f"{fmt(min(first))}…{fmt(max(first))}, lowest over the run {fmt(min(whole))}"
    )


def tables(results: list[RunResult], last: int, wall: float | None, command: str) -> str:
    by_key = {key(r): r for r in results}
    out = []
    configs = [c for c in ("paper", "ours") if any(k[0] == c for k in by_key)]
    any_cfg = results[0].config
    for cname in configs:
        controls = {k[1]: r for k, r in by_key.items() if k[0] == cname and k[2] is None}
        cells = sorted({(k[2], k[3]) for k in by_key if k[0] == cname and k[2] is not None})
        scale = next(r.config["embed_scale"] for k, r in by_key.items() if k[0] == cname)
        rows = []
        layers: set[str] = set()
        for rho, cap in cells:
            dl, dr, nb, when, top, same = [], [], [], [], [], 0
            for seed, ctrl in sorted(controls.items()):
                inter = by_key.get((cname, seed, rho, cap))
                if inter is None:
                    continue
                lc, rc = tail_means(ctrl, last)
                li, ri = tail_means(inter, last)
                dl.append(lc - li)
                dr.append(rc - ri)
                nb.append(len(inter.bumped_layers))
                when += [b["step"] for b in inter.bumps]
                top += [b["eps_to"] for b in inter.bumps]
                layers.update(inter.bumped_layers)
                same += int(inter.loss == ctrl.loss)
            if not dl:
                continue
            bumps = (
                f"{np.mean(nb):.1f} (max {max(nb)}); steps {min(when)}–{max(when)}, {len(when)} bumps, "
                f"largest ε {fmt(max(top))}"
                if when
                else "0"
            )
            paper = PAPER.get((rho, cap)) if cname == "paper" else None
            rows.append(
                [
                    str(rho),
                    str(cap),
                    fmt(float(np.mean(dl))),
                    fmt(sd(dl)),
                    fmt(float(np.mean(dr))),
                    fmt(sd(dr)),
                    str(len(dl)),
                    bumps,
                    f"{same}/{len(dl)}",
                    " / ".join(fmt(v) for v in paper) if paper else "",
                ]
            )
        title = (
            "the paper's Tiny-ViT"
            if cname == "paper"
            else f"**ours, not in the paper**: token embedding × {scale} (ε-dominated first block)"
        )
        ctrl_list = list(controls.values())
        base = [tail_means(r, last) for r in ctrl_list]
        out += [
            f"**{cname}** — {title}. Control tail loss {fmt(float(np.mean([b[0] for b in base])))}, "
            f"control tail r_block {fmt(float(np.mean([b[1] for b in base])))} (means over seeds). "
            f"{rho_summary(ctrl_list)}.",
            f"Layers bumped in any run: {', '.join(f'`{n}`' for n in sorted(layers)) or 'none'}.",
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
        f"r_block measured by the FP16 autocast what-if every {any_cfg['measure']['fp16']} steps "
        f"on {any_cfg['sample_size']} examples. "
        f"d_model={any_cfg['d_model']}, {any_cfg['steps']} steps, tails over the last {last} steps, "
        f"{'real CIFAR-10' if any_cfg['data_dir'] else 'synthetic CIFAR-shaped data'}. "
        "Δ = control − intervention (positive: the bump helped), mean and sample std over seeds; "
        "'identical to control' counts seeds whose intervention loss curve equals the control's bit for bit.",
        provenance(command, wall, results),
        f"Environment: {environment()}",
        "",
    ]
    return "\n".join(head + out)


def main(argv: list[str] | None = None) -> None:
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
    ap.add_argument("--tables_only", action="store_true", help="rebuild the table from <out>/<name>.json")
    args = ap.parse_args(argv)
    command = "python examples/paper/exp3_ln_eps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.seeds, args.steps, args.d_model, args.rhos, args.caps, args.last = 1, 20, 32, [0.6], [1e-2], 10
    if args.tables_only:
        results, wall = load_raw(args.out / f"{args.name}.json"), None
    else:
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
        log(
            f"Exp-3: {len(configs)} runs, expected wall time "
            f"{eta(len(configs), SECONDS_PER_RUN * args.steps / 195 * (0.05 if args.quick else 1))}"
        )
        start = time.perf_counter()
        results = []
        raw = args.out / f"{args.name}.json"
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
        wall = None if args.resume else time.perf_counter() - start
    md = tables(results, args.last, wall, command)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""The tables of ``docs/SCALE.md``, printed as markdown from the committed JSON in ``docs/scale/``.

python examples/benchmarks/scale_tables.py [--dir docs/scale]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

MiB = 2.0**20


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def candidates(data: dict[str, Any]) -> None:
    """Seconds per matrix and worst relative error of κ (or σmax) of each candidate."""
    rows = data["rows"]
    print(f"Clock: {data['clock']} seconds; {data['machine_before']}\n")
    for need, title in (("both", "σmax and σmin (κ)"), ("top", "σmax alone (‖W_O‖₂)")):
        names = list(dict.fromkeys(r["candidate"] for r in rows if r["need"] == need))
        print(f"**{title}**: ms per matrix (worst relative error of {'κ' if need == 'both' else 'σmax'})\n")
        print("| d | matrix | spectrum | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        keys = dict.fromkeys((r["d"], r["matrix"], r["kind"]) for r in rows if r["need"] == need)
        for d, matrix, kind in keys:
            cells = []
            for name in names:
                hit = [
                    r
                    for r in rows
                    if (r["d"], r["matrix"], r["kind"], r["need"], r["candidate"])
                    == (d, matrix, kind, need, name)
                ]
                if not hit:
                    cells.append("—")
                    continue
                r = hit[0]
                err = r["rel_err_kappa"] if need == "both" else r["rel_err_max"]
                extra = f", {r['iterations']} it." if "iterations" in r else ""
                cells.append(f"{ms(r['seconds_per_matrix'])} ({err:.0e}{extra})")
            shape = "×".join(str(v) for v in hit_shape(rows, d, matrix))
            print(f"| {d} | {matrix} {shape} | {kind} | " + " | ".join(cells) + " |")
        print()


def hit_shape(rows: list[dict[str, Any]], d: int, matrix: str) -> list[int]:
    return next(r["shape"] for r in rows if r["d"] == d and r["matrix"] == matrix)


def reuse(data: dict[str, Any]) -> None:
    print(f"{data['machine']}; {data['seconds']:.0f} s\n")
    by = data["by_rule"]
    intervals = sorted({int(k.rsplit("_", 1)[1]) for k in by})
    print("| weight term | rule | " + " | ".join(f"every {n}" for n in intervals) + " |")
    print("|---|---|" + "---|" * len(intervals))
    for base in dict.fromkeys(k.rsplit("/", 1)[0] for k in by):
        kind, term, rule = base.split("/")
        cells = []
        for n in intervals:
            e = by.get(f"{base}/every_{n}")
            if e is None:
                cells.append("—")
                continue
            bound = (
                f"; bound ≥ {e['bound_min']:.0e}, median {e['bound_median']:.0e}" if "bound_min" in e else ""
            )
            cells.append(f"{e['reusable']:.1%} of {int(e['count'])}{bound}")
        print(f"| {kind} {term} | {rule} | " + " | ".join(cells) + " |")
    print()


def scale(data: dict[str, Any], before: dict[str, Any] | None) -> None:
    from bench_scale import derived

    print(f"Clock: {data.get('clock', 'wall')} seconds, {data.get('threads', '?')} thread(s)\n")
    print(
        "| axis | d | layers | tokens | params | training step | monitor | sampled / training | "
        "weight terms | local errors | FP32 pass | LP pass | rest | peak extra (sampled / training) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = ([{**before, "axis": "before"}] if before else []) + data["rows"]
    for r in rows:
        p = derived(r)
        print(
            f"| {r['axis']} | {r['d']} | {r['layers']} | {r['seq']} | {r['params'] / 1e6:.0f}M | "
            f"{p['train']:.2f} | {p['monitor']:.2f} | {p['sampled_over_train']:.2f}× | {p['weights']:.2f} | "
            f"{p['local_errors']:.2f} | {p['fp32_pass']:.2f} | {p['lp_pass']:.2f} | {p['rest']:.2f} | "
            f"{p['peak_extra_sampled'] / MiB:.0f} / {p['peak_extra_train'] / MiB:.0f} MiB |"
        )
    print("\n**Growth law** (least-squares slope of log(quantity) against log(axis value)):\n")
    fits = data.get("fits", {})
    if fits:
        names = list(next(iter(fits.values())))
        print("| axis | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for axis, f in fits.items():
            print(
                f"| {axis} | " + " | ".join("—" if math.isnan(f[q]) else f"{f[q]:.2f}" for q in names) + " |"
            )
    print()


def base(now: dict[str, Any], before: dict[str, Any] | None) -> None:
    """The base configuration's sampled step, parts side by side: before (``before_base.json``,
    measured on an earlier main) and now (``base.json``; its ``exact`` variant is today's probe
    with ``weight_spectra="exact"``, in the same run)."""
    from bench_scale import derived

    cols = ([("before", before)] if before else []) + [("now", now)]
    parts = {name: derived(row) for name, row in cols}
    size = f"{now['params'] / 1e6:.0f}M parameters: d={now['d']}, {now['layers']} layers"
    print(f"{size}, {now['seq']} tokens, batch {now['batch']}, sample {now['sample']}; CPU seconds.\n")
    for name, row in cols:
        print(f"- {name}: {row['machine']}")
    print("\n| seconds | " + " | ".join(name for name, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    labels = {
        "train": "training step",
        "monitor": "monitor's work at a sampled step",
        "weights": "  weight terms (certified)",
        "weights_exact": '  weight terms (exact, `weight_spectra="exact"`)',
        "local_errors": "  local errors",
        "fp32_pass": "  FP32 pass alone",
        "lp_pass": "  low-precision pass alone",
        "rest": "  rest (capture, diagnostics, logging)",
    }
    for key, label in labels.items():
        cells = [f"{parts[name][key]:.2f}" if key in parts[name] else "—" for name, _ in cols]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (
        ("sampled_over_train", "sampled step / training step"),
        ("exact_over_train", "… with exact weight terms"),
    ):
        cells = [f"**{parts[name][key]:.2f}×**" if key in parts[name] else "—" for name, _ in cols]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [
        f"{parts[name]['peak_extra_sampled'] / MiB:.0f} / {parts[name]['peak_extra_train'] / MiB:.0f}"
        for name, _ in cols
    ]
    print("| peak extra MiB (sampled / training) | " + " | ".join(cells) + " |")
    print()


def paper(data: dict[str, Any]) -> None:
    print(
        "| model | S | local errors | FP32 block | weight terms | kept activations | attention probs | "
        "transients | total | TFLOP passes (FP32+LP+local) | TFLOP weights | TFLOP training step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        m, t = r["memory_gib"], r["tflop"]
        passes = t["fp32_pass"] + t["lp_pass"] + (t["local_errors"] if r["local_errors"] else 0.0)
        print(
            f"| {r['model']} | {r['sample']} | {'on' if r['local_errors'] else 'off'} | "
            f"{m['block_weights_fp32']:.2f} | {m['weight_terms']:.2f} | {m['kept_activations']:.1f} | "
            f"{m['attention_probabilities']:.1f} | {m['pass_transients']:.2f} | "
            f"**{r['memory_total_gib']:.1f} GiB** | "
            f"{passes:.0f} | {t['weight_terms']:.2f} | {t['training_step']:.0f} |"
        )
    print()
    if data["rows"] and "cpu_seconds" in data["rows"][0]:
        print("CPU seconds on this machine (extrapolated; " + json.dumps(data["rates"]) + "):\n")
        print(
            "| model | S | FP32 pass | LP pass | local errors | weight terms (certified) | "
            "weight terms (exact) | training step |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in data["rows"]:
            if not r["local_errors"]:
                continue
            c = r["cpu_seconds"]
            print(
                f"| {r['model']} | {r['sample']} | {c['fp32_pass']:.0f} | {c['lp_pass']:.0f} | "
                f"{c['local_errors']:.0f} | {c['weight_terms']:.0f} | {c['weight_terms_main']:.0f} | "
                f"{c['training_step']:.0f} |"
            )
        print()


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("docs/scale"))
    args = ap.parse_args()

    def load(name: str) -> dict[str, Any] | None:
        path = args.dir / name
        return json.loads(path.read_text()) if path.exists() else None

    data = load("base.json")
    if data is not None:
        print("<!-- base.json -->")
        base(data, load("before_base.json"))
    for name, fn in (
        ("extremal.json", candidates),
        ("extremal_widths.json", candidates),
        ("weight_reuse.json", reuse),
        ("paper.json", paper),
    ):
        data = load(name)
        if data is not None:
            print(f"<!-- {name} -->")
            fn(data)
    data = load("scale.json")
    if data is not None:
        print("<!-- scale.json -->")
        scale(data, load("before_base.json"))


if __name__ == "__main__":
    main()

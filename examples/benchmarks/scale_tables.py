"""The tables of ``docs/SCALE.md``, as Markdown, from the committed JSON in ``docs/scale/``.

``render(path)`` is the Markdown of one file; ``scripts/sync_result_tables.py`` writes it between
the page's ``<!-- result: docs/scale/NAME.json -->`` markers, and this script prints it:

    python examples/benchmarks/scale_tables.py [docs/scale/NAME.json ...]   # default: every file
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ``bench_scale`` beside this file

MiB = 2.0**20
#: The base configuration with the weight terms from full float64 spectra, beside ``base.json``.
BEFORE = "before_base.json"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _candidate_cell(rows: list[dict[str, Any]], key: tuple[Any, ...], name: str) -> str:
    """One candidate's ms per matrix and worst relative error, ``—`` where it did not run."""
    d, matrix, kind, need = key
    hit = [
        r
        for r in rows
        if (r["d"], r["matrix"], r["kind"], r["need"], r["candidate"]) == (d, matrix, kind, need, name)
    ]
    if not hit:
        return "—"
    r = hit[0]
    err = r["rel_err_kappa"] if need == "both" else r["rel_err_max"]
    extra = f", {r['iterations']} it." if "iterations" in r else ""
    return f"{ms(r['seconds_per_matrix'])} ({err:.0e}{extra})"


def candidates(data: dict[str, Any]) -> str:
    """Seconds per matrix and worst relative error of κ (or σmax) of each candidate."""
    rows = data["rows"]
    lines = [f"Clock: {data['clock']} seconds; {data['machine_before']}", ""]
    for need, title in (("both", "σmax and σmin (κ)"), ("top", "σmax alone (‖W_O‖₂)")):
        names = list(dict.fromkeys(r["candidate"] for r in rows if r["need"] == need))
        what = "κ" if need == "both" else "σmax"
        lines += [f"**{title}**: ms per matrix (worst relative error of {what})", ""]
        lines.append("| d | matrix | spectrum | " + " | ".join(names) + " |")
        lines.append("|---|---|---|" + "---|" * len(names))
        keys = dict.fromkeys((r["d"], r["matrix"], r["kind"]) for r in rows if r["need"] == need)
        for d, matrix, kind in keys:
            cells = [_candidate_cell(rows, (d, matrix, kind, need), name) for name in names]
            shape = "×".join(str(v) for v in hit_shape(rows, d, matrix))
            lines.append(f"| {d} | {matrix} {shape} | {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def hit_shape(rows: list[dict[str, Any]], d: int, matrix: str) -> list[int]:
    return next(r["shape"] for r in rows if r["d"] == d and r["matrix"] == matrix)


def reuse(data: dict[str, Any]) -> str:
    """Share of the weight terms a certified reuse rule could have logged from a kept value."""
    lines = [f"{data['machine']}; {data['seconds']:.0f} s", ""]
    by = data["by_rule"]
    intervals = sorted({int(k.rsplit("_", 1)[1]) for k in by})
    lines.append("| weight term | rule | " + " | ".join(f"every {n}" for n in intervals) + " |")
    lines.append("|---|---|" + "---|" * len(intervals))
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
        lines.append(f"| {kind} {term} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loads(rows: list[dict[str, Any]]) -> str:
    """The machine of a sweep's rows (one line) and the range of their 1-minute load averages."""
    machine, _, _ = rows[0]["machine"].rpartition("; load average ")
    loads = [float(r["machine"].rpartition("; load average ")[2].split()[0]) for r in rows]
    return f"{machine}; 1-minute load average {min(loads):.1f}–{max(loads):.1f} across the configurations"


def scale(data: dict[str, Any]) -> str:
    """The sweep's rows (one configuration each) and the growth law fitted to them per axis."""
    from bench_scale import AXES, derived

    order = list(AXES)  # rows by axis, then by the axis' value (a resumed sweep appends its rows)
    rows = sorted(data["rows"], key=lambda r: (order.index(r["axis"]), r[AXES[r["axis"]][0]]))
    lines = [
        f"Clock: {data.get('clock', 'wall')} seconds, {data.get('threads', '?')} thread(s); {_loads(rows)}"
    ]
    lines += [
        "",
        "| axis | d | layers | tokens | params | training step | monitor | sampled / training | "
        "weight terms | local errors | FP32 pass | LP pass | rest | peak extra (sampled / training) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = derived(r)
        lines.append(
            f"| {r['axis']} | {r['d']} | {r['layers']} | {r['seq']} | {r['params'] / 1e6:.0f}M | "
            f"{p['train']:.2f} | {p['monitor']:.2f} | {p['sampled_over_train']:.2f}× | {p['weights']:.2f} | "
            f"{p['local_errors']:.2f} | {p['fp32_pass']:.2f} | {p['lp_pass']:.2f} | {p['rest']:.2f} | "
            f"{p['peak_extra_sampled'] / MiB:.0f} / {p['peak_extra_train'] / MiB:.0f} MiB |"
        )
    fits = data.get("fits", {})
    if fits:
        lines += ["", "**Growth law** (least-squares slope of log(quantity) against log(axis value)):", ""]
        names = list(next(iter(fits.values())))
        lines.append("| axis | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for axis, f in fits.items():
            cells = ("—" if math.isnan(f[q]) else f"{f[q]:.2f}" for q in names)
            lines.append(f"| {axis} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BASE_LABELS = {
    "train": "training step",
    "monitor": "monitor's work at a sampled step",
    "weights": "  weight terms (certified)",
    "weights_exact": '  weight terms (exact, `weight_spectra="exact"`)',
    "local_errors": "  local errors",
    "fp32_pass": "  FP32 pass alone",
    "lp_pass": "  low-precision pass alone",
    "rest": "  rest (capture, diagnostics, logging)",
}


def base(now: dict[str, Any], before: dict[str, Any] | None) -> str:
    """The base configuration's sampled step, parts side by side: before (``before_base.json``,
    the weight terms from full float64 spectra of every weight) and now (``base.json``; its
    ``exact`` variant is the probe with ``weight_spectra="exact"``, in the same run)."""
    from bench_scale import derived

    cols = ([("before", before)] if before else []) + [("now", now)]
    parts = {name: derived(row) for name, row in cols}
    size = f"{now['params'] / 1e6:.0f}M parameters: d={now['d']}, {now['layers']} layers"
    lines = [f"{size}, {now['seq']} tokens, batch {now['batch']}, sample {now['sample']}; CPU seconds.", ""]
    lines += [f"- {name}: {row['machine']}" for name, row in cols]
    lines += ["", "| seconds | " + " | ".join(name for name, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for key, label in BASE_LABELS.items():
        cells = [f"{parts[name][key]:.2f}" if key in parts[name] else "—" for name, _ in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (
        ("sampled_over_train", "sampled step / training step"),
        ("exact_over_train", "… with exact weight terms"),
    ):
        cells = [f"**{parts[name][key]:.2f}×**" if key in parts[name] else "—" for name, _ in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [
        f"{parts[name]['peak_extra_sampled'] / MiB:.0f} / {parts[name]['peak_extra_train'] / MiB:.0f}"
        for name, _ in cols
    ]
    lines.append("| peak extra MiB (sampled / training) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rates(rates: dict[str, Any]) -> str:
    """The measured throughputs the CPU seconds are extrapolated from."""
    flops = ", ".join(
        f"{label} {rates[key] / 1e9:.1f}"
        for key, label in (("fp32", "FP32 pass"), ("bf16", "BF16 pass"), ("train_bf16", "BF16 training step"))
    )
    return f"{flops} GFLOP/s ({rates['clock']} clock, measured at {rates['from']})"


def paper(data: dict[str, Any]) -> str:
    """Memory and flops per FSDP2 rank of a 7B and a 70B model, and CPU seconds extrapolated."""
    lines = [
        "| model | S | local errors | FP32 block | weight terms | kept activations | attention probs | "
        "transients | total | TFLOP passes (FP32+LP+local) | TFLOP weights | TFLOP training step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        m, t = r["memory_gib"], r["tflop"]
        passes = t["fp32_pass"] + t["lp_pass"] + (t["local_errors"] if r["local_errors"] else 0.0)
        lines.append(
            f"| {r['model']} | {r['sample']} | {'on' if r['local_errors'] else 'off'} | "
            f"{m['block_weights_fp32']:.2f} | {m['weight_terms']:.2f} | {m['kept_activations']:.1f} | "
            f"{m['attention_probabilities']:.1f} | {m['pass_transients']:.2f} | "
            f"**{r['memory_total_gib']:.1f} GiB** | "
            f"{passes:.0f} | {t['weight_terms']:.2f} | {t['training_step']:.0f} |"
        )
    if data["rows"] and "cpu_seconds" in data["rows"][0]:
        lines += ["", f"CPU seconds on this machine, extrapolated from {_rates(data['rates'])}:", ""]
        lines += [
            "| model | S | FP32 pass | LP pass | local errors | weight terms (certified) | "
            "weight terms (exact) | training step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            if not r["local_errors"]:
                continue
            c = r["cpu_seconds"]
            lines.append(
                f"| {r['model']} | {r['sample']} | {c['fp32_pass']:.0f} | {c['lp_pass']:.0f} | "
                f"{c['local_errors']:.0f} | {c['weight_terms']:.0f} | {c['weight_terms_exact']:.0f} | "
                f"{c['training_step']:.0f} |"
            )
    return "\n".join(lines)


def _base(path: Path) -> str:
    before = path.with_name(BEFORE)
    return base(json.loads(path.read_text()), json.loads(before.read_text()) if before.exists() else None)


def _plain(fn: Callable[[dict[str, Any]], str]) -> Callable[[Path], str]:
    return lambda path: fn(json.loads(path.read_text()))


#: The renderer of each committed file, by name, in the order of the page.
FILES: dict[str, Callable[[Path], str]] = {
    "base.json": _base,
    "extremal.json": _plain(candidates),
    "extremal_widths.json": _plain(candidates),
    "weight_reuse.json": _plain(reuse),
    "scale.json": _plain(scale),
    "paper.json": _plain(paper),
}


def render(path: Path) -> str:
    """The Markdown of one committed file of ``docs/scale/`` (``base.json`` with the full-spectra
    run beside it, ``BEFORE``).

    Args:
        path: one of the files named in ``FILES``.
    """
    return FILES[path.name](path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="*", help="files of docs/scale (default: every one present)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[2]
    files = args.files or [root / "docs" / "scale" / name for name in FILES]
    for path in (p.resolve() for p in files if p.exists()):
        source = path.relative_to(root) if path.is_relative_to(root) else path
        print(f"<!-- result: {source} -->\n\n{render(path)}\n\n<!-- /result -->\n")


if __name__ == "__main__":
    main()

"""Markdown tables of the held-out summary (``summary.json``): what docs/HELDOUT.md shows."""

from __future__ import annotations

import math
from typing import Any


def _lead_cell(d: dict[str, Any]) -> str:
    if d["runs"] == 0:
        return "no event"
    text = f"{d['warned_first']}/{d['runs']} first"
    if d["median_lead"] is not None:
        lo, hi = d["range"]
        text += f"; lead {d['median_lead']:g} [{lo}–{hi}]"
    if d["late"]:
        text += f"; {d['late']} late"
    if d["missed"]:
        text += f"; {d['missed']} missed"
    return text


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table of ``rows`` under ``head``."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _events(row: dict[str, Any]) -> str:
    ev = row["events"]
    parts = [f"{e['step']} ({e['kind']})" if e else "—" for e in ev]
    return ", ".join(parts)


def scenario_markdown(summary: dict[str, Any]) -> str:
    """Per scenario: events per seed, then per rule the lead on the failing arms and control firings."""
    rules = list(summary["false_alarms"])
    head = ["scenario (what-if)", "events, seeds 0–4 (step, kind)", "control events", *rules]
    rows = []
    for row in summary["scenarios"]:
        ctrl_ev = [e for e in row["control_events"] if e]
        cells = [
            f"{row['scenario']} ({row['whatif']})",
            _events(row),
            f"{len(ctrl_ev)}/{len(row['control_events'])}",
        ]
        for r in rules:
            d = row["rules"][r]
            ctrl = f"ctrl {sum(d['control_firing'])}/{sum(d['control_checks'])} checks"
            quiet = d["fail_without_event_firing"]
            extra = f"; fired on {sum(x > 0 for x in quiet)}/{len(quiet)} no-event fail runs" if quiet else ""
            cells.append(f"{_lead_cell(d['fail'])}{extra}; {ctrl}")
        rows.append(cells)
    return markdown_table(head, rows)


def peaks_markdown(summary: dict[str, Any]) -> str:
    """What the alarm's own quantities reached (median over seeds): failing arm vs control."""
    head = [
        "scenario",
        "max attn logit fail / ctrl",
        "min FP16 headroom (bits) fail / ctrl",
        "min ρ_LN fail / ctrl",
    ]
    rows = []
    for row in summary["scenarios"]:
        cells = [row["scenario"]]
        for key in ("attn_logit_max", "fp16_headroom", "rho_ln"):
            f = _median([p[key] for p in row["peaks_fail"]])
            c = _median([p[key] for p in row["peaks_control"]])
            cells.append(f"{f:.3g} / {c:.3g}")
        rows.append(cells)
    return markdown_table(head, rows)


def _median(xs: list[float]) -> float:
    v = sorted(x for x in xs if x is not None and not math.isnan(x))
    if not v:
        return math.nan
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def false_alarm_markdown(summary: dict[str, Any]) -> str:
    """False alarms per 1,000 checks on the healthy runs (95 % Clopper–Pearson), per rule and pool."""
    lines = [
        "| rule | pool | healthy runs | checks | firing checks | per 1,000 checks [95 % CI] "
        "| runs with any firing |",
        "|---|---|---|---|---|---|---|",
    ]
    pools = (
        ("false_alarms_long", "long healthy runs"),
        ("false_alarms_controls", "controls without event"),
        ("false_alarms", "both"),
    )
    for name in summary["false_alarms"]:
        for key, pool in pools:
            d = summary[key][name]
            lo, hi = d["ci_per_1000"]
            lines.append(
                f"| {name} | {pool} | {d['runs']} | {d['checks']} | {d['firing']} | {d['per_1000']:.2f} "
                f"[{lo:.2f}, {hi:.2f}] | {d['runs_firing']} |"
            )
    return "\n".join(lines)


def sweep_markdown(summary: dict[str, Any]) -> str:
    """One row per threshold: warned first / event runs, median lead, false alarms per 1,000 checks."""
    out = []
    titles = {
        "default_logit": "default rule, logit threshold τ moved (headroom 2 bits, ρ_LN 1 frozen)",
        "logit_only": "logit part alone, `attn_logit_max > τ`",
        "precision_aware": "precision-aware logit part alone, `attn_logit_max × ε_mach > τ·2⁻⁷` "
        "(= τ at BF16, 8τ at FP16)",
        "default_headroom": "default rule, FP16 headroom bits moved (τ = 100, ρ_LN 1 frozen); FP16 runs only",
        "headroom_only": "headroom part alone, `fp16_headroom < bits`; FP16-measured runs only",
    }
    for key, title in titles.items():
        out.append(f"**{title}**\n")
        out.append(
            "| threshold | warned first / runs with event | median lead (steps) | false alarms per 1,000 "
            "checks [95 % CI] | healthy runs firing | long healthy runs only: per 1,000 [95 % CI] |"
        )
        out.append("|---|---|---|---|---|---|")
        for p in summary["sweeps"][key]:
            lo, hi = p["fa_ci"]
            star = (
                " (default)"
                if (
                    key.startswith("default")
                    and p["threshold"] in (100.0, 2.0)
                    and (key == "default_logit") == (p["threshold"] == 100.0)
                )
                else ""
            )
            ml = "—" if p["median_lead"] is None else f"{p['median_lead']:g}"
            out.append(
                f"| {p['threshold']:g}{star} | {p['warned_first']}/{p['event_runs']} | {ml} | "
                f"{p['fa_per_1000']:.2f} [{lo:.2f}, {hi:.2f}] | {p['healthy_runs_firing']} | "
                f"{p['fa_long_per_1000']:.2f} [{p['fa_long_ci'][0]:.2f}, {p['fa_long_ci'][1]:.2f}] |"
            )
        out.append("")
    return "\n".join(out)


def markdown(summary: dict[str, Any]) -> str:
    """All tables, in the order of docs/HELDOUT.md."""
    return (
        "\n\n".join(
            [
                f"Runs scored: {summary['runs']}.",
                scenario_markdown(summary),
                peaks_markdown(summary),
                false_alarm_markdown(summary),
                sweep_markdown(summary),
            ]
        )
        + "\n"
    )

"""Markdown tables of the guard's held-out summary (``guard_summary.json``): what docs/HELDOUT.md shows."""

from __future__ import annotations

from typing import Any

from heldout.tables import markdown_table


def _range(d: dict[str, float] | None, pct: bool = True) -> str:
    if d is None:
        return "—"
    f = (lambda x: f"{100 * x:.0f} %") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(d['median'])} [{f(d['min'])}, {f(d['max'])}]"


def _logits(rows: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key)]
    if not vals:
        return "—"
    med = sorted(v["median"] for v in vals)[len(vals) // 2]
    p90 = sorted(v["p90"] for v in vals)[len(vals) // 2]
    top = max(v["max"] for v in vals)
    return f"{med:.3g} / {p90:.3g} / {top:.3g}"


def _summary_cells(variant: str, scenario: str, d: dict[str, Any]) -> list[str]:
    rows = d["rows"]
    finals = [[r["final"][k] for r in rows] for k in ("fail", "guarded", "control")]
    clips = sorted(r["actions"].get("qk_clip", 0) for r in rows)[len(rows) // 2]
    ctrl = (
        f"{d['control_actions']}, {d['control_identical']}/{d['control_runs']}, "
        f"{_range(d['control_final_delta'], pct=False)}, "
        f"{d['control_wall_ratio']['median']:.2f}"
        if d["control_runs"]
        else "—"
    )
    return [
        variant,
        scenario,
        ", ".join(str(s) for s in d["seeds"]),
        " / ".join(f"{sorted(v)[len(v) // 2]:.3f}" for v in finals),
        _range(d["final_closed"]),
        _range(d["area_closed"]),
        f"{d['events']} → {d['guarded_events']}",
        f"{_logits(rows, 'logits_fail')} → {_logits(rows, 'logits_guarded')}",
        _logits(rows, "train_logits_guarded"),
        str(clips),
        f"{d['unchanged']}/{len(rows)}",
        ctrl,
    ]


def summary_markdown(summary: dict[str, Any]) -> str:
    """Per scenario, variant beside variant: gap closed, events left, logits past τ, controls."""
    head = [
        "variant",
        "scenario",
        "seeds",
        "final loss fail / guarded / control (median)",
        "final-loss gap closed, median [range]",
        "area gap closed, median [range]",
        "events: unguarded → guarded",
        "monitor's max attn logit after τ first passed: median / p90 / max, unguarded → guarded",
        "training forward's max attn logit (armed, before its clip): median / p90 / max",
        "QK-clips per run (median)",
        "fail runs with the unguarded loss",
        "controls: actions, identical loss, Δ final loss, wall ratio (separate runs: noisy)",
    ]
    variants = summary["variants"]
    scenarios = list(dict.fromkeys(sc for per in variants.values() for sc in per))
    rows = [
        _summary_cells(variant, scenario, variants[variant][scenario])
        for scenario in scenarios
        for variant in (v for v in variants if scenario in variants[v])
    ]
    return markdown_table(head, rows)


def seeds_markdown(summary: dict[str, Any]) -> str:
    """Seed by seed: final losses, gap closed, events, guard actions."""
    head = [
        "variant",
        "scenario",
        "seed",
        "final fail / guarded / control",
        "closed: final / area",
        "event unguarded → guarded",
        "guard actions",
    ]
    rows = []
    for variant, per in summary["variants"].items():
        for scenario, d in per.items():
            for r in d["rows"]:
                f = r["final"]
                closed = " / ".join(
                    "—" if r[k] is None else f"{100 * r[k]:.0f} %" for k in ("final_closed", "area_closed")
                )
                ev = " → ".join(
                    "—" if e is None else f"{e['step']} ({e['kind']})"
                    for e in (r["event"], r["guarded_event"])
                )
                acts = ", ".join(f"{k} {v}" for k, v in r["actions"].items() if v) or "none"
                finals = f"{f['fail']:.3f} / {f['guarded']:.3f} / {f['control']:.3f}"
                rows.append([variant, scenario, str(r["seed"]), finals, closed, ev, acts])
    return markdown_table(head, rows)


def guard_markdown(summary: dict[str, Any]) -> str:
    """Both tables."""
    return (
        f"Final loss: mean of the last {summary['final_steps']} steps; gaps below {summary['min_gap']} nats "
        f"are not scored; τ = {summary['tau']:g}.\n\n"
        + summary_markdown(summary)
        + "\n\n"
        + seeds_markdown(summary)
        + "\n"
    )

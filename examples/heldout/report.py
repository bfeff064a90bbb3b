"""Tables and figures of the held-out evaluation, from the saved run records only.

``write_report(results)`` reads every ``<results>/<scenario>/<arm>/seed<k>.json``, scores it
(:mod:`heldout.score`) and writes ``summary.json`` and ``tables.md`` beside them (and, with
``figures=True``, ``docs/images/heldout_*.png``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from heldout.events import Event, clopper_pearson
from heldout.runner import load_record
from heldout.scenarios import SCENARIOS
from heldout.score import FROZEN, alarm_steps, event_of, level_steps, precision_aware_steps, rules_table

LOGIT_SWEEP = (30.0, 50.0, 70.0, 100.0, 150.0, 200.0, 300.0, 500.0, 700.0, 1000.0)
HEADROOM_SWEEP = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
BF16_EPS = 2.0**-7
IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"

Rule = Callable[[Mapping[str, Any]], list[int]]


def load_all(results: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every saved record, keyed ``(scenario, arm, seed)``."""
    out = {}
    for path in sorted(results.glob("*/*/seed*.json")):
        rec = load_record(path)
        s = rec["spec"]
        out[(s["scenario"], s["arm"], int(s["seed"]))] = rec
    return out


def with_events(records: Mapping[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with its ``event`` (failing arms against their matched control when saved)."""
    runs = []
    for (scen, arm, seed), rec in records.items():
        ctrl = records.get((scen, "control", seed)) if arm == "fail" else None
        runs.append(dict(rec, event=event_of(rec, ctrl)))
    return runs


def _healthy(
    runs: Sequence[dict[str, Any]], arms: tuple[str, ...] = ("control", "healthy")
) -> list[dict[str, Any]]:
    return [r for r in runs if r["spec"]["arm"] in arms and r["event"] is None]


def _with_event(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r["event"] is not None]


def false_alarms(
    runs: Sequence[dict[str, Any]], rule: Rule, arms: tuple[str, ...] = ("control", "healthy")
) -> dict[str, Any]:
    """Firing checks per 1,000 checks on the healthy runs of ``arms``, with a 95 % Clopper–Pearson interval.

    Checks of one run are not independent; ``runs_firing`` (runs with any firing) is the coarser count.
    """
    healthy = _healthy(runs, arms)
    n = sum(len(r["checks"]) for r in healthy)
    fired = [len(rule(r)) for r in healthy]
    k = sum(fired)
    lo, hi = clopper_pearson(k, n)
    return {
        "checks": n,
        "firing": k,
        "per_1000": 1000 * k / n if n else math.nan,
        "ci_per_1000": [1000 * lo, 1000 * hi],
        "runs": len(healthy),
        "runs_firing": sum(f > 0 for f in fired),
    }


def leads(runs: Sequence[dict[str, Any]], rule: Rule) -> dict[str, Any]:
    """Over runs with an event: each lead (``event − first firing``; ``None``: never fired), counts."""
    values = []
    for r in _with_event(runs):
        fired = rule(r)
        values.append(None if not fired else r["event"].step - fired[0])
    ahead = [v for v in values if v is not None and v >= 0]
    return {
        "runs": len(values),
        "warned_first": len(ahead),
        "late": sum(v is not None and v < 0 for v in values),
        "missed": sum(v is None for v in values),
        "leads": values,
        "median_lead": statistics.median(ahead) if ahead else None,
        "range": [min(ahead), max(ahead)] if ahead else None,
    }


def scenario_table(runs: Sequence[dict[str, Any]], rules: Mapping[str, Rule]) -> list[dict[str, Any]]:
    """Per scenario and rule: events, leads on the failing arms, firing checks on the controls."""
    rows = []
    for name in SCENARIOS:
        fail = sorted(
            (r for r in runs if r["spec"]["scenario"] == name and r["spec"]["arm"] == "fail"),
            key=lambda r: r["spec"]["seed"],
        )
        ctrl = [r for r in runs if r["spec"]["scenario"] == name and r["spec"]["arm"] == "control"]
        if not fail:
            continue
        row: dict[str, Any] = {
            "scenario": name,
            "whatif": fail[0]["spec"]["whatif"],
            "expect": SCENARIOS[name].expect,
            "events": [_event_json(r["event"]) for r in fail],
            "control_events": [_event_json(r["event"]) for r in ctrl],
            "peaks_fail": [_peaks(r) for r in fail],
            "peaks_control": [_peaks(r) for r in ctrl],
            "rules": {},
        }
        for rname, rule in rules.items():
            row["rules"][rname] = {
                "fail": leads(fail, rule),
                "fail_without_event_firing": [len(rule(r)) for r in fail if r["event"] is None],
                "control_firing": [len(rule(r)) for r in ctrl],
                "control_checks": [len(r["checks"]) for r in ctrl],
            }
        rows.append(row)
    return rows


def _event_json(e: Event | None) -> dict[str, Any] | None:
    return None if e is None else {"step": e.step, "kind": e.kind}


def _peaks(r: Mapping[str, Any]) -> dict[str, float]:
    """The largest attention logit, lowest FP16 headroom and lowest ρ_LN over a run's checks (descriptive)."""

    def over(suffix: str, pick: Callable[..., float]) -> float:
        vals = [v for c in r["checks"] for t, v in c.items() if t.endswith(suffix) and math.isfinite(v)]
        return float(f"{pick(vals):.4g}") if vals else math.nan

    return {
        "attn_logit_max": over("/attn_logit_max", max),
        "fp16_headroom": over("stability/fp16_headroom", min),
        "rho_ln": over("/rho_ln", min),
    }


def sweeps(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Lead vs false-alarm rate with one threshold of the default moved (the others frozen),
    the logit part alone, and the precision-aware logit rule ``logit × ε_mach > c``."""
    out: dict[str, list[dict[str, Any]]] = {
        "default_logit": [],
        "logit_only": [],
        "precision_aware": [],
        "default_headroom": [],
        "headroom_only": [],
    }
    for tau in LOGIT_SWEEP:
        rules: dict[str, Rule] = {
            "default_logit": lambda r, t=tau: [s for s, _ in alarm_steps(r["checks"], attn_logit_max=t)],
            "logit_only": lambda r, t=tau: level_steps(r["checks"], "attn_logit_max", t),
            "precision_aware": lambda r, t=tau: precision_aware_steps(r["checks"], t * BF16_EPS),
        }
        for key, rule in rules.items():
            out[key].append({"threshold": tau, **_point(runs, rule)})
    fp16 = [r for r in runs if r["spec"]["whatif"] == "fp16"]
    for bits in HEADROOM_SWEEP:
        hrules: dict[str, Rule] = {
            "default_headroom": lambda r, b=bits: [
                s for s, _ in alarm_steps(r["checks"], fp16_headroom_bits=b)
            ],
            "headroom_only": lambda r, b=bits: level_steps(r["checks"], "fp16_headroom", b),
        }
        for key, rule in hrules.items():  # over the FP16-measured runs: the only ones headroom applies to
            out[key].append({"threshold": bits, **_point(fp16, rule)})
    return out


def _point(runs: Sequence[dict[str, Any]], rule: Rule) -> dict[str, Any]:
    ld, fa = leads(runs, rule), false_alarms(runs, rule)
    long = false_alarms(runs, rule, ("healthy",))
    return {
        "warned_first": ld["warned_first"],
        "event_runs": ld["runs"],
        "median_lead": ld["median_lead"],
        "fa_per_1000": fa["per_1000"],
        "fa_ci": fa["ci_per_1000"],
        "healthy_runs_firing": fa["runs_firing"],
        "fa_long_per_1000": long["per_1000"],
        "fa_long_ci": long["ci_per_1000"],
    }


def write_report(results: Path, figures: bool = False) -> str:
    """Score every run saved under ``results``; write ``summary.json`` and ``tables.md``; return them."""
    runs = with_events(load_all(results))
    rules = rules_table()
    summary = {
        "frozen": FROZEN,
        "runs": len(runs),
        "scenarios": scenario_table(runs, rules),
        "false_alarms": {name: false_alarms(runs, rule) for name, rule in rules.items()},
        "false_alarms_long": {name: false_alarms(runs, rule, ("healthy",)) for name, rule in rules.items()},
        "false_alarms_controls": {
            name: false_alarms(runs, rule, ("control",)) for name, rule in rules.items()
        },
        "sweeps": sweeps(runs),
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    from heldout.tables import markdown

    text = markdown(summary)
    (results / "tables.md").write_text(text)
    if figures:
        from heldout.figures import plot_all

        plot_all(runs, summary, IMAGES)
    return text


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x))

"""The guard on the held-out runs: how much of the gap to the stable control it closes, where the logits stay,
what it costs on the controls. From the saved records only.

``guard_report(results, variants)`` compares, scenario by scenario and seed by seed, the unguarded runs
(``results/<scenario>/<arm>/seed<k>.json``) with the same runs trained with a guard variant
(``results/<variant>/<scenario>/<arm>/seed<k>.json``, :data:`heldout.run.VARIANTS`), and writes
``guard_summary.json`` and ``guard_tables.md`` beside them. Per failing seed, against the unguarded
control of the same seed:

* **final loss** — the mean training loss of the last :data:`FINAL` steps; the share of the gap
  closed is ``(L_fail − L_guarded) / (L_fail − L_control)`` (only where the gap is at least
  :data:`MIN_GAP` nats: below that there is nothing to close);
* **area** — the mean over all steps of ``ℓ_t(run) − ℓ_t(control)`` (the area between the loss curves
  per step); the share closed is ``1 − area(guarded) / area(fail)``;
* **event** — whether the guarded run still has an event against the unguarded control (the events of
  :mod:`heldout.events`);
* **logits** — the monitor's largest attention logit (over blocks) at its checks from the first check
  at which the *unguarded* run passed ``τ`` on (the same steps for both runs): median, 90th percentile
  and maximum;
* **training-forward logits** — for a guard that clips at every step: the largest attention logit
  (over blocks) of each step's own training forward, before that step's clip
  (``stability/guard/block{i}/train_logit_max``), over the same steps; median, 90th percentile, maximum
  (it is logged only once a block is armed);
* **unchanged** — whether the guarded failing run's loss equals the unguarded one's step for step
  (the guard never acted, or acted without effect);
* **cost on the controls** — the control trained with the guard against the one without: actions
  taken, the final-loss difference, the wall-time ratio (one run each, on a shared machine: noisy).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heldout.report import load_all
from heldout.scenarios import SCENARIOS
from heldout.score import event_of

FINAL = 20
MIN_GAP = 0.05
TAU = 100.0

Records = Mapping[tuple[str, str, int], dict[str, Any]]


def _loss(rec: Mapping[str, Any]) -> np.ndarray:
    """The per-step loss; a non-finite loss counts as the run's largest finite one (never as infinity)."""
    v = np.asarray(rec["steps"]["train/loss"], dtype=np.float64)
    finite = v[np.isfinite(v)]
    return np.where(np.isfinite(v), v, finite.max() if finite.size else math.nan)


def final_loss(rec: Mapping[str, Any]) -> float:
    """Mean training loss of the last :data:`FINAL` steps."""
    return float(_loss(rec)[-FINAL:].mean())


def area(rec: Mapping[str, Any], control: Mapping[str, Any]) -> float:
    """Mean over steps of ``ℓ_t(rec) − ℓ_t(control)`` (nats): the area between the loss curves per step."""
    a, b = _loss(rec), _loss(control)
    n = min(a.size, b.size)
    return float((a[:n] - b[:n]).mean())


def _block_logits(rec: Mapping[str, Any]) -> list[tuple[int, float]]:
    out = []
    for c in rec["checks"]:
        vals = [
            v for t, v in c.items() if t.endswith("/attn_logit_max") and "/block" in t and math.isfinite(v)
        ]
        if vals:
            out.append((int(c["step"]), max(vals)))
    return out


def first_past_tau(rec: Mapping[str, Any]) -> int | None:
    """The first check at which a block's attention logit passed τ."""
    return next((s for s, v in _block_logits(rec) if v > TAU), None)


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


def logits_from(rec: Mapping[str, Any], start: int | None) -> dict[str, float] | None:
    """Median / p90 / max of the monitor's block-max attention logit at the checks from ``start`` on."""
    if start is None:
        return None
    return _spread([v for s, v in _block_logits(rec) if s >= start])


def train_logits_from(rec: Mapping[str, Any], start: int | None) -> dict[str, float] | None:
    """Median / p90 / max of the training forward's block-max attention logit (armed) from ``start``."""
    if start is None:
        return None
    per_step: dict[int, float] = {}
    for row in rec.get("guard", []):
        for tag, v in row.items():
            if tag.endswith("/train_logit_max") and math.isfinite(v) and int(row["step"]) >= start:
                per_step[int(row["step"])] = max(per_step.get(int(row["step"]), v), v)
    return _spread(list(per_step.values()))


def actions(rec: Mapping[str, Any]) -> dict[str, int]:
    """How often each mitigation was logged in a guarded run (QK-clips counted per block and step)."""
    out: dict[str, int] = {}
    for row in rec.get("guard", []):
        for tag, v in row.items():
            kind = tag.rsplit("/", 1)[-1]
            if "/block" in tag and kind in ("qk_clip", "eps_bump", "fp32") and math.isfinite(v):
                out[kind] = out.get(kind, 0) + 1
    last = [r["stability/guard/actions"] for r in rec.get("guard", []) if "stability/guard/actions" in r]
    out["sampled_actions"] = int(last[-1]) if last else 0
    return out


def compare(base: Records, guarded: Records, scenario: str, seed: int) -> dict[str, Any] | None:
    """One seed of one scenario: the guarded failing run and control against the unguarded ones."""
    keys = {arm: (scenario, arm, seed) for arm in ("fail", "control")}
    if not all(k in base for k in keys.values()) or keys["fail"] not in guarded:
        return None
    fail, ctrl, g_fail = base[keys["fail"]], base[keys["control"]], guarded[keys["fail"]]
    lf, lc, lg = final_loss(fail), final_loss(ctrl), final_loss(g_fail)
    af, ag = area(fail, ctrl), area(g_fail, ctrl)
    start = first_past_tau(fail)
    ev, g_ev = event_of(fail, ctrl), event_of(g_fail, ctrl)
    row: dict[str, Any] = {
        "seed": seed,
        "final": {"fail": lf, "guarded": lg, "control": lc},
        "final_closed": (lf - lg) / (lf - lc) if lf - lc >= MIN_GAP else None,
        "area": {"fail": af, "guarded": ag},
        "area_closed": 1 - ag / af if af >= MIN_GAP else None,
        "event": None if ev is None else {"step": ev.step, "kind": ev.kind},
        "guarded_event": None if g_ev is None else {"step": g_ev.step, "kind": g_ev.kind},
        "first_past_tau": start,
        "logits_fail": logits_from(fail, start),
        "logits_guarded": logits_from(g_fail, start),
        "train_logits_guarded": train_logits_from(g_fail, start),
        "unchanged": g_fail["steps"]["train/loss"] == fail["steps"]["train/loss"],
        "actions": actions(g_fail),
        "wall_ratio_fail": g_fail["wall_s"] / fail["wall_s"],
    }
    g_ctrl = guarded.get(keys["control"])
    if g_ctrl is not None:
        row["control"] = {
            "actions": actions(g_ctrl),
            "final_delta": final_loss(g_ctrl) - lc,
            "identical_loss": g_ctrl["steps"]["train/loss"] == ctrl["steps"]["train/loss"],
            "wall_ratio": g_ctrl["wall_s"] / ctrl["wall_s"],
        }
    return row


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(xs: list[float | None]) -> dict[str, float] | None:
        v = [x for x in xs if x is not None]
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} if v else None

    ctrl = [r["control"] for r in rows if "control" in r]
    return {
        "seeds": [r["seed"] for r in rows],
        "final_closed": med([r["final_closed"] for r in rows]),
        "area_closed": med([r["area_closed"] for r in rows]),
        "guarded_events": sum(r["guarded_event"] is not None for r in rows),
        "unchanged": sum(bool(r["unchanged"]) for r in rows),
        "events": sum(r["event"] is not None for r in rows),
        "control_runs": len(ctrl),
        "control_actions": sum(sum(c["actions"].values()) for c in ctrl),
        "control_identical": sum(bool(c["identical_loss"]) for c in ctrl),
        "control_final_delta": med([c["final_delta"] for c in ctrl]),
        "control_wall_ratio": med([c["wall_ratio"] for c in ctrl]),
        "fail_wall_ratio": med([r["wall_ratio_fail"] for r in rows]),
    }


def guard_report(results: Path, variants: Sequence[str], out: Path | None = None) -> str:
    """Compare each guard variant saved under ``results`` with the unguarded runs; write the tables."""
    base = load_all(results)
    summary: dict[str, Any] = {"final_steps": FINAL, "min_gap": MIN_GAP, "tau": TAU, "variants": {}}
    for variant in variants:
        guarded = load_all(results / variant)
        per: dict[str, Any] = {}
        for scenario in SCENARIOS:
            seeds = sorted({k[2] for k in guarded if k[0] == scenario})
            rows = [r for s in seeds if (r := compare(base, guarded, scenario, s)) is not None]
            if rows:
                per[scenario] = {"rows": rows, **_summary(rows)}
        summary["variants"][variant] = per
    out = out or results
    (out / "guard_summary.json").write_text(json.dumps(summary, indent=1))
    from heldout.guard_tables import guard_markdown

    text = guard_markdown(summary)
    (out / "guard_tables.md").write_text(text)
    return text

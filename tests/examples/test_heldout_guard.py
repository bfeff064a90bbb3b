"""Held-out guard comparison: gap closed, logits after τ, actions and cost on the controls, on records
whose answers are known by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from heldout import guard_report as gr  # noqa: E402
from heldout.guard_tables import guard_markdown  # noqa: E402

STEPS = 60


def _record(
    loss: list[float], logits: list[float], wall: float, guard: list[dict[str, float]] | None = None
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "steps": {"step": [float(s) for s in range(STEPS)], "train/loss": loss, "train/whatif_loss": loss},
        "checks": [
            {"step": float(2 * i), "stability/block0/attn_logit_max": v, "stability/attn_logit_max": v}
            for i, v in enumerate(logits)
        ],
        "wall_s": wall,
    }
    if guard is not None:
        rec["guard"] = guard
    return rec


def test_compare_scores_the_gap_closed_logits_and_control_cost() -> None:
    ctrl = _record([2.0] * STEPS, [10.0] * 30, 100.0)
    fail = _record([2.0] * 20 + [3.4] * 40, [50.0] * 5 + [200.0] * 25, 100.0)  # past τ from step 10
    guarded = _record(
        [2.0] * 20 + [2.7] * 40,
        [50.0] * 5 + [120.0, 100.0] * 12 + [150.0],
        150.0,
        guard=[
            {"step": 8.0, "stability/guard/block0/train_logit_max": 900.0},  # before τ was first passed
            {"step": 10.0, "stability/guard/block0/qk_clip": 0.5, "stability/guard/actions": 1.0},
            {"step": 11.0, "stability/guard/block0/train_logit_max": 130.0},
            {
                "step": 12.0,
                "stability/guard/block0/train_logit_max": 110.0,
                "stability/guard/block1/train_logit_max": 170.0,
            },
            {"step": 13.0, "stability/guard/block1/train_logit_max": 120.0},
        ],
    )
    g_ctrl = _record([2.0] * 39 + [2.1] * 21, [10.0] * 30, 110.0)
    base = {("s", "fail", 0): fail, ("s", "control", 0): ctrl}
    row = gr.compare(base, {("s", "fail", 0): guarded, ("s", "control", 0): g_ctrl}, "s", 0)
    assert row is not None
    assert row["final"] == pytest.approx({"fail": 3.4, "guarded": 2.7, "control": 2.0})
    assert row["final_closed"] == pytest.approx(0.5)
    assert row["area"]["fail"] == pytest.approx(40 * 1.4 / 60)
    assert row["area_closed"] == pytest.approx(0.5)
    assert row["first_past_tau"] == 10
    # 10-step mean gaps 0.14, 0.28, 0.42 at steps 20-22 (fail) and 0.07 per step (guarded)
    assert row["event"] == {"step": 22, "kind": "gap"}
    assert row["guarded_event"] == {"step": 24, "kind": "gap"}
    assert row["logits_fail"] == {"median": 200.0, "p90": 200.0, "max": 200.0}
    assert row["logits_guarded"]["max"] == 150.0
    assert row["logits_guarded"]["median"] == 120.0  # 12 × 100, 12 × 120, one 150
    assert row["actions"] == {"qk_clip": 1, "sampled_actions": 1}
    # per step the largest block, from step 10 on: 130, 170, 120
    assert row["train_logits_guarded"] == pytest.approx({"median": 130.0, "p90": 162.0, "max": 170.0})
    assert row["logits_fail"] is not None and row["unchanged"] is False
    assert row["wall_ratio_fail"] == pytest.approx(1.5)
    c = row["control"]
    assert c["actions"] == {"sampled_actions": 0}
    assert c["identical_loss"] is False
    assert c["final_delta"] == pytest.approx(0.1)
    assert c["wall_ratio"] == pytest.approx(1.1)


def test_no_gap_is_not_scored_and_tables_render() -> None:
    ctrl = _record([2.0] * STEPS, [10.0] * 30, 100.0)
    fail = _record([2.02] * STEPS, [10.0] * 30, 100.0)  # 0.02 nats: below MIN_GAP
    row = gr.compare({("s", "fail", 1): fail, ("s", "control", 1): ctrl}, {("s", "fail", 1): fail}, "s", 1)
    assert row is not None
    assert row["final_closed"] is None and row["area_closed"] is None
    assert row["first_past_tau"] is None and row["logits_fail"] is None
    assert row["train_logits_guarded"] is None and row["unchanged"] is True
    assert "control" not in row
    summary = {
        "final_steps": 20,
        "min_gap": 0.05,
        "tau": 100.0,
        "variants": {"guard": {"s": {"rows": [row], **gr._summary([row])}}},
    }
    text = guard_markdown(summary)
    assert "| guard | s | 1 | 2.020 / 2.020 / 2.000 | — / — | — → — | none |" in text
    assert gr.compare({("s", "fail", 1): fail}, {("s", "fail", 1): fail}, "s", 1) is None  # no control

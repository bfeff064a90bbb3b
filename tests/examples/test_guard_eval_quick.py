"""`guard_eval.py --quick`: the scenarios with StabilityGuard, end to end on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SCEN_DIR = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
if str(SCEN_DIR) not in sys.path:
    sys.path.insert(0, str(SCEN_DIR))

import guard_eval  # noqa: E402


@pytest.fixture(autouse=True)
def _argv_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["guard_eval.py"])
    torch.set_num_threads(1)


def test_guarded_config_keeps_the_scenarios_monitor_and_appends_the_guard() -> None:
    cfg = guard_eval.guarded_config("fp16_overflow", False, 2, {"tau": 50.0})
    monitor, guard = cfg["trainer"]["callbacks"]
    assert monitor["class_path"].endswith("StabilityMonitor")
    assert monitor["init_args"] == {
        "precision": "fp16",
        "every_n_steps": 2,
        "sample_size": 8,
        "log_per_head": True,
    }
    assert guard == {"class_path": "lightning_stability.StabilityGuard", "init_args": {"tau": 50.0}}
    assert cfg["model"]["lr"] == 0.3  # the scenario itself, not its control


def test_guard_eval_quick_clips_where_logits_pass_tau_and_leaves_the_control_alone(tmp_path: Path) -> None:
    # tiny model, 30 steps: block 0's logits pass 10 around step 20 (the quick runs stay below 100),
    # so tau = 10 makes the guard act; the control (qk-norm) stays below 10
    out = tmp_path / "guard"
    args = ["--quick", "--out", str(out), "--scenarios", "logit_growth", "--tau", "10", "--jobs", "1"]
    table = guard_eval.main(args)
    assert table.splitlines()[2].startswith("| logit_growth | 0 |")
    (s,) = json.loads((out / "guard_scores_default.json").read_text())
    actions = s["actions"]
    assert actions and {a["action"] for a in actions} == {"qk_clip"} and all(a["applied"] for a in actions)
    run = guard_eval.load_run(out / "logit_growth_guard_default" / "seed0")
    logged = {
        int(step): v
        for step, v in zip(
            run.scalars["stability/block0/attn_logit_max"].steps,
            run.scalars["stability/block0/attn_logit_max"].values,
            strict=True,
        )
    }
    for a in actions:  # each clip is at a monitor step, where the logged logit really passed tau
        assert a["step"] % 5 == 4 and logged[a["step"]] > 10.0  # logged steps 4, 9, …
        assert len(a["heads"]) == 2 and max(a["heads"]) == pytest.approx(logged[a["step"]], rel=1e-6)
        assert a["value"] == pytest.approx(10.0 / max(a["heads"]), rel=1e-6)
    # training is bitwise the unguarded run's until the first clip, and differs right after it
    first = actions[0]["step"]
    without = guard_eval.load_run(out / "baseline" / "logit_growth" / "seed0").get("train/loss")
    with_guard = run.get("train/loss")
    assert without is not None and with_guard is not None
    # (a clip at logged step s acts after batch s's optimizer step: batch s + 1 is the first to see it)
    assert without.values[: first + 1].tolist() == with_guard.values[: first + 1].tolist()
    assert without.values[first + 1] != with_guard.values[first + 1]
    # the control with the guard: no action, the same losses as without it
    assert s["control_actions"] == [] and s["control_identical"]
    assert s["final_control_guarded"] == s["final_control"]
    # overhead measured on the same runs: one guard and one monitor timing per sampled step
    assert s["timing"]["sampled_steps"] == 6 and len(s["timing"]["guard_hook_s"]) == 6
    assert len(s["timing"]["monitor_hook_s"]) == 6
    assert "guard's `on_train_batch_end` at a sampled step" in table


def test_fp16_whatif_overflows_as_is_and_stays_finite_with_the_block_in_fp32() -> None:
    """The check behind the FP16 table: an FP16 Linear output past 65504 is inf; FP32Override removes it."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(8))
        model[0].bias.zero_()
        model[1][0].weight.fill_(1e4)  # outputs 8·1e4 + bias > 65504 for x = 1
    x = torch.full((2, 8), 1.0)
    amax, finite = guard_eval._fp16_forward(model, x, [])
    assert not finite and amax == float("inf")
    amax, finite = guard_eval._fp16_forward(model, x, [model[1]])
    assert finite
    plain = model[0](x).abs().max().item()  # the only FP16 output left: the first Linear's
    assert amax == pytest.approx(plain, rel=1e-3)
    assert "forward" not in model[1].__dict__  # the override was removed


def test_guard_eval_quick_fp16_whatif_is_logged_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "guard"
    table = guard_eval.main(["--quick", "--out", str(out), "--scenarios", "fp16_overflow", "--jobs", "1"])
    assert "FP16 forward with the guard's FP32 blocks" in table
    (s,) = json.loads((out / "guard_scores_default.json").read_text())
    # tiny model, 30 steps: far from 65504, so no FP32 block and the two forwards agree
    assert s["actions"] == [] and s["control_actions"] == []
    assert s["fp16"]["plain_checks"] == s["fp16"]["guarded_checks"] == 6
    assert s["fp16"]["plain_first_nonfinite"] is None and s["fp16"]["control_guarded_first_nonfinite"] is None
    assert 0 < s["fp16"]["plain_max_finite_amax"] == s["fp16"]["guarded_max_finite_amax"] < 65504
    # the what-if forward (eval mode, no grad) leaves training bitwise as without guard and probe
    without = guard_eval.load_run(out / "baseline" / "fp16_overflow" / "seed0").get("train/loss")
    with_guard = guard_eval.load_run(out / "fp16_overflow_guard_default" / "seed0").get("train/loss")
    assert without is not None and with_guard is not None
    assert without.values.tolist() == with_guard.values.tolist() and s["control_identical"]

"""``StabilityMeter``: a run's reports judged by the rule book as the monitor judges them, its
checkpoint state, and a Fabric-wrapped model measured as its original module."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.fabric import Fabric
from tests.conftest import TinyTransformer

from lightning_stability import AlarmOptions, StabilityMeter, judge_reports, measure


def hot_model() -> TinyTransformer:
    """Block 1's attention logits far above the default alarm's level (100)."""
    torch.manual_seed(0)
    model = TinyTransformer(d=16, heads=2, depth=2)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[:32].mul_(12.0)  # W_Q and W_K
    return model


def test_alarm_episode_warns_once_and_the_verdict_is_judge_reports() -> None:
    model = hot_model()
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    meter = StabilityMeter(model, sample_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports = [meter.measure(x, step=s) for s in (10, 20, 30)]
    early = [str(w.message) for w in caught if "early warning" in str(w.message)]
    assert len(early) == 1
    assert "StabilityMeter early warning at step 10: attn_logit_max>100 in block 1" in early[0]
    assert all(r.alarm and r.alarm_block == 1 for r in reports)
    assert reports[0].attn_logit_max > 100
    judged = meter.judgement()
    assert judged.status == "watch" and judged.steps == 3
    assert "qk_norm_or_clip" in [a.kind for a in judged.advice]
    # measure's reports, judged afterwards: the same verdict
    functional = [measure(model, x, sample_size=3, step=s) for s in (10, 20, 30)]
    assert [r.metrics() for r in functional] == [r.metrics() for r in reports]
    assert judge_reports(functional) == judged
    assert meter.summary().startswith("StabilityMeter verdict: watch (3 sampled step(s)")


def test_state_dict_carries_the_verdict_and_the_open_episode() -> None:
    model = hot_model()
    x = torch.randn(4, 6, 8)
    meter = StabilityMeter(model, alarm=AlarmOptions(rule="default"))
    meter.measure(x)
    meter.measure(x)
    state = meter.state_dict()
    assert state["measured"] == 2
    resumed = StabilityMeter(model)
    resumed.load_state_dict(state)
    assert resumed.judgement() == meter.judgement() and resumed.measured == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = resumed.measure(x)  # the episode is still open: no new warning
    assert report.step == 2 and report.alarm
    assert not [w for w in caught if "early warning" in str(w.message)]
    resumed.reset()
    assert resumed.judgement().steps == 0 and resumed.last_report is None


def test_fabric_wrapped_model_is_measured_as_its_module() -> None:
    torch.manual_seed(2)
    model = TinyTransformer(d=16, heads=2, depth=2)
    x = torch.randn(4, 6, 8)
    plain = measure(model, x).metrics()
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    wrapped = fabric.setup_module(model)
    assert measure(wrapped, x, precision=fabric.autocast).metrics() == plain
    meter = StabilityMeter(wrapped, precision=fabric.autocast)
    assert meter.model is model and meter.measure(x).metrics() == plain
    # a real mismatch: the exact pass ran in FP32, not inside the wrapper's autocast
    assert plain["stability/r_block"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_meter_measures_as_measure(precision: str) -> None:
    torch.manual_seed(3)
    model = TinyTransformer(d=16, heads=2, depth=2)
    x = torch.randn(6, 6, 8)
    meter = StabilityMeter(model, precision=precision, sample_size=4, seed=3)  # type: ignore[arg-type]
    got = meter.measure({"x": x}, step=7)
    want = measure(model, x, precision=precision, sample_size=4, seed=3, step=7)  # type: ignore[arg-type]
    assert got.metrics() == want.metrics() and got.step == 7 and meter.last_report is got

"""The judge: statuses, findings at their worst, advice and its tests, the alarm's record, state."""

from __future__ import annotations

import math

from lightning_stability.diagnostics.rolling import RollingZScore
from lightning_stability.rules import Evidence, Judge, Judgement, rule_book

BF16, FP16 = 2.0**-7, 2.0**-10


def step(n: int, eps: float = BF16, **blocks: list[float]) -> Evidence:
    tags = {f"stability/block{i}/{name}": v for name, vals in blocks.items() for i, v in enumerate(vals)}
    tags["stability/eps_mach"] = eps
    nonfinite = [v for v in blocks.get("r_block", []) if not math.isfinite(v)]
    tags["stability/nonfinite"] = float(len(nonfinite))
    return Evidence.from_tags(tags, n, [f"layers.{i}" for i in range(4)])


def judge(*steps: Evidence, alarm: str = "default") -> Judgement:
    j = Judge(rule_book(alarm), RollingZScore)  # type: ignore[arg-type]
    for ev in steps:
        j.observe(ev)
    return j.judgement()


def test_healthy_watch_at_risk_by_the_most_severe_finding() -> None:
    calm = step(0, r_local=[0.3 * BF16, 0.2 * BF16], attn_logit_max=[20.0, 30.0], rho_ln=[50.0, 40.0])
    assert judge(calm).status == "healthy"
    hot = step(5, r_local=[0.3 * BF16, 0.2 * BF16], attn_logit_max=[20.0, 150.0], rho_ln=[50.0, 40.0])
    assert judge(calm, hot).status == "watch"
    huge = step(9, r_local=[0.3 * BF16, 0.2 * BF16], attn_logit_max=[20.0, 2e4], rho_ln=[50.0, 40.0])
    j = judge(calm, hot, huge)
    (f,) = j.findings
    assert (j.status, f.rule, f.level, f.block, f.block_name) == (
        "at risk",
        "attn_logit_max",
        "at risk",
        1,
        "layers.1",
    )
    assert (f.value, f.threshold, f.step, f.first_step) == (
        2e4,
        1e4,
        9,
        5,
    )  # worst at 9, first past watch at 5
    assert [(a.kind, a.block, a.part) for a in j.advice] == [("qk_norm_or_clip", 1, "attention")]


def test_non_finite_forward_is_at_risk_names_the_first_block_and_advises_by_precision() -> None:
    for eps, kind in ((FP16, "prefer_bf16"), (BF16, "lower_lr")):
        j = judge(step(3, eps, r_local=[0.1 * eps, 0.2 * eps], r_block=[0.1 * eps, math.inf]))
        assert j.status == "at risk" and j.nonfinite_steps == 1
        (f,) = [f for f in j.findings if f.rule.startswith("nonfinite")]
        assert f.block == 1 and f.level == "at risk"
        assert [a.kind for a in j.advice] == [kind]


def test_fp32_advice_needs_the_floor_and_to_stand_out() -> None:
    def advice(
        r_local: list[float], att: float = 1e-3, ffn: float = 2e-3
    ) -> list[tuple[str, int | None, str | None]]:
        j = judge(
            step(0, r_local=[v * BF16 for v in r_local], r_attention_local=[att] * 4, r_ffn_local=[ffn] * 4)
        )
        return [(a.kind, a.block, a.part) for a in j.advice]

    assert advice([3.0, 1.0, 0.9, 0.8]) == [("fp32_region", 0, "ffn")]  # 3 ε_mach, 3× the others' median
    assert advice([3.0, 1.0, 0.9, 0.8], att=3e-3) == [("fp32_region", 0, "attention")]
    assert advice([3.0, 2.0, 1.9, 1.8]) == []  # past the floor, but 1.6× the median: does not stand out
    assert advice([0.94, 0.4, 0.35, 0.3]) == []  # stands out 2.7×, but under one rounding: the floor
    assert advice([1.9, 0.4, 0.35, 0.3]) == []  # a watch finding (> 1 ε_mach), still under the floor
    assert judge(step(0, r_local=[1.9 * BF16, 0.4 * BF16])).status == "watch"


def test_without_r_local_the_propagated_r_block_is_judged_but_never_moves_a_block_to_fp32() -> None:
    j = judge(step(2, r_block=[0.5 * BF16, 3 * BF16, 4 * BF16]))
    ext = j.extremes["r_local"]
    assert (ext.signal, ext.block, j.status) == ("r_block", 2, "watch")
    assert j.advice == []


def test_nothing_measured_is_no_verdict_and_an_alarm_is_never_healthy() -> None:
    assert judge().status is None
    assert judge(step(0, attn_logit_max=[3.0])).status is None  # no per-block error, no finding
    logged = judge(step(0, r_local=[0.1 * BF16])).with_logged_alarm([0])
    assert (logged.status, logged.alarm.steps, logged.alarm.identified) == ("watch", [0], False)


def test_the_paper_alarm_firing_is_a_finding() -> None:
    series = [1.0 + 0.01 * (i % 3) for i in range(20)] + [1.2, 9.0]
    tags = [
        {"stability/kappa_softmax_max": v, "stability/block0/r_local": 1e-4, "stability/eps_mach": BF16}
        for v in series
    ]
    steps = [Evidence.from_tags(t, i) for i, t in enumerate(tags)]
    j = judge(*steps, alarm="paper")
    assert j.alarm.steps == [20, 21] and j.status == "watch"
    (f,) = j.findings
    assert (f.rule, f.step, f.first_step) == ("kappa_softmax_z", 21, 20)
    assert [a.kind for a in j.advice] == ["lower_lr"]
    assert "kappa_softmax_z" not in judge(*steps).extremes  # the default book does not run the z-score


def test_state_dict_restores_the_judgement_and_the_z_history() -> None:
    steps = [
        step(i, r_local=[0.2 * BF16, (1 + i) * BF16], attn_logit_max=[50.0, 90.0 + 10 * i]) for i in range(4)
    ]
    whole = Judge(rule_book("paper"), RollingZScore)
    half = Judge(rule_book("paper"), RollingZScore)
    for ev in steps[:2]:
        whole.observe(ev)
        half.observe(ev)
    resumed = Judge(rule_book("paper"), RollingZScore)
    resumed.load_state_dict(half.state_dict())
    for ev in steps[2:]:
        whole.observe(ev)
        resumed.observe(ev)
    assert resumed.judgement() == whole.judgement()
    other = Judge(rule_book("default"))
    other.load_state_dict(half.state_dict())  # other rules: the judgement's record, no z history
    assert other.judgement().steps == 2

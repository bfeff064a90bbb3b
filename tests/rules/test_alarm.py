"""The alarm over one step's {tag: value}: the book's levels, rolling z-scores, combinations, episodes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lightning_stability.diagnostics.rolling import RollingZScore
from lightning_stability.rules import RULE_BY_NAME, Alarm, EpisodeLatch, Rule, rule_book


def _step(**blocks: list[float]) -> dict[str, float]:
    """``_step(attn_logit_max=[3, 150])`` → per-block tags."""
    return {f"stability/block{i}/{name}": v for name, vals in blocks.items() for i, v in enumerate(vals)}


def one(name: str, **changes: float | int | bool | str | None) -> Alarm:
    """An alarm of one rule of the book, its levels changed by ``changes``."""
    return Alarm([dataclasses.replace(RULE_BY_NAME[name], **changes)], RollingZScore)  # type: ignore[arg-type]


def default() -> Alarm:
    return Alarm(rule_book("default").alarm_rules, name="default")


def test_level_names_the_extreme_block() -> None:
    alarm = one("attn_logit_max")
    r = alarm.update(_step(attn_logit_max=[30.0, 150.0, 120.0]))
    assert (r.fired, r.rule, r.label, r.block, r.value, r.threshold) == (
        True,
        "attn_logit_max",
        "attn_logit_max>100",
        1,
        150.0,
        100.0,
    )
    assert not alarm.update(_step(attn_logit_max=[30.0, 99.9])).fired
    assert not alarm.update(_step(attn_logit_max=[100.0])).fired  # strict


def test_level_below_and_model_level_with_naming_block() -> None:
    entropy = one("entropy_collapse")
    r = entropy.update(_step(attention_entropy=[1.2, 0.05, 0.08]))
    assert (r.fired, r.block, r.value) == (True, 1, 0.05)
    headroom = one("fp16_headroom")
    fp16 = {"stability/eps_mach": 2.0**-10}
    values = {**fp16, "stability/fp16_headroom": math.log2(65504 / 30000.0), **_step(amax=[10.0, 3e4, 50.0])}
    r = headroom.update(values)
    assert r.fired and r.block == 1 and r.value == pytest.approx(1.12662, abs=1e-5)
    assert not headroom.update({**fp16, "stability/fp16_headroom": 3.0}).fired


def test_missing_signal_never_fires_and_says_so() -> None:
    for alarm in (one("attn_logit_max"), one("kappa_softmax_z"), one("r_local", fallback=None)):
        r = alarm.update({"stability/r_block": 1.0})
        assert not r.fired and not r.available


def _z_reference(series: list[float], window: int) -> list[float | None]:
    """z of each value against the previous `window` values (population std), float64 by hand."""
    out: list[float | None] = []
    for t, v in enumerate(series):
        prev = series[max(0, t - window) : t]
        if len(prev) < 2:
            out.append(None)
            continue
        mean = sum(prev) / len(prev)
        std = math.sqrt(sum((p - mean) ** 2 for p in prev) / len(prev))
        out.append((v - mean) / std)
    return out


def test_paper_rule_matches_reference_and_waits_for_full_window() -> None:
    g = np.random.default_rng(0)
    series = (5.0 + g.standard_normal(60)).tolist()
    series[40] = 12.0
    book = rule_book("paper")
    alarm = Alarm(book.alarm_rules, RollingZScore, name="paper")
    assert [r.name for r in book.alarm_rules] == ["kappa_softmax_z"]
    assert alarm.z_history("kappa_softmax_z") == (20, 0)
    ref = _z_reference(series, 20)
    fired = []
    for t, v in enumerate(series):
        r = alarm.update({"stability/kappa_softmax_max": v, **_step(kappa_softmax=[v / 2, v])})
        if t < 20:
            assert not r.fired  # window not full yet, whatever the z-score
        elif r.fired:
            assert r.value == pytest.approx(ref[t], rel=1e-12)
            assert r.block == 1
            fired.append(t)
    assert 40 in fired
    assert fired == [t for t in range(20, 60) if ref[t] is not None and ref[t] > 1.5]  # type: ignore[operator]


def test_log_z_rule_and_state_dict_roundtrip() -> None:
    series = [10.0 * 1.02**t for t in range(30)] + [1e4]
    alarm = one("logit_growth_z", window=10)
    for v in series[:25]:
        alarm.update(_step(attn_logit_max=[v]))
    twin = one("logit_growth_z", window=10)
    twin.load_state_dict(alarm.state_dict())
    for v in series[25:]:
        a, b = alarm.update(_step(attn_logit_max=[v])), twin.update(_step(attn_logit_max=[v]))
        assert a == b
    ref = _z_reference([math.log10(v) for v in series], 10)
    assert a.fired and a.block == 0 and a.value == pytest.approx(ref[-1], rel=1e-12)  # the jump to 1e4


def test_r_local_in_multiples_of_eps_mach() -> None:
    alarm = one("r_local", watch=10.0, fallback=None)
    eps = 2.0**-8
    r = alarm.update({"stability/eps_mach": eps, **_step(r_local=[0.01, 0.05])})
    assert r.fired and r.block == 1 and r.value == pytest.approx(0.05 / eps) and r.threshold == 10.0
    assert r.label == "r_local>10*eps_mach"
    assert not alarm.update({"stability/eps_mach": eps, **_step(r_local=[0.01, 0.03])}).fired
    assert not alarm.update(_step(r_local=[1.0])).available  # no ε_mach: not judged


def test_the_first_firing_rule_in_table_order_wins_and_every_rule_is_updated() -> None:
    z = dataclasses.replace(RULE_BY_NAME["logit_growth_z"], window=2, log=False, watch=100.0)
    alarm = Alarm([RULE_BY_NAME["attn_logit_max"], RULE_BY_NAME["rho_ln"], z], RollingZScore)
    bf16 = {"stability/eps_mach": 2.0**-7}
    r = alarm.update({**bf16, **_step(attn_logit_max=[5.0], rho_ln=[0.2])})
    assert r.fired and r.rule == "rho_ln" and r.block == 0
    alarm.update({**bf16, **_step(attn_logit_max=[6.0], rho_ln=[3.0])})
    assert alarm.z_history("logit_growth_z")[1] == 2  # the z-score saw every check
    r = alarm.update({**bf16, **_step(attn_logit_max=[500.0], rho_ln=[3.0])})
    assert r.rule == "attn_logit_max"
    assert not alarm.update({**bf16, **_step(attn_logit_max=[5.0], rho_ln=[3.0])}).fired


def test_episode_latch_warns_once_per_episode() -> None:
    latch = EpisodeLatch(quiet_checks=2)
    fired = [True, True, False, True, False, False, True]
    assert [latch.update(f) for f in fired] == [True, False, False, False, False, False, True]
    twin = EpisodeLatch(quiet_checks=2)
    twin.load_state_dict(latch.state_dict())
    assert twin.update(True) is False  # still inside the episode


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rules"):
        Alarm([])
    with pytest.raises(ValueError, match="zscore"):
        Alarm([RULE_BY_NAME["kappa_softmax_z"]])
    with pytest.raises(ValueError, match="fires_on"):
        Alarm([RULE_BY_NAME["rho_ln"]], fires_on=["nope"])
    with pytest.raises(ValueError, match="quiet_checks"):
        EpisodeLatch(0)
    with pytest.raises(ValueError, match="window"):
        RollingZScore(1)


def test_fp16_headroom_applies_to_fp16_passes_only() -> None:
    alarm = one("fp16_headroom")
    low = {"stability/fp16_headroom": 0.5}
    assert alarm.update({**low, "stability/eps_mach": 2.0**-10}).fired
    r = alarm.update({**low, "stability/eps_mach": 2.0**-7})  # BF16 has FP32's range
    assert not r.fired and not r.available


def test_default_alarm_reasons_and_silence() -> None:
    quiet = {
        "stability/eps_mach": 2.0**-10,
        "stability/fp16_headroom": 5.0,
        **_step(attn_logit_max=[20.0, 30.0], rho_ln=[50.0, 3.0], amax=[100.0, 2000.0]),
    }
    r = default().update(quiet)
    assert not r.fired and r.available and r.rule is None
    r = default().update({**quiet, "stability/fp16_headroom": 1.5})
    assert r.fired and r.label == "fp16_headroom<2" and r.block == 1
    r = default().update({**quiet, **_step(rho_ln=[50.0, 0.4])})
    assert (r.label, r.block) == ("rho_ln<1", 1)
    book = rule_book("default", {"attn_logit_max": math.inf, "fp16_headroom": -math.inf, "rho_ln": 0.0})
    off = Alarm(book.alarm_rules)
    assert not off.update({**quiet, **_step(attn_logit_max=[1e6], rho_ln=[0.0])}).fired


def test_default_rho_ln_level_applies_to_low_precision_passes_only() -> None:
    """Against FP32's rounding (2^-23) nearly every norm has rho_ln < 1: not a fragile forward."""
    eps_dominated = _step(rho_ln=[3.0, 0.2])
    for eps, fires in ((2.0**-7, True), (2.0**-10, True), (2.0**-23, False)):
        r = default().update({"stability/eps_mach": eps, **eps_dominated})
        assert r.fired is fires, eps
    r = default().update(eps_dominated)  # no eps_mach logged: not applicable
    assert not r.fired and not r.available


def test_non_finite_values_are_skipped_per_block_but_a_model_level_inf_counts() -> None:
    # a block's inf logit is not a level crossing of that block (the non-finite rule judges it);
    # with no finite block left, the model-level roll-up is read, and inf is past any level
    r = default().update(_step(attn_logit_max=[50.0, math.inf]))
    assert not r.fired and r.available
    r = default().update({"stability/attn_logit_max": math.inf, **_step(attn_logit_max=[math.inf])})
    assert r.fired and r.value == math.inf


def test_a_candidate_rule_is_a_row_like_any_other() -> None:
    rule = Rule("collapse", "rank_collapse", "below", watch=1e-3)
    assert rule.label == "rank_collapse<0.001"
    assert rule.level_of(1e-4) == "watch" and rule.level_of(1.0) is None
    assert Alarm([rule]).update(_step(rank_collapse=[0.5, 1e-4])).block == 1

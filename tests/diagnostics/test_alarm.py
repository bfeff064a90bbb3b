"""Candidate alarm rules over one step's {tag: value}: levels, rolling z-scores, combinations, episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_stability.diagnostics.alarm import (
    AnyOf,
    EpisodeLatch,
    Level,
    LocalErrorFloor,
    Persistent,
    RollingZ,
    block_values,
    default_alarm,
)


def _step(**blocks: list[float]) -> dict[str, float]:
    """``_step(attn_logit_max=[3, 150])`` → per-block tags."""
    return {f"stability/block{i}/{name}": v for name, vals in blocks.items() for i, v in enumerate(vals)}


def test_block_values_parses_only_that_metric_and_prefix() -> None:
    values = {
        "stability/block10/amax": 5.0,
        "stability/block2/amax": 1.0,
        "stability/block2/amax_other": 7.0,
        "scenario/block0/amax": 9.0,
        "stability/block3/amax": math.nan,
    }
    assert block_values(values, "amax") == {2: 1.0, 10: 5.0}
    assert block_values(values, "amax", prefix="scenario") == {0: 9.0}


def test_level_names_the_extreme_block() -> None:
    rule = Level("attn_logit_max", 100.0)
    r = rule.update(_step(attn_logit_max=[30.0, 150.0, 120.0]))
    assert (r.fired, r.block, r.value, r.threshold) == (True, 1, 150.0, 100.0)
    assert r.reason == "attn_logit_max>100 in block 1 (value 150)"
    assert not rule.update(_step(attn_logit_max=[30.0, 99.9])).fired


def test_level_below_and_model_level_with_naming_block() -> None:
    entropy = Level("attention_entropy", 0.1, above=False)
    r = entropy.update(_step(attention_entropy=[1.2, 0.05, 0.08]))
    assert (r.fired, r.block, r.value) == (True, 1, 0.05)
    headroom = Level("fp16_headroom", 2.0, above=False, block_metric="amax")
    values = {"stability/fp16_headroom": math.log2(65504 / 30000.0), **_step(amax=[10.0, 30000.0, 50.0])}
    r = headroom.update(values)
    assert r.fired and r.block == 1 and r.value == pytest.approx(1.12662, abs=1e-5)
    assert not headroom.update({"stability/fp16_headroom": 3.0}).fired


def test_missing_signal_never_fires_and_says_so() -> None:
    for rule in (Level("attn_logit_max", 1.0), RollingZ("kappa_softmax_max"), LocalErrorFloor()):
        r = rule.update({"stability/r_block": 1.0})
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


def test_rolling_z_matches_reference_and_waits_for_full_window() -> None:
    g = np.random.default_rng(0)
    series = (5.0 + g.standard_normal(60)).tolist()
    series[40] = 12.0
    rule = RollingZ("kappa_softmax_max", window=20, threshold=1.5, block_metric="kappa_softmax")
    ref = _z_reference(series, 20)
    fired = []
    for t, v in enumerate(series):
        r = rule.update({"stability/kappa_softmax_max": v, **_step(kappa_softmax=[v / 2, v])})
        if t >= 20:
            assert r.value == pytest.approx(ref[t], rel=1e-12)
        else:
            assert not r.fired  # window not full yet, whatever the z-score
        if r.fired:
            fired.append(t)
            assert r.block == 1
    assert 40 in fired
    assert fired == [t for t in range(20, 60) if ref[t] is not None and ref[t] > 1.5]  # type: ignore[operator]


def test_rolling_z_log_scale_and_state_dict_roundtrip() -> None:
    series = [10.0 * 1.02**t for t in range(30)] + [1e4]
    rule = RollingZ("attn_logit_max", window=10, threshold=3.0, log=True)
    results = [rule.update(_step(attn_logit_max=[v])) for v in series[:25]]
    ref = _z_reference([math.log10(v) for v in series], 10)
    assert results[-1].value == pytest.approx(ref[24], rel=1e-12)
    twin = RollingZ("attn_logit_max", window=10, threshold=3.0, log=True)
    twin.load_state_dict(rule.state_dict())
    for v in series[25:]:
        a, b = rule.update(_step(attn_logit_max=[v])), twin.update(_step(attn_logit_max=[v]))
        assert a == b
    assert a.fired and a.block == 0  # the jump to 1e4


def test_local_error_floor_against_eps_mach() -> None:
    rule = LocalErrorFloor(factor=10.0)
    eps = 2.0**-8
    r = rule.update({"stability/eps_mach": eps, **_step(r_local=[0.01, 0.05])})
    assert r.fired and r.block == 1 and r.threshold == pytest.approx(10 * eps)
    assert not rule.update({"stability/eps_mach": eps, **_step(r_local=[0.01, 0.03])}).fired


def test_any_of_reports_first_firing_rule_and_updates_all() -> None:
    z = RollingZ("attn_logit_max", window=2, threshold=100.0)
    combo = AnyOf([Level("attn_logit_max", 100.0), Level("rho_ln", 1.0, above=False), z])
    r = combo.update(_step(attn_logit_max=[5.0], rho_ln=[0.2]))
    assert r.fired and r.rule == "rho_ln<1" and r.block == 0
    combo.update(_step(attn_logit_max=[6.0], rho_ln=[3.0]))
    assert len(z._z) == 2  # the z-score saw every check even when an earlier rule fired
    r = combo.update(_step(attn_logit_max=[500.0], rho_ln=[3.0]))
    assert r.rule == "attn_logit_max>100"
    assert not combo.update(_step(attn_logit_max=[5.0], rho_ln=[3.0])).fired


def test_persistent_needs_consecutive_firings() -> None:
    rule = Persistent(Level("attn_logit_max", 100.0), checks=2)
    seq = [150.0, 50.0, 150.0, 150.0, 150.0]
    assert [rule.update(_step(attn_logit_max=[v])).fired for v in seq] == [False, False, False, True, True]


def test_episode_latch_warns_once_per_episode() -> None:
    latch = EpisodeLatch(quiet_checks=2)
    fired = [True, True, False, True, False, False, True]
    assert [latch.update(f) for f in fired] == [True, False, False, False, False, False, True]
    twin = EpisodeLatch(quiet_checks=2)
    twin.load_state_dict(latch.state_dict())
    assert twin.update(True) is False  # still inside the episode


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        RollingZ("x", window=1)
    with pytest.raises(ValueError, match="checks"):
        Persistent(Level("x", 1.0), checks=0)
    with pytest.raises(ValueError, match="rules"):
        AnyOf([])
    with pytest.raises(ValueError, match="quiet_checks"):
        EpisodeLatch(0)


def test_fp16_headroom_applies_to_fp16_passes_only() -> None:
    rule = Level("fp16_headroom", 2.0, above=False, only_eps_mach=2.0**-10)
    low = {"stability/fp16_headroom": 0.5}
    assert rule.update({**low, "stability/eps_mach": 2.0**-10}).fired
    r = rule.update({**low, "stability/eps_mach": 2.0**-7})  # BF16 has FP32's range
    assert not r.fired and not r.available


def test_default_alarm_reasons_and_silence() -> None:
    alarm = default_alarm()
    quiet = {
        "stability/eps_mach": 2.0**-10,
        "stability/fp16_headroom": 5.0,
        **_step(attn_logit_max=[20.0, 30.0], rho_ln=[50.0, 3.0], amax=[100.0, 2000.0]),
    }
    r = alarm.update(quiet)
    assert not r.fired and r.available
    r = alarm.update({**quiet, "stability/fp16_headroom": 1.5})
    assert r.fired and r.rule == "fp16_headroom<2" and r.block == 1
    r = alarm.update({**quiet, **_step(rho_ln=[50.0, 0.4])})
    assert (r.rule, r.block) == ("rho_ln<1", 1)
    off = default_alarm(attn_logit_max=math.inf, fp16_headroom_bits=-math.inf, rho_ln=-math.inf)
    assert not off.update({**quiet, **_step(attn_logit_max=[1e6], rho_ln=[0.0])}).fired


def test_default_rho_ln_level_applies_to_low_precision_passes_only() -> None:
    """Against FP32's rounding (2^-23) nearly every norm has rho_ln < 1: not a fragile forward."""
    rule = default_alarm()
    eps_dominated = _step(rho_ln=[3.0, 0.2])
    for eps, fires in ((2.0**-7, True), (2.0**-10, True), (2.0**-23, False)):
        r = rule.update({"stability/eps_mach": eps, **eps_dominated})
        assert r.fired is fires, eps
    r = rule.update(eps_dominated)  # no eps_mach logged: not applicable
    assert not r.fired and not r.available
    assert Level("rho_ln", 1.0, above=False).update({"stability/eps_mach": 2.0**-23, **eps_dominated}).fired

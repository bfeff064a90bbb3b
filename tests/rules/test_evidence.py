"""A step's tags parsed once (metrics.parse_tag) and read by a rule: extremes, fallbacks, applicability."""

from __future__ import annotations

import dataclasses
import math

from lightning_stability.rules import RULE_BY_NAME, Evidence, read


def test_from_tags_keeps_table_tags_by_level_and_drops_the_rest() -> None:
    ev = Evidence.from_tags(
        {
            "stability/block10/amax": 5.0,
            "stability/block2/amax": 1.0,
            "stability/block2/head1/attn_logit_max": 7.0,  # per head: not a block value
            "stability/attn_logit_max": 9.0,
            "stability/block2/amax_other": 3.0,  # not a metric of the table
            "scenario/block0/amax": 4.0,  # another prefix
            "stability/guard/actions": 1.0,
            "step": 3.0,
        },
        3,
        ["a", "b", "c"],
    )
    assert ev.blocks == {"amax": {2: 1.0, 10: 5.0}}
    assert ev.model == {"attn_logit_max": 9.0}
    assert (ev.name_of(2), ev.name_of(10), ev.name_of(None), ev.eps_mach) == ("c", None, None, None)
    assert Evidence.from_tags({"scenario/block0/amax": 4.0}, 0, prefix="scenario").blocks == {
        "amax": {0: 4.0}
    }


def test_read_takes_the_extreme_finite_block_or_the_model_value() -> None:
    logit = RULE_BY_NAME["attn_logit_max"]
    ev = Evidence.from_tags(
        {"stability/block0/attn_logit_max": 120.0, "stability/block1/attn_logit_max": 120.0}, 0
    )
    assert read(logit, ev) is not None and read(logit, ev).block == 0  # type: ignore[union-attr]  # ties: lowest
    rho = RULE_BY_NAME["rho_ln"]
    ev = Evidence.from_tags({"stability/block0/rho_ln": 3.0, "stability/block1/rho_ln": math.nan}, 0)
    r = read(rho, ev)
    assert r is not None and (r.value, r.block, r.applicable) == (3.0, 0, False)  # no ε_mach: not judged
    assert read(logit, Evidence.from_tags({"stability/attn_logit_max": math.nan}, 0)) is None


def test_r_local_in_eps_mach_and_its_r_block_fallback() -> None:
    rule = RULE_BY_NAME["r_local"]
    eps = 2.0**-7
    r = read(rule, Evidence.from_tags({"stability/eps_mach": eps, "stability/block1/r_local": 0.02}, 0))
    assert r is not None and (r.signal, r.block, r.raw) == ("r_local", 1, 0.02) and r.value == 0.02 / eps
    old = Evidence.from_tags({"stability/eps_mach": eps, "stability/block1/r_block": 0.02}, 0)
    assert read(rule, old).signal == "r_block"  # type: ignore[union-attr]
    assert read(dataclasses.replace(rule, fallback=None), old) is None
    # r_local measured but non-finite everywhere: no fallback to r_block (the non-finite rule judges it)
    inf = Evidence.from_tags(
        {"stability/eps_mach": eps, "stability/block0/r_local": math.inf, "stability/block0/r_block": 0.01}, 0
    )
    assert read(rule, inf) is None


def test_model_level_values_name_a_block() -> None:
    fp16 = 2.0**-10
    ev = Evidence.from_tags(
        {
            "stability/eps_mach": fp16,
            "stability/fp16_headroom": 1.5,
            "stability/nonfinite": 3.0,
            "stability/block0/amax": 10.0,
            "stability/block1/amax": 3e4,
            "stability/block0/r_block": 1e-3,
            "stability/block1/r_block": math.inf,
            "stability/block2/r_block": math.nan,
        },
        0,
    )
    headroom = read(RULE_BY_NAME["fp16_headroom"], ev)
    assert headroom is not None and (headroom.value, headroom.block, headroom.applicable) == (1.5, 1, True)
    nonfinite = read(RULE_BY_NAME["nonfinite_fp16"], ev)
    assert nonfinite is not None and (nonfinite.value, nonfinite.block) == (3.0, 1)  # the first non-finite

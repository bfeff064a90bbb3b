"""Which mitigation answers which finding in which block: every block, the guard's levels."""

from __future__ import annotations

import math

import pytest

from lightning_stability.rules import Evidence
from lightning_stability.rules.mitigation import GUARDED, block_findings, fp16_headroom_bits


def _ev(eps: float, **blocks: list[float]) -> Evidence:
    tags = {f"stability/block{i}/{name}": v for name, vals in blocks.items() for i, v in enumerate(vals)}
    return Evidence.from_tags({"stability/eps_mach": eps, **tags}, 0)


def test_every_block_past_the_guard_level_gets_the_mitigation_of_its_rule() -> None:
    ev = _ev(2.0**-7, attn_logit_max=[150.0, 120.0, 50.0], rho_ln=[0.8, 3.0, 3.0], r_local=[0.01, 0.01, 0.2])
    found = {i: [(f.rule, f.mitigation) for f in block_findings(ev, i)] for i in range(3)}
    assert found == {
        0: [("attn_logit_max", "qk_clip"), ("rho_ln", "eps_bump")],
        1: [("attn_logit_max", "qk_clip")],  # not only the most extreme block
        2: [("r_local", "fp32")],  # 25.6 ε_mach > 10; 0.01 = 1.3 ε_mach is a finding, not a guard level
    }
    assert [f.value for f in block_findings(ev, 2)] == [pytest.approx(0.2 / 2.0**-7)]
    assert block_findings(ev, 1, {"attn_logit_max": 130.0}) == []  # the guard's own level


def test_a_logit_clipped_to_tau_is_not_clipped_again_and_levels_are_strict() -> None:
    tau = GUARDED["attn_logit_max"]
    assert block_findings(_ev(2.0**-7, attn_logit_max=[tau * (1 + 1e-5)]), 0) == []
    assert block_findings(_ev(2.0**-7, attn_logit_max=[tau]), 0) == []
    assert block_findings(_ev(2.0**-7, rho_ln=[1.0]), 0) == []


def test_fp16_headroom_per_block_from_its_largest_output_on_fp16_passes_only() -> None:
    assert fp16_headroom_bits(0.0) == math.inf and fp16_headroom_bits(math.inf) == -math.inf
    ev = _ev(2.0**-10, amax=[10.0, 45000.0])
    ((f,),) = [block_findings(ev, 1)]
    assert (f.rule, f.mitigation, f.threshold) == ("fp16_headroom", "fp32", 1.0)
    assert f.value == pytest.approx(math.log2(65504 / 45000))
    assert block_findings(_ev(2.0**-7, amax=[10.0, 45000.0]), 1) == []  # BF16: FP32's range
    # no per-block amax: the model-level headroom goes to the block holding the largest output
    model = Evidence.from_tags({"stability/eps_mach": 2.0**-10, "stability/fp16_headroom": 0.5}, 0)
    assert [f.block for f in block_findings(model, 2, model_amax_block=2)] == [2]
    assert block_findings(model, 1, model_amax_block=2) == []

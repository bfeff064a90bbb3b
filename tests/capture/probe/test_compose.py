"""Report composition: the ε_mach override and a predictor without a W_O term."""

from __future__ import annotations

import pytest
import torch
from tests.capture.conftest import (
    Net,
    NoWoModel,
    cond64,
    measure_model,
    probe_input,
    run_probe,
)

from lightning_stability import diagnostics as D
from lightning_stability.capture import StabilityProbe
from lightning_stability.capture.probe import predictor_warnings
from lightning_stability.capture.structure import MISSING_WO, structure_warnings


def test_eps_mach_override_is_used_everywhere() -> None:
    torch.manual_seed(2)
    model = Net(depth=2)
    default = run_probe(model, probe_input())
    forced = run_probe(model, probe_input(), eps_mach=2.0**-10)
    assert default.eps_mach == D.eps_mach(torch.bfloat16) and forced.eps_mach == 2.0**-10
    assert forced.predictor_scaled == pytest.approx(forced.predictor * 2.0**-10)
    for a, b in zip(default.blocks, forced.blocks, strict=True):
        assert b.rho_ln == pytest.approx(a.rho_ln * 2.0**-10 / default.eps_mach, rel=1e-12)  # ρ_LN ∝ ε_mach
        assert b.r_block == a.r_block  # the measurement itself does not change


def test_missing_w_o_leaves_the_attention_term_out_instead_of_assuming_one() -> None:
    torch.manual_seed(0)
    model = NoWoModel()
    probe = StabilityProbe(model)
    assert all(MISSING_WO in b.missing for b in probe.blocks)
    report = measure_model(model, (torch.randn(2, 5, 16),))
    for i, b in enumerate(report.blocks):
        assert b.wo_norm is None
        # the attention term's factors are measured; only W_O is unknown
        assert b.kappa_softmax is not None and b.kappa_score is not None and b.kappa_v is not None
        mlp = model.layers[i].mlp
        assert b.kappa_eff == pytest.approx(cond64(mlp[0].weight) + cond64(mlp[2].weight), rel=1e-4)
        assert b.predictor == b.kappa_eff + b.c_ln  # no κ_softmax(1+κ_score)κ_V·1 added
        with_one = b.kappa_softmax * (1 + b.kappa_score) * b.kappa_v
        assert b.predictor < b.kappa_eff + b.c_ln + with_one  # what ‖W_O‖ = 1 would have given
    (line,) = predictor_warnings(probe.blocks)
    assert line.startswith(
        "layers.0, layers.1: no W_O found, so the combined predictor of these blocks leaves out"
    )
    assert "not computed with ||W_O|| = 1" in line
    assert any("no attention output projection W_O found" in w for w in structure_warnings(probe.blocks))


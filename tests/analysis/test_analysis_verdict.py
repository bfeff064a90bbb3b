"""The report's verdict judges ρ_LN only for a low-precision pass (an FP32 pass has ρ_LN < 1 by scale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_stability.analysis.logs import Run, Series
from lightning_stability.analysis.verdict import run_verdict


def _run(eps: float) -> Run:
    steps = np.arange(3)

    def s(v: float) -> Series:
        return Series(steps, np.full(3, v))

    return Run(
        "r",
        Path("."),
        {
            "stability/eps_mach": s(eps),
            "stability/block0/r_local": s(eps / 4),
            "stability/block0/rho_ln": s(0.3),
        },
    )


@pytest.mark.parametrize(("eps", "flagged"), [(2.0**-23, False), (2.0**-10, True), (2.0**-7, True)])
def test_rho_ln_flagged_only_for_a_low_precision_pass(eps: float, flagged: bool) -> None:
    v = run_verdict(_run(eps))
    assert (v.status == "watch") is flagged
    assert any("LNEpsilonBump" in a for a in v.advice) is flagged

"""call_diagnostics of recorded calls against float64 references."""

from __future__ import annotations

import math

import torch
from tests.capture.conftest import PaddedEncoder, run_captured_no_grad

from lightning_stability.capture import (
    call_diagnostics,
)
from lightning_stability.diagnostics import kappa_v


def test_kappa_v_of_padded_keys_in_capture() -> None:
    torch.manual_seed(6)
    model = PaddedEncoder(depth=1).eval()
    x = torch.randn(2, 10, 32)
    x[1, 6:] = 30.0  # padded positions hold large values
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 6:] = False
    _, calls, _ = run_captured_no_grad(model, lambda: model(x, mask))
    call = calls[0]
    d = call_diagnostics(call)
    for h in range(4):
        assert math.isclose(
            d.kappa_v[1, h].item(), kappa_v(call.v[1, h, :6].double()).item(), rel_tol=1e-9
        )


"""eps_mach of each dtype."""

from __future__ import annotations

import pytest
import torch

from lightning_stability.diagnostics import (
    eps_mach,
)


def test_eps_mach() -> None:
    assert eps_mach(torch.float32) == 2.0**-23
    assert eps_mach(torch.float16) == 2.0**-10
    with pytest.raises(ValueError, match="dtype"):
        eps_mach(torch.int32)


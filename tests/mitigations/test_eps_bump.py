"""The ε-bump object: Algorithm 1 against a float64 recomputation, ranks' largest proposal, restore, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_stability.mitigations import EpsilonBump, find_changeable_norms

EPS_MACH = 2.0**-10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.LayerNorm(64, eps=1e-5)
        self.b = nn.LayerNorm(64, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * 0.0113)  # ρ_LN of b ≈ 0.8 at FP16's ε_mach: between ρ* and 1


def _expected(var: float, d: int, eps: float, target: float = 0.6) -> float:
    """Algorithm 1 by hand: ρ = σ²·d·ε_mach/ε; below 1, ε → clip(σ²·d·ε_mach/ρ*); never lower."""
    rho = var * d * EPS_MACH / eps
    if rho >= 1.0:
        return eps
    return max(eps, min(max(var * d * EPS_MACH / target, 1e-6), 1e-2))


def test_measure_apply_restore_and_state() -> None:
    torch.manual_seed(0)
    net = Net()
    layers, unchangeable = find_changeable_norms(net)
    assert [n.name for n in layers] == ["a", "b"] and unchangeable == []
    bump = EpsilonBump(layers)
    bump.record_originals()
    x = torch.randn(4, 10, 64)
    table = bump.measure(net, (x,), {}, lambda: torch.autocast("cpu", enabled=False))
    assert table.shape == (2, 3) and table.dtype == torch.float64
    var_b = float(table[1, 0])
    with torch.no_grad():  # b's input: a's output × 0.0113, its median per-token variance in float64
        ref = (net.a(x).double() * 0.0113).var(dim=-1, unbiased=False).median()
    assert var_b == pytest.approx(float(ref), rel=1e-6)
    other_rank = table.clone()
    other_rank[1, 0] *= 1.2  # a second rank whose statistic proposes a larger ε
    changed = bump.apply([table.tolist(), other_rank.tolist()], EPS_MACH, step=3)
    want = _expected(var_b * 1.2, 64, 1e-5)
    assert (
        set(changed) == {"b"} and changed["b"] == pytest.approx(want, rel=1e-12) and net.b.eps == changed["b"]
    )
    assert net.a.eps == 1e-5  # ρ_LN ≥ 1: left alone
    assert bump.min_rho is not None and bump.min_rho[1:] == ("b", 3)
    assert bump.min_rho[0] == pytest.approx(var_b * 64 * EPS_MACH / 1e-5, rel=1e-12)
    state = bump.state_dict()
    bump.restore()
    assert net.b.eps == 1e-5
    twin = EpsilonBump(find_changeable_norms(net)[0])
    twin.load_state_dict(state)  # a resumed run trains with the bumped ε
    assert net.b.eps == changed["b"] and twin.bumped == {"b"} and twin.original_eps["b"] == 1e-5
    twin.restore()
    assert net.b.eps == 1e-5


def test_a_failed_forward_is_an_empty_table_and_changes_nothing() -> None:
    net = Net()
    bump = EpsilonBump(find_changeable_norms(net)[0])
    table = bump.table(None, torch.device("cpu"))
    assert table.shape == (2, 3) and all(math.isnan(v) for v in table[:, 0].tolist())
    assert bump.apply([table.tolist()], EPS_MACH, step=0) == {} and bump.min_rho is None
    assert EpsilonBump().table(None, torch.device("cpu")).shape == (0, 3)  # a block without norms

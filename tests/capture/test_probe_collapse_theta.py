"""Issue 17's diagnostics through the probe: rank collapse / token similarity of every block's
exact output, and the balanced-mass factor θ(p), against float64 recomputations with plain hooks."""

from __future__ import annotations

import copy
import math

import torch
from tests.capture.test_probe_correctness import Net, _x, run_probe
from tests.diagnostics.test_collapse import PostLNBlock
from torch import nn

from lightning_stability.diagnostics import balanced_mass_per_head, rank_collapse, token_similarity


def _stack(alpha: float, depth: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(PostLNBlock(32, 4, alpha) for _ in range(depth)))


def _hooked_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach())) for b in model]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_rank_collapse_names_a_collapsing_post_ln_stack_against_a_control() -> None:
    x = torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(1))
    collapsing, control = run_probe(_stack(0.05), x), run_probe(_stack(1.0), x)
    assert len(collapsing.blocks) == 8
    small = [b.rank_collapse for b in collapsing.blocks]
    ok = [b.rank_collapse for b in control.blocks]
    assert all(v is not None for v in small + ok)
    assert max(small[4:]) < 1e-3 < 0.3 < min(ok), (small, ok)  # type: ignore[operator]
    assert min(b.token_similarity for b in collapsing.blocks[4:]) > 0.999  # type: ignore[type-var]
    # equal to a float64 recomputation from the block outputs seen by plain hooks
    model64 = copy.deepcopy(_stack(0.05)).double()
    for got, out in zip(collapsing.blocks, _hooked_outputs(model64, x.double()), strict=True):
        ref_rc, ref_sim = rank_collapse(out).mean().item(), token_similarity(out).mean().item()
        assert math.isclose(got.rank_collapse, ref_rc, rel_tol=1e-3, abs_tol=1e-6)  # type: ignore[arg-type]
        assert math.isclose(got.token_similarity, ref_sim, rel_tol=1e-4, abs_tol=1e-6)  # type: ignore[arg-type]
    assert collapsing.metrics()["stability/block7/rank_collapse"] == small[7]


def test_theta_is_off_by_default_and_equals_a_float64_recomputation() -> None:
    torch.manual_seed(0)
    model, x = Net(depth=2), _x(n=12)
    assert all(b.theta is None for b in run_probe(model, x).blocks)
    report = run_probe(model, x, balanced_mass=True, log_per_head=True)
    model64 = copy.deepcopy(model).double()
    inputs: list[torch.Tensor] = []
    handles = [b.attn.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for b in model64.blocks]
    try:
        with torch.no_grad():
            model64(x.double())
    finally:
        for h in handles:
            h.remove()
    for i, (block, h_in) in enumerate(zip(report.blocks, inputs, strict=True)):
        b, n, d = h_in.shape
        with torch.no_grad():
            q, k, _ = model64.blocks[i].attn.qkv(h_in).reshape(b, n, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // 4), -1)
        theta = balanced_mass_per_head(p)  # (B, H)
        assert block.theta is not None and 0.0 < block.theta <= 1.0
        assert math.isclose(block.theta, theta.mean().item(), rel_tol=1e-5)
        for h, value in enumerate(block.per_head["theta"]):
            assert math.isclose(value, theta[:, h].mean().item(), rel_tol=1e-5)


def test_rank_collapse_as_an_alarm_level_names_the_most_collapsed_block() -> None:
    from lightning_stability.rules import Alarm, Rule

    collapse = Alarm([Rule("rank_collapse", "rank_collapse", "below", watch=1e-3)])
    x = torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(1))
    collapsing, control = run_probe(_stack(0.05), x), run_probe(_stack(1.0), x)
    fired = collapse.update(collapsing.metrics())
    values = {i: b.rank_collapse for i, b in enumerate(collapsing.blocks) if b.rank_collapse is not None}
    assert (
        fired.fired
        and fired.block == min(values, key=lambda i: values[i])
        and fired.value == min(values.values())
    )
    assert not collapse.update(control.metrics()).fired

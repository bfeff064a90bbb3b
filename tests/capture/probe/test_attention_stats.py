"""Per-head attention metrics reduced over heads, examples and calls as the metric table says."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.capture.conftest import Net, probe_input, run_probe

from lightning_stability.diagnostics import balanced_mass_per_head


def test_head_reduction_sum_sums_only_the_softmax_term() -> None:
    torch.manual_seed(1)
    model = Net(depth=2)
    x = probe_input(b=1)  # one example: the per-head values are exactly the block's per-example values
    by_max = run_probe(model, x, log_per_head=True)
    by_sum = run_probe(model, x, log_per_head=True, head_reduction="sum")
    for m, s in zip(by_max.blocks, by_sum.blocks, strict=True):
        heads = s.per_head
        assert s.kappa_softmax == pytest.approx(sum(heads["kappa_softmax"]), rel=1e-12)
        assert m.kappa_softmax == pytest.approx(max(heads["kappa_softmax"]), rel=1e-12)
        for name in ("kappa_score", "kappa_v", "attn_logit_max"):  # max over heads either way
            assert getattr(s, name) == getattr(m, name) == pytest.approx(max(heads[name]), rel=1e-12)
        assert s.predictor > m.predictor  # the softmax term grows ~H×, not H³×
        ratio = (s.predictor - (s.kappa_eff or 0) - (s.c_ln or 0)) / (
            m.predictor - (m.kappa_eff or 0) - (m.c_ln or 0)
        )
        assert ratio == pytest.approx(s.kappa_softmax / m.kappa_softmax, rel=1e-9)


def test_batch_mean_is_the_mean_of_single_example_values() -> None:
    torch.manual_seed(3)
    model = Net(depth=2)
    x = probe_input(b=4)
    mean = run_probe(model, x, batch_reduction="mean", log_per_head=True)
    singles = [run_probe(model, x[j : j + 1], log_per_head=True) for j in range(4)]
    for i, block in enumerate(mean.blocks):
        for name in ("kappa_score", "kappa_softmax", "kappa_v"):
            want = sum(getattr(s.blocks[i], name) for s in singles) / 4
            assert getattr(block, name) == pytest.approx(want, rel=1e-5)
            per_head = [sum(s.blocks[i].per_head[name][h] for s in singles) / 4 for h in range(4)]
            assert block.per_head[name] == pytest.approx(per_head, rel=1e-5)


def test_theta_is_off_by_default_and_equals_a_float64_recomputation() -> None:
    torch.manual_seed(0)
    model, x = Net(depth=2), probe_input(n=12)
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


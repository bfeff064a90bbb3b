"""Probe correctness (issue 10, probe items): detached references, dropout inside attention,
head_reduction="sum", the ε_mach override."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import diagnostics as D
from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.stability_report import StabilityReport


def run_probe(
    model: nn.Module, x: torch.Tensor, dtype=torch.bfloat16, eps_mach=None, **kw
) -> StabilityReport:  # type: ignore[no-untyped-def]
    probe = StabilityProbe(model, **kw)
    raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=dtype))
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0, eps_mach=eps_mach)


class Attention(nn.Module):
    """Self-attention with an optional dropout inside the attention call, not tied to ``training``."""

    def __init__(self, d: int, heads: int, sdpa_dropout: float = 0.0, weights_dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.sdpa_dropout, self.weights_dropout = heads, sdpa_dropout, weights_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.weights_dropout:  # written out by hand, F.dropout(training=True)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1)
            out = F.dropout(p, self.weights_dropout, training=True) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.sdpa_dropout)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, **attn_kw: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, **attn_kw)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(
        self, depth: int = 3, d: int = 32, heads: int = 4, in_place: bool = False, **attn_kw: float
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d, heads, **attn_kw) for _ in range(depth))
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
            if self.in_place:
                x.mul_(0.5)  # scales the residual stream in place, after the block's hooks ran
        return x


def _x(seed: int = 0, b: int = 4, n: int = 16) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed))


def test_reference_is_a_copy_when_the_model_scales_the_stream_in_place() -> None:
    torch.manual_seed(0)
    model = Net(in_place=True)
    report = run_probe(model, _x())
    plain = Net()
    plain.load_state_dict(model.state_dict())
    expected = run_probe(plain, _x())  # the same arithmetic without the in-place scaling
    for got in report.blocks:
        assert got.r_block is not None and 5e-4 < got.r_block < 2e-2, got.r_block  # not ≈ 1
        assert got.r_local is not None and got.r_local < 2e-2
    # block 0 sees the very same inputs in both models; later blocks see a halved stream
    assert report.blocks[0].r_block == pytest.approx(expected.blocks[0].r_block, rel=1e-12)
    assert report.blocks[0].r_local == pytest.approx(expected.blocks[0].r_local, rel=1e-12)


@pytest.mark.parametrize("kw", [{"sdpa_dropout": 0.2}, {"weights_dropout": 0.2}], ids=["sdpa", "F.dropout"])
def test_dropout_inside_attention_gets_the_same_stream_in_both_passes(kw: dict[str, float]) -> None:
    torch.manual_seed(0)
    model = Net(**kw)
    rng = torch.get_rng_state()
    report = run_probe(model, _x())
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's stream is untouched
    torch.manual_seed(0)
    calm = Net()  # the same weights, no dropout: the error scale to expect
    calm.load_state_dict(model.state_dict())
    baseline = run_probe(calm, _x())
    for got, ref in zip(report.blocks, baseline.blocks, strict=True):
        assert got.r_block is not None and got.r_block < 3 * ref.r_block + 1e-3, (got.r_block, ref.r_block)
        assert got.r_local is not None and got.r_local < 3 * ref.r_local + 1e-3, (got.r_local, ref.r_local)
    # the same probe twice: the same masks, the same numbers
    again = run_probe(model, _x())
    assert [b.r_block for b in again.blocks] == [b.r_block for b in report.blocks]


def test_head_reduction_sum_sums_only_the_softmax_term() -> None:
    torch.manual_seed(1)
    model = Net(depth=2)
    x = _x(b=1)  # one example: the per-head values are exactly the block's per-example values
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


def test_eps_mach_override_is_used_everywhere() -> None:
    torch.manual_seed(2)
    model = Net(depth=2)
    default = run_probe(model, _x())
    forced = run_probe(model, _x(), eps_mach=2.0**-10)
    assert default.eps_mach == D.eps_mach(torch.bfloat16) and forced.eps_mach == 2.0**-10
    assert forced.predictor_scaled == pytest.approx(forced.predictor * 2.0**-10)
    for a, b in zip(default.blocks, forced.blocks, strict=True):
        assert b.rho_ln == pytest.approx(a.rho_ln * 2.0**-10 / default.eps_mach, rel=1e-12)  # ρ_LN ∝ ε_mach
        assert b.r_block == a.r_block  # the measurement itself does not change


def test_batch_mean_is_the_mean_of_single_example_values() -> None:
    torch.manual_seed(3)
    model = Net(depth=2)
    x = _x(b=4)
    mean = run_probe(model, x, batch_reduction="mean", log_per_head=True)
    singles = [run_probe(model, x[j : j + 1], log_per_head=True) for j in range(4)]
    for i, block in enumerate(mean.blocks):
        for name in ("kappa_score", "kappa_softmax", "kappa_v"):
            want = sum(getattr(s.blocks[i], name) for s in singles) / 4
            assert getattr(block, name) == pytest.approx(want, rel=1e-5)
            per_head = [sum(s.blocks[i].per_head[name][h] for s in singles) / 4 for h in range(4)]
            assert block.per_head[name] == pytest.approx(per_head, rel=1e-5)

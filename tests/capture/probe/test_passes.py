"""The probe's passes against recomputations with plain hooks: local and propagated errors,
logit maxima, activation maxima, rank collapse, non-finite counts, the inputs kept."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import pytest
import torch
from tests.capture.conftest import Net, measure_with, probe_input, run_probe
from tests.conftest import PostLNBlock
from torch import nn

from lightning_stability.capture import StabilityProbe
from lightning_stability.capture.probe.passes import _Collector
from lightning_stability.capture.side_forward import side_forward
from lightning_stability.diagnostics import rank_collapse, token_similarity
from lightning_stability.metrics import RawKey

FRAGILE = 1


@pytest.fixture(scope="module")
def fragile() -> nn.Module:
    """4 pre-LN blocks; block 1's Q and K rows scaled ×9.5 so its attention logits reach ~150."""
    torch.manual_seed(0)
    model = Net(depth=4)
    with torch.no_grad():
        model.blocks[FRAGILE].attn.qkv.weight[:64] *= 9.5
    return model


def _outputs(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Every module's first output, with plain forward hooks (float64 model, or BF16 autocast)."""
    outs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, o.detach().clone()))
        for n, m in model.named_modules()
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


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


class _Overflowing(nn.Module):
    """A block whose low-precision output holds a known number of non-finite values."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.lin(x)
        if torch.is_autocast_enabled("cpu"):
            out = out.clone()
            out[0, :3, 1] = math.inf  # 3 entries
            out[1, 2, 4] = math.nan  # 1 entry
        return out


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Overflowing() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _kept_calls(model: nn.Module, x: torch.Tensor, **kw: object) -> Any:
    """The exact pass's kept block calls (inputs and outputs) of a probe on ``model``."""
    probe = StabilityProbe(model, **kw)  # type: ignore[arg-type]
    collector = _Collector(probe)
    with side_forward(model) as same_stream:
        collector.exact_pass(model, (x,), {}, same_stream)
    return [collector.local[("r_local", b.index)][0] for b in probe.blocks]


class _InPlaceBlock(nn.Module):
    """Writes its input in place before using it (the kept input must survive the re-run)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0.5)
        return x + self.lin(self.norm(x))


class _InPlaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_InPlaceBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


transformers = pytest.importorskip("transformers")


def test_fragile_block_is_named_by_r_local_not_by_r_block(fragile: nn.Module) -> None:
    report = run_probe(fragile, probe_input(n=32))
    r_local = [b.r_local for b in report.blocks]
    r_block = [b.r_block for b in report.blocks]
    others = [r for i, r in enumerate(r_local) if i != FRAGILE]
    assert r_local[FRAGILE] > 3 * max(others), r_local
    assert report.worst_block == f"blocks.{FRAGILE}" and report.worst_block_index == FRAGILE
    assert report.metrics()["stability/worst_block"] == FRAGILE
    # the propagated error keeps growing after the fragile block: its largest value is elsewhere
    assert max(range(4), key=lambda i: r_block[i]) != FRAGILE and r_block[-1] > r_block[FRAGILE]
    att = [b.r_attention_local for b in report.blocks]
    assert att[FRAGILE] > 3 * max(a for i, a in enumerate(att) if i != FRAGILE)
    assert all(b.r_ffn_local is not None and b.r_ffn_local < 2e-2 for b in report.blocks)


def test_logit_max_amax_headroom_equal_a_float64_recomputation(fragile: nn.Module) -> None:
    x = probe_input(n=32)
    report = run_probe(fragile, x, log_per_head=True)
    ref = copy.deepcopy(fragile).double()
    outs = _outputs(ref, x.double())
    for i, block in enumerate(report.blocks):
        qkv = outs[f"blocks.{i}.attn.qkv"]
        b, n, _ = qkv.shape
        q, k, _v = qkv.reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).abs()  # (B, H, n, n)
        per_head = logits.amax((0, 2, 3))
        assert block.per_head["attn_logit_max"] == pytest.approx(per_head.tolist(), rel=1e-5)
        assert block.attn_logit_max == pytest.approx(per_head.max().item(), rel=1e-5)
        inside = [t.abs().max().item() for name, t in outs.items() if name.startswith(f"blocks.{i}")]
        assert block.amax == pytest.approx(max(inside), rel=1e-5)
    assert 140 < report.blocks[FRAGILE].attn_logit_max < 170
    assert report.attn_logit_max == report.blocks[FRAGILE].attn_logit_max
    top_name, top = max(((n, t.abs().max().item()) for n, t in outs.items()), key=lambda kv: kv[1])
    assert report.amax_module == top_name
    assert report.fp16_headroom == pytest.approx(math.log2(65504 / top), abs=1e-5)


def test_r_local_and_mean_token_equal_a_plain_hook_recomputation(fragile: nn.Module) -> None:
    x = probe_input(n=32)
    report = run_probe(fragile, x)
    exact = _outputs(fragile, x)
    low = _outputs(fragile, x, autocast=True)
    for i, block in enumerate(report.blocks):
        # teacher forcing by hand: block i in BF16 autocast on its exact FP32 input
        x_in = exact["embed"] if i == 0 else exact[f"blocks.{i - 1}"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = fragile.blocks[i](x_in).float()
        want = ((y - exact[f"blocks.{i}"]).double().norm() / exact[f"blocks.{i}"].double().norm()).item()
        assert block.r_local == pytest.approx(want, rel=1e-5)
        # the sub-layers on their exact inputs (the outputs of the FP32 norms before them)
        for name, sub, norm in (("r_attention_local", "attn", "norm1"), ("r_ffn_local", "mlp", "norm2")):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = getattr(fragile.blocks[i], sub)(exact[f"blocks.{i}.{norm}"]).float()
            ref = exact[f"blocks.{i}.{sub}"].double()
            assert getattr(block, name) == pytest.approx(((y - ref).norm() / ref.norm()).item(), rel=1e-5)
        diff = (low[f"blocks.{i}"].float() - exact[f"blocks.{i}"]).double()
        per_token = diff.norm(dim=-1) / exact[f"blocks.{i}"].double().norm(dim=-1)
        assert block.r_block_mean_token == pytest.approx(per_token.mean().item(), rel=1e-5)
        assert block.r_block_median == pytest.approx(per_token.flatten().median().item(), rel=1e-5)
    assert report.r_block_mean_token == report.blocks[-1].r_block_mean_token


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


def test_non_finite_count_is_exact_on_the_cheap_path() -> None:
    torch.manual_seed(0)
    model = _Stack()
    x = torch.randn(2, 5, 8)
    outs: list[torch.Tensor] = []  # the low-precision block outputs, from plain hooks
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o.detach())) for b in model.blocks]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    finally:
        for h in handles:
            h.remove()
    want = [int((~torch.isfinite(o)).sum()) for o in outs]
    assert want[0] == 4 and want[1] > 4  # block 1 also spreads block 0's through its Linear
    probe = StabilityProbe(model, blocks=["blocks.*"])
    raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert [raw.values[RawKey("nonfinite", i, metric="r_block")].item() for i in range(2)] == want
    report = measure_with(probe, x)
    assert report.nonfinite == sum(want) and report.blocks[0].r_block == math.inf
    clean = StabilityProbe(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), blocks=["*"])
    raw = clean.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert raw.values[RawKey("nonfinite", 0, metric="r_block")].item() == 0


def test_a_block_fed_the_previous_output_keeps_no_second_copy() -> None:
    torch.manual_seed(0)
    calls = _kept_calls(Net(depth=3), probe_input())
    for prev, nxt in itertools.pairwise(calls):
        assert nxt.args[0] is prev.output  # one tensor: input of block j+1 = output of block j
    scaled = _kept_calls(Net(depth=3, in_place=True), probe_input())  # x.mul_(0.5) between the blocks
    for prev, nxt in itertools.pairwise(scaled):
        assert nxt.args[0] is not prev.output
        assert torch.equal(nxt.args[0], prev.output * 0.5)
    gains = _kept_calls(Net(depth=3), probe_input(), residual_gain_iters=1)  # not shared with residual gains
    assert all(nxt.args[0] is not prev.output for prev, nxt in itertools.pairwise(gains))


def test_local_errors_of_blocks_that_write_their_input_equal_plain_reruns() -> None:
    torch.manual_seed(0)
    model = _InPlaceNet()
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, a: ins.append(a[0].clone())) for b in model.blocks]
    handles += [b.register_forward_hook(lambda m, a, o: outs.append(o.clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x.clone())
    finally:
        for h in handles:
            h.remove()
    want = []
    for block, inp, out in zip(model.blocks, ins, outs, strict=True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(inp.clone()).float()
        want.append(((low - out).norm() / out.norm()).item())
    report = measure_with(StabilityProbe(model, blocks=["blocks.*"]), x)
    assert [b.r_local for b in report.blocks] == pytest.approx(want, rel=1e-6)


"""Issue 15, probe part: weight spectra reused only while a weight is bitwise unchanged (opt-in),
the non-finite count of the cheaper comparison path, the residual stream kept once."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from tests.capture.test_probe_correctness import Net, _x
from torch import nn

from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.capture.probe.passes import _Collector
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.probe.spectra import weight_statistics
from lightning_stability.capture.side_forward import side_forward
from lightning_stability.metrics import RawKey
from lightning_stability.stability_report import StabilityReport

WEIGHT_METRICS = ("wo_norm", "kappa_eff", "kappa_wkwq")


def measure(probe: StabilityProbe, x: torch.Tensor) -> StabilityReport:
    raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)


def weights(report: StabilityReport) -> list[tuple[float | None, ...]]:
    return [tuple(getattr(b, name) for name in WEIGHT_METRICS) for b in report.blocks]


def fresh(model: nn.Module, x: torch.Tensor) -> list[tuple[float | None, ...]]:
    """The weight metrics recomputed from scratch (a probe that never reuses)."""
    return weights(measure(StabilityProbe(model), x))


def test_reuse_is_off_by_default_and_keeps_nothing() -> None:
    torch.manual_seed(0)
    probe = StabilityProbe(Net(depth=2))
    measure(probe, _x())
    measure(probe, _x())
    assert probe.spectra.hits == 0 and probe.spectra.misses > 0 and not probe.spectra._kept


def test_unchanged_weights_are_reused_with_the_same_numbers() -> None:
    torch.manual_seed(0)
    model = Net(depth=2)
    probe = StabilityProbe(model, reuse_weight_spectra=True)
    first = weights(measure(probe, _x()))
    misses = probe.spectra.misses
    assert probe.spectra.hits == 0 and misses == 2 * 4  # per block: W_O, fc1, fc2, the Q/K pair
    second = weights(measure(probe, _x(seed=1)))  # another batch: the weights' numbers do not change
    assert probe.spectra.hits == misses and probe.spectra.misses == misses
    assert second == first == fresh(model, _x())
    assert all(v is not None and math.isfinite(v) for row in first for v in row)


def test_a_write_through_data_is_seen_although_the_version_counter_is_not_bumped() -> None:
    torch.manual_seed(0)
    model = Net(depth=2)
    probe = StabilityProbe(model, reuse_weight_spectra=True)
    before = weights(measure(probe, _x()))
    fc1 = model.blocks[1].mlp[0].weight
    version = fc1._version
    with torch.no_grad():
        fc1.data.add_(torch.randn(fc1.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    assert fc1._version == version  # a version-counter key would have reused the stale spectrum
    after = weights(measure(probe, _x()))
    assert probe.spectra.hits == 2 * 4 - 1  # everything but fc1 of block 1
    assert after == fresh(model, _x())
    assert after[0] == before[0] and after[1][1] != before[1][1]  # only block 1's kappa_eff moved


def test_an_optimizer_step_recomputes_every_trained_weight() -> None:
    torch.manual_seed(0)
    model = Net(depth=2)
    for p in model.blocks[0].parameters():  # block 0 frozen: its spectra stay reusable
        p.requires_grad_(False)
    probe = StabilityProbe(model, reuse_weight_spectra=True)
    measure(probe, _x())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(_x()).square().mean().backward()
    opt.step()
    hits = probe.spectra.hits
    after = weights(measure(probe, _x()))
    assert probe.spectra.hits - hits == 4  # block 0's four; block 1's were all recomputed
    assert after == fresh(model, _x())


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
    report = measure(probe, x)
    assert report.nonfinite == sum(want) and report.blocks[0].r_block == math.inf
    clean = StabilityProbe(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), blocks=["*"])
    raw = clean.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert raw.values[RawKey("nonfinite", 0, metric="r_block")].item() == 0


# ---------------------------------------------------------------- the residual stream kept once
def _kept_calls(model: nn.Module, x: torch.Tensor, **kw: object) -> Any:
    """The exact pass's kept block calls (inputs and outputs) of a probe on ``model``."""
    probe = StabilityProbe(model, **kw)  # type: ignore[arg-type]
    collector = _Collector(probe)
    with side_forward(model) as same_stream:
        collector.exact_pass(model, (x,), {}, same_stream)
    return [collector.local[("r_local", b.index)][0] for b in probe.blocks]


def test_a_block_fed_the_previous_output_keeps_no_second_copy() -> None:
    torch.manual_seed(0)
    calls = _kept_calls(Net(depth=3), _x())
    for prev, nxt in itertools.pairwise(calls):
        assert nxt.args[0] is prev.output  # one tensor: input of block j+1 = output of block j
    scaled = _kept_calls(Net(depth=3, in_place=True), _x())  # x.mul_(0.5) between the blocks
    for prev, nxt in itertools.pairwise(scaled):
        assert nxt.args[0] is not prev.output
        assert torch.equal(nxt.args[0], prev.output * 0.5)
    gains = _kept_calls(Net(depth=3), _x(), residual_gain_iters=1)  # not shared with residual gains
    assert all(nxt.args[0] is not prev.output for prev, nxt in itertools.pairwise(gains))


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
    report = measure(StabilityProbe(model, blocks=["blocks.*"]), x)
    assert [b.r_local for b in report.blocks] == pytest.approx(want, rel=1e-6)


class _LargestFloat64(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the largest float64 tensor any op creates under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel() * 8)
        return out


def test_weight_spectra_copies_stay_within_the_batch_budget(monkeypatch: Any) -> None:
    """A large model's weights are not stacked into one float64 copy: with a budget of two
    weights, no float64 tensor of the weight work is larger, and every value is unchanged
    (also when reusing kept spectra across measurements)."""
    from lightning_stability.capture.probe import spectra as spectra_module
    from lightning_stability.diagnostics import linear

    torch.manual_seed(0)
    model = Net(depth=6, d=32)
    x = _x()
    heads = {b: 4 for b in range(6)}
    expected = weights(measure(StabilityProbe(model), x))  # default budget: each shape in one call
    weight_bytes = 32 * 32 * 8
    with _LargestFloat64() as whole:
        probe = StabilityProbe(model)
        weight_statistics(probe.blocks, heads, probe.spectra, RawMeasurement())
    assert whole.largest >= 6 * weight_bytes  # the test can fail: one stack of six weights

    budget = 2 * weight_bytes
    monkeypatch.setattr(linear, "BATCH_BYTES", budget)
    monkeypatch.setattr(spectra_module, "BATCH_BYTES", budget)
    with _LargestFloat64() as bounded:
        probe = StabilityProbe(model)
        weight_statistics(probe.blocks, heads, probe.spectra, RawMeasurement())
    assert 0 < bounded.largest <= budget
    assert weights(measure(StabilityProbe(model), x)) == expected
    reusing = StabilityProbe(model, reuse_weight_spectra=True)
    assert weights(measure(reusing, x)) == weights(measure(reusing, x)) == expected
    assert reusing.spectra.hits == reusing.spectra.misses > 0  # the second measurement reused all

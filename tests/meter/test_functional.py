"""``lightning_stability.measure``: the inputs it takes, what it leaves unchanged, its refusals, and
that its report's ``metrics()`` are the monitor's logged values on a real fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from tests.conftest import MemoryLogger, TinyTransformer, make_loader, trainer_kwargs
from torch import nn

from lightning_stability import AlarmOptions, ProbeOptions, StabilityMonitor, judge_reports, measure
from lightning_stability.capture.batch import sample_inputs
from lightning_stability.stability_report import StabilityReport


class KwargModel(nn.Module):
    """``forward(x, *, scale)``: reached by a dict of keyword arguments or a tuple plus defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyTransformer(d=16, heads=2, depth=2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.net(x * scale)


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_tensor_tuple_and_dict_inputs_give_the_same_report() -> None:
    torch.manual_seed(0)
    model = KwargModel()
    x = torch.randn(4, 6, 8)
    by_tensor = measure(model, x).metrics()
    assert by_tensor == measure(model, (x,)).metrics() == measure(model, {"x": x}).metrics()
    scaled = measure(model, (x, 3.0)).metrics()
    assert scaled == measure(model, {"x": x, "scale": 3.0}).metrics()
    assert scaled["stability/r_block"] != by_tensor["stability/r_block"]  # the second argument arrived
    assert 0 < by_tensor["stability/r_block"] < 0.05  # BF16 against FP32 on a random model


def test_leaves_parameters_rng_modes_and_hooks_as_they_were() -> None:
    torch.manual_seed(1)
    model = TinyTransformer(d=16, heads=2, depth=2, dropout=0.1)
    model.train()
    model.blocks[1].eval()  # a mixed mode must survive too
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    hooks = _hooks(model)
    x = torch.randn(4, 6, 8)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    report = measure(model, x, sample_size=3, log_per_head=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == hooks
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    assert len(report.blocks[0].per_head["kappa_softmax"]) == 2


def test_sample_size_and_seed_choose_the_examples() -> None:
    torch.manual_seed(2)
    model = TinyTransformer(d=16, heads=2, depth=2)
    x = torch.randn(8, 6, 8)
    a = measure(model, x, sample_size=3, step=5)
    assert a.metrics() == measure(model, x, sample_size=3, step=5).metrics()  # seeded: repeatable
    (chosen,), _ = sample_inputs((x,), {}, 3, 5)  # the examples of seed + step = 5
    assert measure(model, chosen).metrics() == a.metrics()
    assert measure(model, x, sample_size=3, step=4, seed=1).metrics() == a.metrics()
    assert measure(model, x, sample_size=3, step=6).metrics() != a.metrics()
    assert a.step == 5


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"precision": "bf17"}, "`precision`"),
        ({"sample_size": 0}, "`sample_size`"),
        ({"step": -1}, "`step`"),
        ({"blocks": "blocks.*"}, "`blocks`"),
        ({"probe": ProbeOptions(head_reduction="mean")}, "`probe.head_reduction`"),  # type: ignore[arg-type]
        ({"alarm": AlarmOptions(rule="loud")}, "`alarm.rule`"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_named_with_their_value(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(MisconfigurationException, match=named):
        measure(TinyTransformer(), torch.randn(2, 6, 8), **kwargs)


def test_inputs_of_another_kind_are_refused_naming_them() -> None:
    with pytest.raises(MisconfigurationException, match=r"`inputs` must be .* got list"):
        measure(TinyTransformer(), [torch.randn(2, 6, 8)])
    with pytest.raises(MisconfigurationException, match=r"`model` must be a torch\.nn\.Module"):
        measure(lambda x: x, torch.randn(2, 6, 8))  # type: ignore[arg-type]


def test_precision_names_and_a_context_factory() -> None:
    torch.manual_seed(3)
    model = TinyTransformer(d=16, heads=2, depth=2)
    x = torch.randn(4, 6, 8)
    assert measure(model, x, precision="fp32").r_block == 0.0  # FP32 against FP32
    fp16 = measure(model, x, precision="fp16")
    assert fp16.dtype == "float16" and 0 < fp16.r_block < measure(model, x).r_block
    own = measure(model, x, precision=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert own.metrics() == measure(model, x, precision="bf16").metrics()


class Recording(StabilityMonitor):
    """Also calls ``measure`` on the batch it measures, inside the fit (a side-effect-free call)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.functional: list[StabilityReport] = []

    def measure(
        self, trainer: Trainer, pl_module: LightningModule, args: Any, kwargs: Any
    ) -> StabilityReport:
        step = trainer.global_step  # logged at step - 1, the sample seeded by seed + global_step
        report = measure(
            pl_module, args, sample_size=self.sample_size, step=step - 1, seed=self.seed + 1, probe=self.probe
        )
        self.functional.append(report)
        return super().measure(trainer, pl_module, args, kwargs)


def test_metrics_are_what_the_monitor_logs_on_a_real_fit(tmp_path: Path) -> None:
    """A bf16-mixed fit: at every sampled step ``measure(model, batch).metrics()`` is exactly the
    logged row, and ``judge_reports`` of the reports is the monitor's end-of-fit verdict."""
    torch.manual_seed(4)
    model = TinyTransformer(d=32, heads=4, depth=3)
    probe = ProbeOptions(residual_gain_iters=2)
    monitor = Recording(every_n_steps=2, sample_size=5, probe=probe)
    logger = MemoryLogger()
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=6, logger=logger, precision="bf16-mixed", callbacks=[monitor])
    )
    unmonitored = copy.deepcopy(model)
    trainer.fit(model, make_loader(n=48))
    logged = [(s, m) for s, m in logger.records if "stability/r_block" in m]
    assert [s for s, _ in logged] == [1, 3, 5] == [r.step for r in monitor.functional]
    for (_, row), report in zip(logged, monitor.functional, strict=True):
        assert report.metrics() == row
    assert judge_reports(monitor.functional) == monitor.judgement
    # and the functional calls inside the fit changed nothing of its training
    Trainer(**trainer_kwargs(tmp_path / "plain", max_steps=6, precision="bf16-mixed")).fit(
        unmonitored, make_loader(n=48)
    )
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), unmonitored.parameters(), strict=True))


def test_fp8_what_if_reports_every_linear_layer_and_keeps_delayed_scaling_history() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(8, 16)
    before = copy.deepcopy(model.state_dict())
    bf16 = measure(model, x).metrics()
    current = measure(model, x, precision="fp8").metrics()
    layer_tags = {t.split("/")[2] for t in current if t.startswith("stability/layer/")}
    assert layer_tags == {"0", "2"}  # both linear layers, named by module
    assert not any(t.startswith("stability/layer/") for t in bf16)
    # E4M3 keeps 3 mantissa bits against BF16's 7: its error on the same layer is the larger
    assert current["stability/layer/0/fp8_error"] > current["stability/layer/0/bf16_error"] > 0
    delayed = ProbeOptions(fp8_recipe="delayed")
    measure(model, x, precision="fp8", probe=delayed)
    # the second call scales from the first call's amax: one factory per model and options
    second = measure(model, 4 * x, precision="fp8", probe=delayed).metrics()
    fresh = measure(copy.deepcopy(model), 4 * x, precision="fp8", probe=delayed).metrics()
    assert second["stability/layer/0/input/fp8_amax"] == fresh["stability/layer/0/input/fp8_amax"]
    assert second["stability/layer/0/input/fp8_saturation"] > fresh["stability/layer/0/input/fp8_saturation"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp8_options_need_the_fp8_precision() -> None:
    with pytest.raises(MisconfigurationException, match=r"probe.fp8_recipe.*precision='bf16'"):
        measure(nn.Linear(4, 4), torch.randn(2, 4), probe=ProbeOptions(fp8_recipe="mxfp8"))

"""StabilityMonitor under the ways large models train in one process: torch.compile, activation
checkpointing, gradient accumulation; and the sharded strategies it refuses (FSDP1, DeepSpeed)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from tests.conftest import MemoryLogger, TinyTransformer, make_loader, trainer_kwargs
from torch._dynamo.testing import CompileCounter
from torch.utils.checkpoint import checkpoint

from lightning_stability import StabilityMonitor
from lightning_stability.callbacks.options import ProbeOptions
from lightning_stability.capture.sharding import DEEPSPEED_MESSAGE, FSDP1_MESSAGE
from lightning_stability.stability_report import StabilityReport


def fit_reports(
    tmp_path: Path, model: Any, steps: int = 3, **trainer_kw: Any
) -> tuple[list[StabilityReport], MemoryLogger]:
    """Fit with a monitor at every step; the reports of the measured steps and the logger."""
    reports: list[StabilityReport] = []

    class Keep(StabilityMonitor):
        def _log(self, trainer: Trainer, pl_module: Any, report: StabilityReport) -> None:
            reports.append(report)
            super()._log(trainer, pl_module, report)

    logger = MemoryLogger()
    monitor = Keep(every_n_steps=1, sample_size=4, probe=ProbeOptions(residual_gain_iters=1))
    kw = {**trainer_kwargs(tmp_path, max_steps=steps, precision="bf16-mixed", logger=logger), **trainer_kw}
    Trainer(**kw, callbacks=[monitor]).fit(model, make_loader(n=48, batch_size=4))
    return reports, logger


# ------------------------------------------------------------------------------ torch.compile
class CompiledBlocks(TinyTransformer):
    """Each block compiled on its own (``self.blocks[i] = torch.compile(block)``)."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        for i, block in enumerate(self.blocks):
            self.blocks[i] = torch.compile(block, backend=backend)


class CompiledInner(TinyTransformer):
    """The network inside the LightningModule compiled as a whole (``self.net = torch.compile(net)``)."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        body = Body(self.embed, self.blocks)
        del self.embed, self.blocks
        self.net = torch.compile(body, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.net(x)).mean(1))


class Body(torch.nn.Module):
    def __init__(self, embed: torch.nn.Module, blocks: torch.nn.ModuleList) -> None:
        super().__init__()
        self.embed, self.blocks = embed, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def plain() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


@pytest.mark.parametrize("how", ["blocks", "inner", "lightning_module"])
def test_compiled_model_measured_as_eager_without_recompiling(tmp_path: Path, how: str) -> None:
    """Names without ``_orig_mod``, the eager model's numbers, and the monitor's passes
    (every step) cause no compilation of the user's model: the same frames compiled as without it."""
    eager, _ = fit_reports(tmp_path / "eager", plain())

    def compiled(monitor: bool) -> tuple[list[StabilityReport], CompileCounter]:
        torch._dynamo.reset()
        counter = CompileCounter()
        torch.manual_seed(0)
        if how == "blocks":
            model: Any = CompiledBlocks(counter)
        elif how == "inner":
            model = CompiledInner(counter)
        else:
            model = torch.compile(TinyTransformer(), backend=counter)
        if monitor:
            return fit_reports(tmp_path / how, model)[0], counter
        Trainer(**trainer_kwargs(tmp_path / "no", max_steps=3, precision="bf16-mixed")).fit(
            model, make_loader(n=48, batch_size=4)
        )
        return [], counter

    _, alone = compiled(monitor=False)
    reports, counter = compiled(monitor=True)
    assert counter.frame_count == alone.frame_count > 0  # no recompilation caused by the monitor
    assert counter.op_count == alone.op_count
    assert len(reports) == 3
    want = "net.blocks" if how == "inner" else "blocks"
    assert [b.name for b in reports[-1].blocks] == [f"{want}.0", f"{want}.1"]
    for got, ref in zip(reports, eager, strict=True):  # same trajectory, same measurement
        assert got.metrics() == ref.metrics()


# ------------------------------------------------------------------------------ checkpointing
class Checkpointed(TinyTransformer):
    """Every block through ``torch.utils.checkpoint`` (non-reentrant), always."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(self.norm(x).mean(1))


def test_activation_checkpointing_measured_as_without(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reports, _ = fit_reports(tmp_path / "ckpt", Checkpointed())
    ref, _ = fit_reports(tmp_path / "plain", plain())
    assert len(reports) == 3
    for got, want in zip(reports, ref, strict=True):
        assert got.metrics() == want.metrics()


def test_transformers_gradient_checkpointing_measured_as_without(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.distributed.workers import llama_module

    def llama(checkpointing: bool) -> Any:
        model = llama_module()
        if checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    assert transformers
    gen = torch.Generator().manual_seed(0)
    items = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (16, 10), generator=gen)]
    out: list[list[dict[str, float]]] = [[], []]

    class Keep(StabilityMonitor):
        into: list[dict[str, float]]

        def _log(self, trainer: Trainer, pl_module: Any, report: StabilityReport) -> None:
            self.into.append(report.metrics())

    for flag, into in zip((True, False), out, strict=True):
        monitor = Keep(every_n_steps=1, sample_size=2)
        monitor.into = into
        Trainer(
            **trainer_kwargs(tmp_path / str(flag), max_steps=2, precision="bf16-mixed"), callbacks=[monitor]
        ).fit(llama(flag), torch.utils.data.DataLoader(items, batch_size=4))
    assert len(out[0]) == 2 and out[0] == out[1]


# ------------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_counts_optimizer_steps_and_names_the_micro_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """accumulate_grad_batches=4: measured after optimizer steps 2 and 4 (every_n_steps=2), each on
    the last micro-batch of its window (batch_idx 7 and 15), logged under Lightning's step; never
    on a micro-batch before the first optimizer step."""
    seen: list[tuple[int, int | None, int]] = []

    class Keep(StabilityMonitor):
        def _log(self, trainer: Trainer, pl_module: Any, report: StabilityReport) -> None:
            seen.append((trainer.global_step, report.batch_idx, report.step))
            super()._log(trainer, pl_module, report)

    logger = MemoryLogger()
    kw = trainer_kwargs(tmp_path, max_steps=4, logger=logger, accumulate_grad_batches=4, log_every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        Trainer(**kw, callbacks=[Keep(every_n_steps=2, sample_size=2)]).fit(
            plain(), make_loader(n=64, batch_size=2)
        )
    assert seen == [(2, 7, 1), (4, 15, 3)]
    assert [s for s, m in logger.records if "stability/r_block" in m] == [1, 3]
    named = [r.getMessage() for r in caplog.records if "accumulate_grad_batches=4" in r.getMessage()]
    assert len(named) == 1 and "last micro-batch" in named[0] and "batch_idx 7" in named[0]


# ------------------------------------------------------------------------------ refused strategies
class CPUFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) under another class name, which passes Lightning's
    accelerator check on CPU; FSDP1 itself then refuses the CPU when it wraps the model."""


def test_fsdp1_refused_once_naming_the_alternative(tmp_path: Path) -> None:
    monitor = StabilityMonitor(every_n_steps=1)
    trainer = Trainer(**{**trainer_kwargs(tmp_path, max_steps=2), "strategy": CPUFSDP()}, callbacks=[monitor])
    try:
        with pytest.warns(UserWarning) as record, pytest.raises(Exception, match=r"(?i)non-CPU|accelerator"):
            trainer.fit(plain(), make_loader())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    said = [str(w.message) for w in record if "StabilityMonitor" in str(w.message)]
    assert said == [f"StabilityMonitor will not measure in this fit: {FSDP1_MESSAGE}"]
    assert "ModelParallelStrategy" in FSDP1_MESSAGE and "single device" in FSDP1_MESSAGE


def test_deepspeed_refused_once_naming_the_alternative(tmp_path: Path) -> None:
    """deepspeed is not installed here: a DeepSpeedStrategy instance built without its
    ``__init__`` (which imports deepspeed) stands in for the trainer's strategy."""
    monitor = StabilityMonitor(every_n_steps=1)
    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy), global_step=1)
    with pytest.warns(UserWarning, match="will not measure") as record:
        monitor.setup(trainer, plain(), "fit")  # type: ignore[arg-type]
        for _ in range(3):  # sampled steps are skipped silently
            monitor.on_train_batch_end(trainer, plain(), None, (torch.zeros(2, 6, 8), None), 0)  # type: ignore[arg-type]
    assert [str(w.message) for w in record] == [
        f"StabilityMonitor will not measure in this fit: {DEEPSPEED_MESSAGE}"
    ]
    assert monitor.last_report is None


def test_fsdp1_modules_in_the_model_refused_once(tmp_path: Path) -> None:
    """Found by the probe (Fabric, a hand-wrapped model): one warning, no step skipped noisily."""

    class FullyShardedDataParallel(torch.nn.Module):
        """Stands in for FSDP1's wrapper (recognised by its class name; FSDP1 cannot run on CPU)."""

    model = plain()
    model.blocks[0].wrapped = FullyShardedDataParallel()
    monitor = StabilityMonitor(every_n_steps=1, sample_size=2)
    with pytest.warns(UserWarning) as record:
        Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=[monitor]).fit(model, make_loader())
    said = [str(w.message) for w in record if "StabilityMonitor" in str(w.message)]
    assert said == [f"StabilityMonitor will not measure in this fit: {FSDP1_MESSAGE}"]
    assert monitor.last_report is None

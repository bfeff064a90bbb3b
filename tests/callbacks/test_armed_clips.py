"""StabilityGuard's QK-clip at every step once armed: real tiny fits, an independent per-step reference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tests.conftest import MemoryLogger, TinyTransformer, make_loader, trainer_kwargs
from torch import Tensor, nn

from lightning_stability import StabilityGuard, StabilityMonitor
from lightning_stability.capture import logit_watch
from lightning_stability.capture.attention.state import _STATE

D, H = 32, 4
DH = D // H
TAU = 100.0
GROWTH = 1.3  # head 0's query and key rows grow by this before every step: its logits by 1.69

pytestmark = pytest.mark.filterwarnings("ignore:.*StabilityGuard.*", "ignore:.*StabilityMonitor.*")


class Regrow(Callback):
    """Before every training step, scale head 0's query and key rows of block 0 (the optimizer regrowing
    the logits between two clips, made deterministic)."""

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        qkv = pl_module.blocks[0].attn.qkv  # type: ignore[index]
        for t in (qkv.weight, qkv.bias):
            t[:DH].mul_(GROWTH)
            t[D : D + DH].mul_(GROWTH)


def training_logits(model: TinyTransformer) -> list[list[float]]:
    """Block 0's per-head max |q·kᵀ/√d_h| of every training forward, recomputed in float64 by a plain hook."""
    seen: list[list[float]] = []

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        z = args[0].detach().double()
        b, n, _ = z.shape
        w, bias = module.qkv.weight.detach().double(), module.qkv.bias.detach().double()
        q, k, _ = (z @ w.T + bias).reshape(b, n, 3, H, DH).permute(2, 0, 3, 1, 4)
        seen.append((q @ k.transpose(-1, -2) / math.sqrt(DH)).abs().amax(dim=(0, 2, 3)).tolist())

    model.blocks[0].attn.register_forward_pre_hook(pre)
    return seen


def model_with_fragile_head() -> TinyTransformer:
    torch.manual_seed(0)
    model = TinyTransformer(lr=0.0)  # only the guard and Regrow change weights
    with torch.no_grad():
        w = model.blocks[0].attn.qkv.weight
        w[:DH].mul_(9.0)
        w[D : D + DH].mul_(9.0)
    return model


def fit(
    model: TinyTransformer, tmp_path: Any, guard: StabilityGuard, steps: int, ckpt_path: str | None = None
) -> Trainer:
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=steps, logger=MemoryLogger()),
        callbacks=[monitor, guard, Regrow()],
    )
    trainer.fit(model, make_loader(n=8, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def guard_tags(trainer: Trainer, name: str) -> dict[int, float]:
    logger = trainer.logger
    assert isinstance(logger, MemoryLogger)
    return {s: m[f"stability/guard/{name}"] for s, m in logger.records if f"stability/guard/{name}" in m}


def test_armed_block_is_clipped_after_every_step_by_its_training_forward(tmp_path: Any) -> None:
    model = model_with_fragile_head()
    ref = training_logits(model)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer = fit(model, tmp_path, guard, steps=8)
    # armed by the first sampled clip (logged step 1), then clipped at every step 2..7
    assert [(a.step, a.block_name, a.action, a.applied) for a in guard.actions] == [
        (1, "blocks.0", "qk_clip", True)
    ]
    assert "armed" in guard.actions[0].detail
    logged = guard_tags(trainer, "block0/train_logit_max")
    assert sorted(logged) == [2, 3, 4, 5, 6, 7]
    for step, value in logged.items():
        assert value == pytest.approx(max(ref[step]), rel=1e-5)  # the training forward of that step
        assert max(ref[step]) == ref[step][0]
    eta = guard_tags(trainer, "block0/qk_clip")
    assert eta[1] == pytest.approx(guard.actions[0].value)  # the sampled clip that armed it
    for step in range(2, 8):  # from there: regrown by 1.69 from τ at every step, clipped back
        assert eta[step] == pytest.approx(TAU / logged[step], rel=1e-5)
        # (the first from the sampled clip, to τ on the monitor's BF16-pass value: within its rounding)
        assert logged[step] == pytest.approx(TAU * GROWTH**2, rel=1e-5 if step > 2 else 2.0**-7)
    assert guard.armed.steps_clipped == {"blocks.0": 6}
    assert guard.armed.max_seen["blocks.0"] == pytest.approx(TAU * GROWTH**2, rel=2.0**-7)
    # no sampled re-clip of the armed block: the every-step clip owns it
    assert len(guard.actions) == 1
    # the hooks are gone after fit; the record stays
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[0]._forward_hooks
    assert guard.state_dict()["qk_every_step"]["armed"] == ["blocks.0"]


@pytest.mark.parametrize("micro", [2, 4])
def test_accumulation_clips_once_per_optimizer_step_by_all_its_forwards(tmp_path: Any, micro: int) -> None:
    model = model_with_fragile_head()
    ref = training_logits(model)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    monitor = StabilityMonitor(every_n_steps=1, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=4, logger=MemoryLogger(), accumulate_grad_batches=micro),
        callbacks=[monitor, guard, Regrow()],
    )
    trainer.fit(model, make_loader(n=8 * micro, batch_size=8))  # `micro` micro-batches per optimizer step
    assert len(ref) == 4 * micro and [a.step for a in guard.actions] == [0]  # armed at the first step
    logged = guard_tags(trainer, "block0/train_logit_max")
    assert sorted(logged) == [1, 2, 3]
    for step, value in logged.items():  # the maximum over every forward of the step
        assert value == pytest.approx(max(max(r) for r in ref[micro * step : micro * (step + 1)]), rel=1e-5)
    assert guard.armed.steps_clipped == {"blocks.0": 3}


def test_sampled_only_lets_the_logits_regrow_between_checks(tmp_path: Any) -> None:
    model = model_with_fragile_head()
    ref = training_logits(model)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=False)
    trainer = fit(model, tmp_path, guard, steps=8)
    assert [a.step for a in guard.actions] == [1, 3, 5, 7]  # every check finds the logits past τ again
    assert guard_tags(trainer, "block0/train_logit_max") == {} and not guard.armed.clips
    # between two checks the head regrows for two steps: 1.69² τ at the second
    assert max(ref[3][0], ref[5][0]) == pytest.approx(TAU * GROWTH**4, rel=2.0**-7)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_resumed_run_is_armed_from_its_first_step(tmp_path: Any) -> None:
    model = model_with_fragile_head()
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer = fit(model, tmp_path, guard, steps=4)
    ckpt = str(tmp_path / "armed.ckpt")
    trainer.save_checkpoint(ckpt)

    resumed = model_with_fragile_head()
    ref = training_logits(resumed)
    guard2 = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer2 = fit(resumed, tmp_path, guard2, steps=6, ckpt_path=ckpt)
    logged = guard_tags(trainer2, "block0/train_logit_max")
    assert sorted(logged) == [4, 5]  # both resumed steps clipped, without waiting for a check
    assert logged[4] == pytest.approx(max(ref[0]), rel=1e-5)
    assert guard2.armed.steps_clipped == {"blocks.0": 2 + 2}
    assert [a.step for a in guard2.actions] == [1]  # kept, not repeated


class Crash(Callback):
    """Raises at global step 5 (after the block was armed): before the step, or inside block 0's attention."""

    def __init__(self, inside_forward: bool) -> None:
        self.inside_forward = inside_forward

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step != 5:
            return
        if not self.inside_forward:
            raise RuntimeError("crash in training")

        def crash(module: nn.Module, args: Any) -> None:
            raise RuntimeError("crash in training")

        pl_module.blocks[0].attn.proj.register_forward_pre_hook(crash)  # type: ignore[index]


@pytest.mark.parametrize("inside_forward", [False, True])
def test_an_exception_in_training_leaves_no_hook(tmp_path: Any, inside_forward: bool) -> None:
    model = model_with_fragile_head()
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=8), callbacks=[monitor, guard, Regrow(), Crash(inside_forward)]
    )
    with pytest.raises(RuntimeError, match="crash in training"):
        trainer.fit(model, make_loader(n=8, batch_size=8))
    assert guard.armed.steps_clipped == {"blocks.0": 3}  # armed at step 1, clipped at steps 2, 3, 4
    if inside_forward:  # the test's own crashing hook is the one left
        assert len(model.blocks[0].attn.proj._forward_pre_hooks) == 1
        model.blocks[0].attn.proj._forward_pre_hooks.clear()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not _STATE.captures and _STATE.machinery is None  # the attention capture's mode is gone too


def test_a_failing_watch_disarms_once_and_training_goes_on(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(call: Any) -> Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(logit_watch, "call_head_logit_max", broken)
    model = model_with_fragile_head()
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    with pytest.warns(UserWarning, match="QK-clip at every step stopped in block 'blocks.0'.*boom"):
        trainer = fit(model, tmp_path, guard, steps=8)
    assert trainer.global_step == 8
    assert guard.armed.failed == {"blocks.0"} and not guard.armed.clips
    assert [a.step for a in guard.actions] == [1, 3, 5, 7]  # back to the sampled clips
    assert not model.blocks[0]._forward_pre_hooks


def test_dry_run_and_controls_arm_nothing(tmp_path: Any) -> None:
    model = model_with_fragile_head()
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True, dry_run=True)
    fit(model, tmp_path, guard, steps=4)
    assert not guard.armed.clips and not model.blocks[0]._forward_pre_hooks
    torch.manual_seed(0)
    control = TinyTransformer(lr=0.0)
    guard_c = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[monitor, guard_c]).fit(
        control, make_loader(n=8, batch_size=8)
    )
    assert guard_c.actions == [] and not guard_c.armed.clips


# ------------------------------------------------------------------------------------ DDP
class RecordingGuard(StabilityGuard):
    """Writes each rank's every-step record and its block-0 query/key weights at fit end."""

    out_dir = ""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "armed": self.armed.state_dict(),
            "qkv": pl_module.blocks[0].attn.qkv.weight.detach().double().flatten().tolist(),  # type: ignore[index]
        }
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        super().on_fit_end(trainer, pl_module)


def ddp_ranks(tmp_path: Path, guard: RecordingGuard) -> list[dict[str, Any]]:
    """Fit the fragile model on two ``ddp_spawn`` ranks; each rank's record written at fit end."""
    model = model_with_fragile_head()
    model.lr = 0.05  # each rank's own examples: the gradients (averaged) and the logits differ per rank
    guard.out_dir = str(tmp_path)
    monitor = StabilityMonitor(every_n_steps=2, sample_size=4, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **{**trainer_kwargs(tmp_path, max_steps=6), "devices": 2, "strategy": "ddp_spawn"},
        callbacks=[monitor, guard, Regrow()],
    )
    trainer.fit(model, make_loader(n=32, batch_size=4))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(240)
def test_ddp_two_processes_clip_every_step_alike(tmp_path: Path) -> None:
    ranks = ddp_ranks(tmp_path, RecordingGuard(tau=TAU, qk_clip_every_step=True))
    assert ranks[0]["armed"]["armed"] == ["blocks.0"]
    assert ranks[0]["armed"]["steps_clipped"]["blocks.0"] >= 3
    # the maxima were reduced across ranks: the same heads rescaled by the same factors on both
    assert ranks[0] == ranks[1]


class FailingOnRankOne(RecordingGuard):
    """Breaks rank 1's watch of block 0 before the training step of global step 3."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        clip = self.armed.clips.get("blocks.0")
        if (
            trainer.global_rank == 1
            and trainer.global_step == 3
            and clip is not None
            and clip.watch is not None
        ):
            clip.watch.error = "broken on rank 1"


@pytest.mark.timeout(240)
def test_ddp_a_watch_failing_on_one_rank_stops_on_both_without_hanging(tmp_path: Path) -> None:
    ranks = ddp_ranks(tmp_path, FailingOnRankOne(tau=TAU, qk_clip_every_step=True))
    # armed by the first sampled clip, clipped at every step until rank 1's watch broke, then stopped on both
    assert ranks[0]["armed"]["armed"] == [] and ranks[0]["armed"]["failed"] == ["blocks.0"]
    assert ranks[0]["armed"]["steps_clipped"]["blocks.0"] == 1
    assert ranks[0] == ranks[1]  # same weights: back to sampled clips, the same on both ranks


# ------------------------------------------------------------------------------ compiled
def compiled_fit(
    tmp_path: Any, guard: StabilityGuard | None, steps: int, ckpt_path: str | None = None, how: str = "model"
) -> Any:
    """Fit the fragile model compiled whole (``how="model"``) or block by block; the compile counter, the
    trainer and the model."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = model_with_fragile_head()
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    callbacks = [monitor, guard, Regrow()] if guard is not None else [monitor, Regrow()]
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=steps, logger=MemoryLogger()), callbacks=callbacks)
    if how == "blocks":
        for block in model.blocks:
            block.compile(backend=counter)
    fitted = torch.compile(model, backend=counter) if how == "model" else model
    trainer.fit(fitted, make_loader(n=8, batch_size=8), ckpt_path=ckpt_path)
    torch._dynamo.reset()
    return counter, trainer, model


@pytest.mark.parametrize("how", ["model", "blocks"])
def test_a_compiled_model_is_not_armed_and_stays_clipped_at_sampled_steps(tmp_path: Any, how: str) -> None:
    alone, _, _ = compiled_fit(tmp_path, None, steps=8, how=how)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    with pytest.warns(UserWarning, match="not armed for every step: the block runs compiled") as record:
        counter, trainer, model = compiled_fit(tmp_path, guard, steps=8, how=how)
    assert sum("runs compiled" in str(w.message) for w in record) == 1  # said once
    assert not guard.armed.clips and guard.armed.failed == {"blocks.0"}
    # the compiled forward never ran the watch's hooks: an armed block would never have been clipped again
    assert [a.step for a in guard.actions] == [1, 3, 5, 7] and all(a.applied for a in guard.actions)
    assert guard_tags(trainer, "block0/train_logit_max") == {}
    assert counter.frame_count == alone.frame_count == 1  # no recompilation
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_compiled_run_resumed_armed_trains_on_and_says_so_once(tmp_path: Any) -> None:
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer = fit(model_with_fragile_head(), tmp_path, guard, steps=4)
    ckpt = str(tmp_path / "armed.ckpt")
    trainer.save_checkpoint(ckpt)
    guard2 = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    with pytest.warns(UserWarning, match="every step stopped in block 'blocks.0' \\(the block runs compiled"):
        counter, trainer2, model = compiled_fit(tmp_path, guard2, steps=8, ckpt_path=ckpt)
    assert trainer2.global_step == 8 and counter.frame_count == 1
    assert not guard2.armed.clips and guard2.armed.failed == {"blocks.0"}
    assert [a.step for a in guard2.actions] == [1, 5, 7]  # back to the sampled clips after the resume
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class SkipsBlockZero(TinyTransformer):
    """From global step 4 on, block 0 no longer runs (a layer dropped from the training forward)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for i, block in enumerate(self.blocks):
            if i > 0 or self.trainer.global_step < 4:
                x = block(x)
        return self.head(self.norm(x).mean(1))


def test_an_armed_block_whose_forward_is_never_seen_stops_and_says_so(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = SkipsBlockZero(lr=0.0)
    model.load_state_dict(model_with_fragile_head().state_dict())
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    with pytest.warns(
        UserWarning, match="stopped in block 'blocks.0' \\(no training forward of the block was seen"
    ):
        trainer = fit(model, tmp_path, guard, steps=8)
    assert guard.armed.failed == {"blocks.0"} and not guard.armed.clips
    assert sorted(guard_tags(trainer, "block0/train_logit_max")) == [2, 3]  # steps 4 and 5 saw nothing
    assert trainer.global_step == 8


# ------------------------------------------------------------------------------ qk-norm
class QKNormAttention(nn.Module):
    """The suite's attention with a per-head LayerNorm of the queries and keys (qk-norm), gains of 9:
    logits up to 81·√d_h whatever W_Q and W_K are."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.q_norm, self.k_norm = nn.LayerNorm(DH), nn.LayerNorm(DH)
        with torch.no_grad():
            self.q_norm.weight.fill_(9.0)
            self.k_norm.weight.fill_(9.0)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, DH).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, D))


@pytest.mark.parametrize("every_step", [False, True])
def test_a_qk_normed_block_is_not_clipped_and_says_so_once(tmp_path: Any, every_step: bool) -> None:
    torch.manual_seed(0)
    model = TinyTransformer(lr=0.0)
    model.blocks[0].attn = QKNormAttention()
    qkv = model.blocks[0].attn.qkv.weight.detach().clone()
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=every_step)
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=8), callbacks=[monitor, guard])
    with pytest.warns(UserWarning, match="blocks.0.attn.q_norm.*qk-norm.*cannot lower the logits") as record:
        trainer.fit(model, make_loader(n=8, batch_size=8))
    assert sum("qk-norm" in str(w.message) for w in record) == 1  # said once, not at every sampled step
    assert monitor.last_report is not None and (monitor.last_report.blocks[0].attn_logit_max or 0.0) > TAU
    assert [(a.step, a.action, a.applied) for a in guard.actions] == [(1, "qk_clip", False)]
    assert torch.equal(model.blocks[0].attn.qkv.weight, qkv)  # W_Q/W_K never shrunk for nothing
    assert not guard.armed.clips and not model.blocks[0]._forward_pre_hooks


def test_a_guard_fitting_another_model_clips_that_model(tmp_path: Any) -> None:
    """The record carries over to the next fit (armed from its first step); the clips are the new model's."""
    first = model_with_fragile_head()
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    fit(first, tmp_path, guard, steps=4)
    kept = first.blocks[0].attn.qkv.weight.detach().clone()
    second = model_with_fragile_head()
    ref = training_logits(second)
    trainer = fit(second, tmp_path, guard, steps=4)
    logged = guard_tags(trainer, "block0/train_logit_max")
    assert sorted(logged) == [0, 1, 2, 3]  # the second model's own training forwards, clipped at every step
    for step, value in logged.items():
        assert value == pytest.approx(max(ref[step]), rel=1e-5)
    assert max(ref[3]) == pytest.approx(TAU * GROWTH**2, rel=1e-5)  # regrown from τ once, not 1.69⁴ × 141
    assert torch.equal(first.blocks[0].attn.qkv.weight, kept)  # the first model is left alone
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in first.modules())


# ------------------------------------------------------------------------- optimization loops
def fragile(cls: type[TinyTransformer]) -> TinyTransformer:
    torch.manual_seed(0)
    model = cls(lr=0.0)
    model.load_state_dict(model_with_fragile_head().state_dict())
    return model


class ManualOptimization(TinyTransformer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]


def test_manual_optimization_is_clipped_after_every_optimizer_step(tmp_path: Any) -> None:
    model = fragile(ManualOptimization)
    ref = training_logits(model)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer = fit(model, tmp_path, guard, steps=8)
    logged = guard_tags(trainer, "block0/train_logit_max")
    assert sorted(logged) == [2, 3, 4, 5, 6, 7]
    for step, value in logged.items():
        assert value == pytest.approx(max(ref[step]), rel=1e-5)
        assert value == pytest.approx(TAU * GROWTH**2, rel=1e-5 if step > 2 else 2.0**-7)
    assert guard.armed.steps_clipped == {"blocks.0": 6}


class SkipsOddSteps(TinyTransformer):
    """``optimizer_step`` overridden: at odd batches the gradients are computed, no step is taken."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, closure: Any = None) -> None:
        if batch_idx % 2:
            closure()
        else:
            optimizer.step(closure=closure)


def test_a_skipped_optimizer_step_is_not_clipped_its_forward_counts_at_the_next(tmp_path: Any) -> None:
    """No step, no clip (the weights did not move); the skipped batch's forward ran on the weights the next
    step updates, so its logits count there, as a micro-batch's under gradient accumulation."""
    model = fragile(SkipsOddSteps)
    ref = training_logits(model)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=6, logger=MemoryLogger()), callbacks=[monitor, guard, Regrow()]
    )
    trainer.fit(model, make_loader(n=48, batch_size=8))  # batches 0..5, one per global step
    assert len(ref) == 6
    logged = guard_tags(trainer, "block0/train_logit_max")
    assert sorted(logged) == [2, 4]  # armed at 1 (a skipped step's sampled clip): the even batches step
    assert logged[2] == pytest.approx(max(ref[2]), rel=1e-5)
    assert logged[4] == pytest.approx(max(ref[3] + ref[4]), rel=1e-5)


def test_a_model_compiled_elsewhere_than_the_block_is_armed(tmp_path: Any) -> None:
    """Only the classifier head compiled: the block runs eagerly, its hooks run, it is clipped every step."""
    model = model_with_fragile_head()
    model.head.compile(backend="eager")
    ref = training_logits(model)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer = fit(model, tmp_path, guard, steps=4)
    torch._dynamo.reset()
    logged = guard_tags(trainer, "block0/train_logit_max")
    assert sorted(logged) == [2, 3] and guard.armed.steps_clipped == {"blocks.0": 2}
    assert logged[3] == pytest.approx(max(ref[3]), rel=1e-5)


# ------------------------------------------------------------------------- fits in a row, resume
class WithEval(TinyTransformer):
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])


def test_fits_in_a_row_with_validate_and_predict_between_leave_no_hook(tmp_path: Any) -> None:
    model = fragile(WithEval)
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=4, logger=MemoryLogger(), limit_val_batches=0),
        callbacks=[monitor, guard, Regrow()],
    )
    loader = make_loader(n=8, batch_size=8)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    trainer.fit(model, loader)
    assert hooks() == 0 and guard.armed.steps_clipped == {"blocks.0": 2}
    trainer.validate(model, loader, verbose=False)
    trainer.predict(model, loader)
    assert hooks() == 0 and guard.armed.steps_clipped == {"blocks.0": 2}  # nothing watched, nothing clipped
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model, loader)  # the same fit goes on: armed again from its first step
    assert hooks() == 0 and guard.armed.steps_clipped == {"blocks.0": 6}
    assert sorted(guard_tags(trainer, "block0/train_logit_max")) == [2, 3, 4, 5, 6, 7]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_run_resumed_without_the_option_is_not_armed(tmp_path: Any) -> None:
    guard = StabilityGuard(tau=TAU, qk_clip_every_step=True)
    trainer = fit(model_with_fragile_head(), tmp_path, guard, steps=4)
    ckpt = str(tmp_path / "armed.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = model_with_fragile_head()
    guard2 = StabilityGuard(tau=TAU, qk_clip_every_step=False)
    trainer2 = fit(resumed, tmp_path, guard2, steps=8, ckpt_path=ckpt)
    assert not guard2.armed.clips and guard_tags(trainer2, "block0/train_logit_max") == {}
    assert [a.step for a in guard2.actions] == [1, 5, 7]  # the record, then the sampled clips
    assert guard2.armed.steps_clipped == {"blocks.0": 2}  # the record is kept
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in resumed.modules())


def test_the_step_clips_each_attention_of_a_decoder_block_by_its_own_logits() -> None:
    """ArmedClips.step on a transformers BART decoder block: the self-attention's large head is clipped, the
    cross-attention (its logits far below τ) keeps its weights bit for bit."""
    from types import SimpleNamespace

    from lightning_stability.callbacks._armed_clips import ArmedClips
    from lightning_stability.capture.structure import model_blocks
    from lightning_stability.mitigations import QKClip, qk_params

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        d_model=D, encoder_attention_heads=H, decoder_attention_heads=H, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=60, max_position_embeddings=32, dropout=0.0,
    )  # fmt: skip
    model = transformers.BartForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").double()
    model.train()
    ids = torch.randint(4, 60, (3, 10))
    block = next(b for b in model_blocks(model) if b.name == "model.decoder.layers.0")
    own, cross = (qk_params(block, p) for p in block.qk)
    with torch.no_grad():
        own.w_q.chunk(H, dim=0)[1].mul_(40.0)
    kept = [t.detach().clone() for t in (cross.w_q, cross.w_k)]
    q1 = own.w_q.chunk(H, dim=0)[1].detach().clone()
    armed = ArmedClips()
    armed.arm(block.name, QKClip(block, tau=1.0), model)
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        metrics = armed.step(SimpleNamespace(global_step=1, world_size=1), {block.name: 1})  # type: ignore[arg-type]
    finally:
        armed.disarm_all()
    assert metrics["block1/train_logit_max"] > 1.0 and armed.steps_clipped == {block.name: 1}
    eta = 1.0 / metrics["block1/train_logit_max"]  # head 1 of the self-attention, the largest
    assert torch.equal(own.w_q.chunk(H, dim=0)[1], q1 * eta**0.5)
    assert all(torch.equal(a, b) for a, b in zip(kept, (cross.w_q, cross.w_k), strict=True))

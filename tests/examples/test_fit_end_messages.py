"""What a run tells its user: steps that join Lightning's, an alarm that cannot arm, the ε bump's summary."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability import AlarmOptions, LNEpsilonBump, StabilityMonitor
from lightning_stability.analysis.logs import align, load_run
from tiny_vit import TinyViT, make_synthetic_cifar


def _trainer(tmp_path: Path, steps: int, callbacks: list, **kw) -> L.Trainer:  # type: ignore[type-arg]
    kw.setdefault("logger", False)
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **kw,
    )


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:  # type: ignore[type-arg]
    x, y = make_synthetic_cifar(n, seed=0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _model(**kw) -> TinyViT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return TinyViT(d_model=32, depth=2, n_heads=4, warmup_steps=1, **kw)


def test_monitor_rows_join_training_step_rows_on_step(tmp_path: Path) -> None:
    """CSV: stability/* and train/loss on the same steps; the report's reader joins them without a shift."""
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = StabilityMonitor(every_n_steps=2, sample_size=4, precision="bf16")
    trainer = _trainer(tmp_path, 6, [monitor], logger=[csv_logger, tb_logger], log_every_n_steps=2)
    trainer.fit(_model(), _loader())
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss_steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    stab_steps = {int(r["step"]) for r in rows if r.get("stability/r_block")}
    # Lightning logs the batches of optimizer steps 2, 4, 6 at steps 1, 3, 5; the monitor measures
    # those same batches (global_step 2, 4, 6 in on_train_batch_end) and now logs them there too
    assert loss_steps == {1, 3, 5}
    assert stab_steps == {1, 3, 5}
    joined = {
        s: (r1["train/loss"], r2["stability/r_block"])
        for r1 in rows
        for r2 in rows
        if r1.get("train/loss") and r2.get("stability/r_block") and (s := int(r1["step"])) == int(r2["step"])
    }
    assert sorted(joined) == [1, 3, 5]
    assert all(math.isfinite(float(a)) and float(b) > 0 for a, b in joined.values())
    run = load_run(Path(tb_logger.log_dir))
    loss, r_block = run.get("train/loss"), run.get("stability/r_block")
    assert loss is not None and r_block is not None
    steps, (lv, rv) = align(loss, r_block)
    assert steps.tolist() == [1, 3, 5] and np.isfinite(lv).all() and (rv > 0).all()


@pytest.mark.parametrize(("steps", "warned"), [(7, True), (8, False)])
def test_monitor_says_when_its_alarm_cannot_fire(tmp_path: Path, steps: int, warned: bool) -> None:
    # the paper rule, alarm.window=3 samples, one every 2 steps: the window is full after step 6, so the
    # first sample that can fire is the one at step (3 + 1) x 2 = 8
    monitor = StabilityMonitor(every_n_steps=2, sample_size=2, alarm=AlarmOptions(rule="paper", window=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, steps, [monitor]).fit(_model(), _loader(n=64))
    msgs = [str(w.message) for w in caught if "alarm cannot fire" in str(w.message)]
    if warned:
        assert len(msgs) == 1, msgs
        assert "alarm.window=3" in msgs[0] and "every_n_steps=2" in msgs[0]
        assert "first possible after training step 8, logged as step 7" in msgs[0]  # Lightning's step
        assert f"has {steps} training steps" in msgs[0]
    else:
        assert msgs == []
    assert monitor._judge.alarm.z_history("kappa_softmax_z") == (3, 3)  # full by step 6 either way


def _rho_ln_by_hand(model: TinyViT, x: torch.Tensor, eps_mach: float) -> dict[str, float]:
    """ρ_LN = median over tokens of σ²(input) · d · ε_mach / ε, with plain hooks, in float64."""
    out: dict[str, float] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):

            def hook(m, args, name=name):  # type: ignore[no-untyped-def]
                h = args[0].detach().double().reshape(-1, m.normalized_shape[-1])
                var = h.var(dim=-1, unbiased=False).median().item()
                out[name] = var * h.shape[-1] * eps_mach / m.eps

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def test_ln_eps_bump_says_why_it_changed_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # lr = 0 and one fixed batch: every sampled step sees the same inputs, so the smallest ρ_LN
    # the callback saw is the smallest one a plain recomputation finds
    model = _model(lr=0.0, lr_schedule="constant")
    loader = _loader(n=8, batch_size=8)
    bump = LNEpsilonBump(every_n_steps=1, sample_size=8, eps_mach=2.0**-7)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, 3, [bump]).fit(model, loader)
    x = next(iter(loader))[0]
    by_hand = _rho_ln_by_hand(model, x, 2.0**-7)
    name = min(by_hand, key=lambda k: by_hand[k])
    assert bump.min_rho is not None
    rho, seen_name, step = bump.min_rho
    assert seen_name == name and rho == pytest.approx(by_hand[name], rel=1e-6)
    assert rho > 1.0 and not bump.bumped  # default ε = 1e-5 is far from ε-dominated here
    assert bump.summary.startswith("LNEpsilonBump changed nothing: smallest ρ_LN seen")
    assert f"{rho:.3g} ({name}, step {step}; ε_mach = 2^-7) is ≥ 1" in bump.summary
    assert bump.summary in caplog.text  # said at fit end


@pytest.mark.parametrize("eps_max", [10.0, 1e-2])
def test_ln_eps_bump_says_what_it_changed(tmp_path: Path, eps_max: float) -> None:
    # make one layer ε-dominated by construction: raise its ε until its measured ρ_LN is 0.8
    model = _model(lr=0.0, lr_schedule="constant")
    loader = _loader(n=8, batch_size=8)
    x = next(iter(loader))[0]
    rho0 = _rho_ln_by_hand(model, x, 2.0**-7)
    target = "blocks.1.norm2"
    layer = model.get_submodule(target)
    assert isinstance(layer, torch.nn.LayerNorm)
    layer.eps = layer.eps * rho0[target] / 0.8  # now ρ_LN = 0.8 ∈ (ρ* = 0.6, 1): Algorithm 1 moves it
    eps_before = layer.eps
    bump = LNEpsilonBump(every_n_steps=1, sample_size=8, eps_mach=2.0**-7, target_rho=0.6, eps_max=eps_max)
    _trainer(tmp_path, 2, [bump]).fit(model, loader)
    assert bump.min_rho is not None and bump.min_rho[1] == target
    if eps_max > eps_before:
        assert bump.bumped == {target}
        new = bump.current_eps[target]
        assert new == pytest.approx(eps_before * 0.8 / 0.6, rel=1e-5)
        moved = f"{target} {eps_before:.2g}→{new:.2g}"
        assert bump.summary.startswith(f"LNEpsilonBump raised ε of 1 layer(s): {moved}")
        assert "Original ε restored at fit end." in bump.summary
    else:  # the proposal is clipped to eps_max, below the current ε: nothing moves, and it says why
        assert not bump.bumped
        assert bump.min_rho[0] == pytest.approx(0.8, rel=1e-5)
        assert "is in (target_rho=0.6, 1), but no clipped proposal exceeded the current ε" in bump.summary
    assert layer.eps == eps_before  # restored


def test_ln_eps_bump_that_never_measured_says_so(tmp_path: Path) -> None:
    bump = LNEpsilonBump(every_n_steps=50)
    _trainer(tmp_path, 2, [bump]).fit(_model(), _loader())
    assert bump.min_rho is None
    assert bump.summary.startswith("LNEpsilonBump changed nothing: it never measured (every_n_steps=50")

"""Overhead of ``StabilityGuard`` on the Tiny-ViT example, side by side with what it sits next to.

Every figure is the median of interleaved repetitions (each repetition runs every variant
once, so contention on a shared machine hits all variants alike). Printed (and written with
``--out``):

1. **deciding** — the guard's ``on_train_batch_end`` at a sampled step where nothing fires
   (it reads the monitor's report and matches every block), next to the monitor's own sampled
   step (``measure`` + logging) and a training step;
2. **acting, once** — the cost of each action at the step it fires: QK-clip of one block
   (per-head factors, in place), the ε rule on one block's norms (one forward of
   ``sample_size`` examples, Algorithm 1 of the ε-bump), applying an FP32 override;
3. **living with an action** — a training step (forward, backward, AdamW) under BF16
   autocast with no block, one block and every block in FP32 (the FP32 override's lasting
   cost; on CPU BF16 autocast can be *slower* than FP32, so this ratio may be below 1).

    python examples/benchmarks/bench_guard.py [--quick] [--reps N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ → ``import tiny_vit``
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timing helpers

import lightning.pytorch as pl
from bench_overhead import interleaved, machine_line

from lightning_stability import StabilityGuard, StabilityMonitor
from lightning_stability.callbacks.ln_eps import bump_norms
from lightning_stability.capture.batch import sample_inputs
from lightning_stability.capture.structure import model_blocks
from lightning_stability.mitigations import EpsilonBump, FP32Override, clip_block_qk, find_changeable_norms
from lightning_stability.rules.thresholds import EPS_MACH, QK_CLIP_TAU
from tiny_vit import TinyViT, make_synthetic_cifar

CPU = torch.device("cpu")


Setup = tuple[pl.Trainer, TinyViT, Any, StabilityMonitor, StabilityGuard]


def setup(cfg: argparse.Namespace, log_dir: str) -> Setup:
    """A one-step bf16-mixed fit with monitor + guard, leaving a live report and a set-up guard."""
    torch.manual_seed(0)
    model = TinyViT(d_model=cfg.d_model, depth=cfg.depth, n_heads=4, lr_schedule="constant")
    images, labels = make_synthetic_cifar(cfg.batch, seed=0)
    batch = (images, labels)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=cfg.batch)
    monitor = StabilityMonitor(every_n_steps=1, sample_size=cfg.sample_size)
    guard = StabilityGuard(restore_on_fit_end=False, sample_size=cfg.sample_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=1,
        callbacks=[monitor, guard],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, loader)
    assert monitor.last_report is not None and not guard.actions, "the benchmark model must be healthy"
    return trainer, model, batch, monitor, guard


def train_step(model: TinyViT, batch: Any, opt: torch.optim.Optimizer) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_deciding(
    cfg: argparse.Namespace, bench_setup: Setup, opt: torch.optim.Optimizer
) -> dict[str, float]:
    """A training step, the monitor's sampled step and the guard deciding (nothing fires), interleaved."""
    trainer, model, batch, monitor, guard = bench_setup
    args, kwargs = monitor.inputs_from_batch(batch)

    def monitor_step() -> None:
        report = monitor.measure(trainer, model, args, kwargs)
        monitor._log(trainer, model, report)

    def guard_step() -> None:
        guard._last_step = -1  # decide again on the same report
        guard.on_train_batch_end(trainer, model, None, batch, 0)

    def plain_step() -> None:
        train_step(model, batch, opt)

    decide = interleaved(
        {"train_step": plain_step, "monitor_sampled_step": monitor_step, "guard_decide": guard_step},
        CPU,
        cfg.reps,
    )
    assert not guard.actions, "nothing may fire on the healthy model"
    return decide


def time_acting(cfg: argparse.Namespace, bench_setup: Setup) -> dict[str, float]:
    """Each action once on the first block (QK-clip, the ε rule, an FP32 override), undone each time."""
    trainer, model, batch, monitor, _ = bench_setup
    args, kwargs = monitor.inputs_from_batch(batch)
    blocks = model_blocks(model)
    heads = [150.0, 20.0, 120.0, 3.0]
    bump = EpsilonBump(find_changeable_norms(model, include=[f"{blocks[0].name}.*"])[0])
    bump.record_originals()
    bump_args, bump_kwargs = sample_inputs(args, kwargs, cfg.sample_size, 0)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def qk_clip() -> None:
        clip_block_qk(blocks[0], heads, QK_CLIP_TAU)
        with torch.no_grad():  # undo, so every repetition clips the same weights
            for n, p in model.named_parameters():
                p.copy_(saved[n])

    def eps_rule() -> None:
        bump_norms(trainer, model, bump, bump_args, bump_kwargs, EPS_MACH["bf16"], "bench_guard")

    def fp32_apply() -> None:
        FP32Override(blocks[0].module).apply().restore()

    act = interleaved(
        {"qk_clip_block": qk_clip, "eps_rule_block": eps_rule, "fp32_apply": fp32_apply}, CPU, cfg.reps
    )
    bump.restore()
    return act


def time_living(
    cfg: argparse.Namespace, model: TinyViT, batch: Any, opt: torch.optim.Optimizer
) -> dict[str, float]:
    """A BF16 training step with no block, the middle block and every block in FP32, interleaved."""
    blocks = model_blocks(model)
    one = FP32Override(blocks[cfg.depth // 2].module)
    every = [FP32Override(b.module) for b in blocks]

    def plain_step() -> None:
        train_step(model, batch, opt)

    def with_one() -> None:
        with one:
            train_step(model, batch, opt)

    def with_every() -> None:
        for o in every:
            o.apply()
        try:
            train_step(model, batch, opt)
        finally:
            for o in every:
                o.restore()

    return interleaved(
        {"bf16_step": plain_step, "one_block_fp32": with_one, "all_blocks_fp32": with_every},
        CPU,
        cfg.reps,
    )


def bench(cfg: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as log_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench_setup = setup(cfg, log_dir)
        model, batch = bench_setup[1], bench_setup[2]
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: repetitions see the same model
        decide = time_deciding(cfg, bench_setup, opt)
        act = time_acting(cfg, bench_setup)
        live = time_living(cfg, model, batch, opt)
    base = decide["train_step"]
    return {
        "machine": machine_line(CPU),
        "config": vars(cfg),
        "deciding_s": decide,
        "acting_s": act,
        "living_s": live,
        "ratios": {
            "guard_decide_over_train_step": decide["guard_decide"] / base,
            "guard_decide_over_monitor_step": decide["guard_decide"] / decide["monitor_sampled_step"],
            "qk_clip_over_train_step": act["qk_clip_block"] / base,
            "eps_rule_over_train_step": act["eps_rule_block"] / base,
            "one_block_fp32_step_ratio": live["one_block_fp32"] / live["bf16_step"],
            "all_blocks_fp32_step_ratio": live["all_blocks_fp32"] / live["bf16_step"],
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repetitions (CI smoke run)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=str, default=None)
    ns = parser.parse_args(argv)
    cfg = argparse.Namespace(
        d_model=32 if ns.quick else 96,
        depth=2 if ns.quick else 6,
        batch=8 if ns.quick else 64,
        sample_size=4 if ns.quick else 16,
        reps=ns.reps or (3 if ns.quick else 15),
    )
    result = bench(cfg)
    print(result["machine"])
    print(f"Tiny-ViT d_model={cfg.d_model} depth={cfg.depth} batch={cfg.batch}, bf16-mixed, CPU; "
          f"median of {cfg.reps} interleaved repetitions")
    for section in ("deciding_s", "acting_s", "living_s"):
        print(f"\n{section[:-2]}:")
        for key, value in result[section].items():
            print(f"  {key:<22} {value * 1e3:10.3f} ms")
    print("\nratios:")
    for key, value in result["ratios"].items():
        print(f"  {key:<34} {value:10.4f}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

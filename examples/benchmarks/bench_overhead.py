"""Overhead of ``StabilityMonitor`` (and ``LNEpsilonBump``) on the Tiny-ViT example, side by side.

Everything runs in one process; every figure is the median of interleaved repetitions (each
repetition runs every variant once, so machine contention hits all variants alike). Printed
(and written with ``--out``):

1. **not sampling** — a training step vs the monitor's ``on_train_batch_end`` path at a
   non-sampled step (target ≤ 1.01×), and the whole fit with ``every_n_steps > max_steps``;
2. **fit throughput** — steps/s with the monitor at ``every_n_steps`` ∈ {1, 10, default} and
   with ``LNEpsilonBump`` at its default interval, vs no callback (target ≤ 3 % at the default);
3. **one sampled step, decomposed** — the low-precision and the FP32 forward alone, the probe's
   ``measure``, the diagnostics (``attention_diagnostics`` + weight SVDs), logging, and the whole
   sampled step over (LP pass + FP32 pass) (target ≤ 1.5×);
4. **scaling** — sampled-step cost and peak extra memory vs tokens (patch 4/2/1 → 65/257/1025)
   and width (d_model 96/128/256), next to the size of one layer's score tensor ``B·H·n·n·4``
   (target: peak extra ≈ one layer's scores, not all layers').

    python examples/benchmarks/bench_overhead.py [--device cpu|cuda] [--precision bf16-mixed|16-mixed]
                                                 [--quick] [--out FILE.json]

On CPU, memory is tracked by a ``TorchDispatchMode`` that counts the bytes of every storage
allocated by a dispatched op while it is alive (kernel-internal scratch buffers are not seen);
on CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ → ``import tiny_vit``
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the dispatch counters beside this file

import lightning.pytorch as pl
from dispatch_counts import _SYNC_OPS as _SYNC_OPS  # re-exported: bench_compiled reads it here
from dispatch_counts import _AllocTracker as _AllocTracker  # re-exported: bench_scale imports it here
from dispatch_counts import host_syncs
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import LNEpsilonBump, ProbeOptions, StabilityMonitor
from lightning_stability.capture.attention import AttentionCall, AttentionCapture
from lightning_stability.capture.probe import RawMeasurement, StabilityProbe, compose_report
from lightning_stability.capture.probe.spectra import weight_statistics
from lightning_stability.capture.side_forward import eval_mode, exact_fp32, fastpath_disabled
from lightning_stability.diagnostics import attention_diagnostics
from tiny_vit import CIFAR10DataModule, TinyViT

RATIO_KEYS = (
    "nonsampling_hook_ratio",
    "nonsampling_fit_ratio",
    "fit_every_1_ratio",
    "fit_every_10_ratio",
    "fit_every_default_ratio",
    "fit_every_default_ratio_robust",
    "ln_eps_default_ratio",
    "sampled_step_over_passes",
    "sampled_step_no_local_over_passes",
)


# ------------------------------------------------------------------------------------ helpers
def default_every_n_steps(cls: type) -> int:
    return int(inspect.signature(cls.__init__).parameters["every_n_steps"].default)


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"machine: {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}{gpu}; "
        f"torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (``inner`` calls, synchronized)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, reps: int, warmup: int = 1, inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each function, repetitions interleaved across functions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(timed(fn, device, inner))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during ``fn`` above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    tracker = _AllocTracker()
    with tracker:
        fn()
    return tracker.peak


# ------------------------------------------------------------------------------------ fitting
class _StepClock(pl.Callback):
    """Timestamps of every ``on_train_batch_start`` and of ``on_train_end`` (step intervals)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def make_trainer(
    cfg: argparse.Namespace, callbacks: list[pl.Callback], max_steps: int, log_dir: str
) -> pl.Trainer:
    return pl.Trainer(
        accelerator=cfg.device,
        devices=1,
        precision=cfg.precision,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=TensorBoardLogger(log_dir, name="bench"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )


def make_model(cfg: argparse.Namespace, **overrides: Any) -> TinyViT:
    torch.manual_seed(0)
    kwargs = dict(cfg.model)
    kwargs.update(overrides)
    return TinyViT(**kwargs)


def fit_intervals(
    cfg: argparse.Namespace, dm: CIFAR10DataModule, callback: pl.Callback | None, log_dir: str
) -> list[float]:
    """Per-step wall times (interval k: batch k incl. its callbacks) of one short fit."""
    clock = _StepClock(torch.device(cfg.device))
    callbacks = [callback, clock] if callback is not None else [clock]
    trainer = make_trainer(cfg, callbacks, cfg.warm_steps + cfg.steps, log_dir)
    trainer.fit(make_model(cfg), datamodule=dm)
    return clock.intervals()


def bench_fit(cfg: argparse.Namespace, dm: CIFAR10DataModule, log_dir: str) -> dict[str, Any]:
    default_n = default_every_n_steps(StabilityMonitor)
    ln_n = default_every_n_steps(LNEpsilonBump)
    total = cfg.warm_steps + cfg.steps
    variants: dict[str, tuple[Callable[[], pl.Callback | None], int]] = {
        "none": (lambda: None, 0),
        "monitor_nonsampling": (lambda: StabilityMonitor(every_n_steps=10 * total + 1), 0),
        "monitor_every_1": (lambda: StabilityMonitor(every_n_steps=1), 1),
        "monitor_every_10": (lambda: StabilityMonitor(every_n_steps=10), 10),
        f"monitor_every_{default_n}": (lambda: StabilityMonitor(every_n_steps=default_n), default_n),
        f"ln_eps_every_{ln_n}": (lambda: LNEpsilonBump(every_n_steps=ln_n), ln_n),
    }
    per: dict[str, dict[str, list[float]]] = {k: {"sps": [], "plain": [], "sampled": []} for k in variants}
    fit_intervals(cfg, dm, None, log_dir)  # warm the process (allocator, kernels, imports)
    for rep in range(cfg.fit_reps):
        print(f"  [fit repetition {rep + 1}/{cfg.fit_reps}]", file=sys.stderr, flush=True)
        names = list(variants)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate: no order bias
            factory, n = variants[name]
            iv = fit_intervals(cfg, dm, factory(), log_dir)[cfg.warm_steps :]
            # interval j is the batch whose optimizer step makes global_step = warm_steps + j + 1
            steps = [cfg.warm_steps + j + 1 for j in range(len(iv))]
            sampled = [t for t, g in zip(iv, steps, strict=True) if n and g % n == 0 and g > 0]
            plain = [t for t, g in zip(iv, steps, strict=True) if not (n and g % n == 0 and g > 0)]
            per[name]["sps"].append(len(iv) / sum(iv))
            if plain:
                per[name]["plain"].append(statistics.median(plain))
            if sampled:
                per[name]["sampled"].append(statistics.median(sampled))
    out: dict[str, Any] = {"default_every_n_steps": default_n, "ln_eps_every_n_steps": ln_n}
    base_sps = statistics.median(per["none"]["sps"])
    base_step = statistics.median(per["none"]["plain"])
    out["step_s_none"] = base_step
    out["steps_per_s"] = {}
    out["ratio"] = {}
    out["robust_ratio"] = {}
    out["sampled_step_s"] = {}
    for name, (_, n) in variants.items():
        sps = statistics.median(per[name]["sps"])
        out["steps_per_s"][name] = sps
        out["ratio"][name] = base_sps / sps  # time per step relative to no callback
        if n and per[name]["sampled"]:
            if per[name]["plain"]:  # sampled minus plain interval of the same fit
                extra = statistics.median(
                    a - b for a, b in zip(per[name]["sampled"], per[name]["plain"], strict=True)
                )
            else:  # every step sampled: against the no-callback step
                extra = statistics.median(per[name]["sampled"]) - base_step
            out["sampled_step_s"][name] = statistics.median(per[name]["sampled"])
            out["robust_ratio"][name] = 1.0 + max(extra, 0.0) / n / base_step
    return out


# ----------------------------------------------------------------------- one sampled step
class SampledStep:
    """A monitor, a probe and a trainer (never fitted) around one model, for the sampled-step parts."""

    def __init__(self, cfg: argparse.Namespace, dm: CIFAR10DataModule, log_dir: str, **model_kw: Any):
        self.device = torch.device(cfg.device)
        self.model = make_model(cfg, **model_kw).to(self.device)
        self.monitor = StabilityMonitor(every_n_steps=1)
        self.no_local = StabilityMonitor(every_n_steps=1, probe=ProbeOptions(local_errors=False))
        self.idle = StabilityMonitor(every_n_steps=10**9)
        self.trainer = make_trainer(cfg, [self.monitor], 1, log_dir)
        images, labels = next(iter(dm.train_dataloader()))
        self.batch = (images.to(self.device), labels.to(self.device))
        self.x = self.batch[0][: self.monitor.sample_size]
        m = self.monitor
        self.probe = StabilityProbe(
            self.model,
            m.blocks,
            m.probe.head_reduction,
            m.probe.batch_reduction,
            m.probe.residual_gain_iters,
            m.log_per_head,
        )
        self.calls: list[AttentionCall] = []
        self.heads: dict[int, int] = {}
        with (
            torch.no_grad(),
            eval_mode(self.model),
            fastpath_disabled(),
            exact_fp32(self.model),
            AttentionCapture(self.model, self._keep_call),
        ):
            self.model(self.x)
        self.raw = self.measure()
        cfg_model = {**cfg.model, **model_kw}
        n_tokens = (32 // cfg_model["patch_size"]) ** 2 + 1
        self.layer_score_bytes = self.x.shape[0] * cfg_model["n_heads"] * n_tokens * n_tokens * 4
        self.n_tokens = n_tokens
        self.depth = cfg_model["depth"]

    def _keep_call(self, call: AttentionCall) -> None:
        self.calls.append(
            AttentionCall(call.name, call.q.clone(), call.k.clone(), call.v.clone(), call.keep, call.bias,
                          call.scale)
        )
        block = next((b.index for b in self.probe.blocks if b.contains(call.name)), None)
        if block is not None:
            self.heads.setdefault(block, call.q.shape[1])

    def low_precision(self) -> Any:
        return self.monitor._low_precision(self.trainer, self.model)()

    def lp_pass(self) -> None:
        with torch.no_grad(), eval_mode(self.model), self.low_precision():
            self.model(self.x)

    def fp32_pass(self) -> None:
        with torch.no_grad(), eval_mode(self.model), exact_fp32(self.model):
            self.model(self.x.float())

    def measure(self) -> RawMeasurement:
        return self.probe.measure((self.x,), {}, self.low_precision, seed=0)

    def diagnostics(self) -> None:
        for call in self.calls:
            attention_diagnostics(
                call.q.float(), call.k.float(), call.v.float(), mask=call.keep, scale=call.scale,
                bias=None if call.bias is None else call.bias.float(),
            )
        weight_statistics(self.probe.blocks, self.heads, self.probe.spectra, RawMeasurement())

    def logging(self) -> None:
        values = self.monitor.measurer(self.trainer, self.model)._reduce(self.raw)
        p = self.monitor.probe
        report = compose_report(self.probe, self.raw, values, 1, (p.ln_c1, p.ln_c2, p.ln_c3), p.bound_c)
        self.monitor._log(self.trainer, self.model, report)

    def whole(self) -> None:
        self.monitor._last_step = -1
        self.monitor.on_train_batch_end(self.trainer, self.model, None, self.batch, 0)

    def whole_no_local(self) -> None:
        self.no_local._last_step = -1
        self.no_local.on_train_batch_end(self.trainer, self.model, None, self.batch, 0)

    def idle_hook(self) -> None:
        self.idle.on_train_batch_end(self.trainer, self.model, None, self.batch, 0)

    def close(self) -> None:
        for logger in self.trainer.loggers:
            logger.finalize("success")


def bench_sampled(cfg: argparse.Namespace, dm: CIFAR10DataModule, log_dir: str) -> dict[str, Any]:
    s = SampledStep(cfg, dm, log_dir)
    parts = interleaved(
        {
            "lp_pass": s.lp_pass,
            "fp32_pass": s.fp32_pass,
            "probe_measure": s.measure,
            "diagnostics": s.diagnostics,
            "logging": s.logging,
            "sampled_step": s.whole,
            "sampled_step_no_local": s.whole_no_local,
        },
        s.device,
        cfg.reps,
    )
    hook = interleaved({"hook": s.idle_hook}, s.device, cfg.reps, inner=1000)["hook"]
    syncs = {"sampled_step": host_syncs(s.whole), "sampled_step_no_local": host_syncs(s.whole_no_local)}
    s.close()
    return {"parts_s": parts, "nonsampled_hook_s": hook, "host_syncs": syncs}


def kept_bytes(s: SampledStep) -> int:
    """Bytes the probe keeps after its exact pass: the FP32 block outputs (the references of the
    low-precision pass) and, for the local errors, each block's and sub-layer's input and output.
    Measured on the collector itself (storages counted once)."""
    from lightning_stability.capture.probe import passes as probe_module

    seen: dict[int, int] = {}
    original = probe_module._Collector.exact_pass

    def exact_pass(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        kept = [self.ref, [(c.args, c.kwargs, c.output) for calls in self.local.values() for c in calls]]
        for t in torch.utils._pytree.tree_leaves(kept):
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    probe_module._Collector.exact_pass = exact_pass  # type: ignore[method-assign]
    try:
        s.measure()
    finally:
        probe_module._Collector.exact_pass = original  # type: ignore[method-assign]
    return sum(seen.values())


def bench_scaling(cfg: argparse.Namespace, dm: CIFAR10DataModule, log_dir: str) -> list[dict[str, Any]]:
    rows = []
    for kw in cfg.scaling:
        print(f"  [scaling {kw}]", file=sys.stderr, flush=True)
        s = SampledStep(cfg, dm, log_dir, **kw)
        reps = cfg.reps if s.n_tokens <= 257 else max(2, cfg.reps // 3)
        t = interleaved({"passes": lambda s=s: (s.lp_pass(), s.fp32_pass()), "step": s.whole}, s.device,
                        reps)
        peak_step = peak_extra_bytes(s.whole, s.device)
        peak_passes = peak_extra_bytes(lambda s=s: (s.lp_pass(), s.fp32_pass()), s.device)
        rows.append(
            {
                "d_model": s.model.hparams.d_model,
                "patch_size": s.model.hparams.patch_size,
                "tokens": s.n_tokens,
                "passes_s": t["passes"],
                "sampled_step_s": t["step"],
                "ratio": t["step"] / t["passes"],
                "peak_extra_bytes": peak_step,
                "peak_passes_bytes": peak_passes,
                "kept_bytes": kept_bytes(s),
                "layer_score_bytes": s.layer_score_bytes,
                "all_layers_score_bytes": s.layer_score_bytes * s.depth,
            }
        )
        s.close()
        del s
    return rows


# ------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["bf16-mixed", "16-mixed"], default="bf16-mixed")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", type=str, default=None, help="also write the figures to this JSON file")
    p.add_argument("--reps", type=int, default=0, help="repetitions of the sampled-step parts (0: auto)")
    p.add_argument("--fit-reps", type=int, default=0, help="repetitions of each fit variant (0: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.model = dict(d_model=16, depth=2, n_heads=2, mlp_ratio=2, patch_size=8)
        cfg.batch_size, cfg.synthetic_size = 16, 256
        cfg.warm_steps, cfg.steps = 1, default_every_n_steps(StabilityMonitor)
        cfg.reps, cfg.fit_reps = cfg.reps or 1, cfg.fit_reps or 1
        cfg.scaling = [dict(patch_size=8)]
    else:
        cfg.model = dict(d_model=96, depth=6, n_heads=4, mlp_ratio=2, patch_size=4)
        cfg.batch_size, cfg.synthetic_size = 64, 2048
        default_n = default_every_n_steps(StabilityMonitor)
        cfg.warm_steps, cfg.steps = 10, max(100, 2 * default_n)
        cfg.reps, cfg.fit_reps = cfg.reps or 9, cfg.fit_reps or 3
        cfg.scaling = [
            dict(patch_size=4),
            dict(patch_size=2),
            dict(patch_size=1),
            dict(patch_size=4, d_model=128),
            dict(patch_size=4, d_model=256),
        ]
    return cfg


@contextmanager
def _quiet() -> Iterator[None]:
    import logging

    names = ["lightning.pytorch", "lightning.fabric", "lightning"]
    levels = [logging.getLogger(n).level for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, lv in zip(names, levels, strict=True):
                logging.getLogger(n).setLevel(lv)


def _mb(b: float) -> str:
    return f"{b / 2**20:9.2f}"


def overhead_ratios(fit: dict[str, Any], sampled: dict[str, Any]) -> dict[str, float]:
    """The ratios of ``RATIO_KEYS`` from the fit and sampled-step figures."""
    parts = sampled["parts_s"]
    passes = parts["lp_pass"] + parts["fp32_pass"]
    step = fit["step_s_none"]
    default_n = fit["default_every_n_steps"]
    ln_n = fit["ln_eps_every_n_steps"]
    return {
        "nonsampling_hook_ratio": (step + sampled["nonsampled_hook_s"]) / step,
        "nonsampling_fit_ratio": fit["ratio"]["monitor_nonsampling"],
        "fit_every_1_ratio": fit["ratio"]["monitor_every_1"],
        "fit_every_10_ratio": fit["ratio"]["monitor_every_10"],
        "fit_every_default_ratio": fit["ratio"][f"monitor_every_{default_n}"],
        "fit_every_default_ratio_robust": fit["robust_ratio"][f"monitor_every_{default_n}"],
        "ln_eps_default_ratio": fit["ratio"][f"ln_eps_every_{ln_n}"],
        "sampled_step_over_passes": parts["sampled_step"] / passes,
        "sampled_step_no_local_over_passes": parts["sampled_step_no_local"] / passes,
    }


def print_not_sampling(result: dict[str, Any]) -> None:
    """Section 1: the hook at a non-sampled step and the fit that never samples."""
    step, ratios = result["fit"]["step_s_none"], result["ratios"]
    hook = result["sampled"]["nonsampled_hook_s"]
    print("\n== not sampling (target <= 1.01x)")
    print(f"  training step (no callback, median)     {step * 1e3:10.3f} ms")
    print(f"  monitor hook at a non-sampled step      {hook * 1e6:10.3f} us")
    print(f"  step + hook / step                      {ratios['nonsampling_hook_ratio']:10.5f} x")
    print(f"  fit, every_n_steps > max_steps / none   {ratios['nonsampling_fit_ratio']:10.4f} x  (fit)")


def print_fit(result: dict[str, Any]) -> None:
    """Section 2: steps/s of each fit variant and the ratios predicted from the sampled step."""
    fit = result["fit"]
    print("\n== fit throughput (target <= 1.03x at the default every_n_steps)")
    print(f"  {'variant':<26}{'steps/s':>9}{'time ratio':>12}{'robust':>9}{'sampled step ms':>17}")
    for name, sps in fit["steps_per_s"].items():
        rob = fit["robust_ratio"].get(name)
        samp = fit["sampled_step_s"].get(name)
        print(f"  {name:<26}{sps:9.3f}{fit['ratio'][name]:12.4f}"
              f"{'' if rob is None else f'{rob:9.4f}':>9}{'' if samp is None else f'{samp * 1e3:17.2f}':>17}")
    print("  (time ratio = steps/s(none) / steps/s(variant); robust = 1 + (median sampled interval -"
          " median plain interval) / n / median step)")
    print("  predicted from the sampled-step cost: "
          + ", ".join(f"n={n}: {r:.4f}x" for n, r in result["predicted_ratio"].items()))


def print_sampled(result: dict[str, Any]) -> None:
    """Section 3: one sampled step's parts over the two passes, and its host syncs."""
    sampled, ratios = result["sampled"], result["ratios"]
    parts = sampled["parts_s"]
    passes = parts["lp_pass"] + parts["fp32_pass"]
    print("\n== one sampled step, decomposed (median, target whole/(LP+FP32) <= 1.5x)")
    keys = ("lp_pass", "fp32_pass", "probe_measure", "diagnostics", "logging", "sampled_step",
            "sampled_step_no_local")
    for key in keys:
        print(f"  {key:<26}{parts[key] * 1e3:10.3f} ms  {parts[key] / passes:7.3f} x passes")
    print(f"  LP + FP32 passes          {passes * 1e3:10.3f} ms")
    print(f"  sampled step / passes     {ratios['sampled_step_over_passes']:10.3f} x"
          f"   (local_errors=False: {parts['sampled_step_no_local'] / passes:.3f} x)")
    print(f"  floor with local errors: the passes + one more LP run of every block ~ "
          f"{(passes + parts['lp_pass']) / passes:.2f} x passes, before any diagnostic")
    print("\n== host syncs per sampled step (each would stall the host on CUDA; counted on CPU)")
    for variant, counts in sampled["host_syncs"].items():
        syncs = {kind: n for kind, n in counts.items() if kind != "ops"}
        print(f"  {variant}: {sum(syncs.values())} = " + ", ".join(f"{n} {kind}" for kind, n in syncs.items())
              + f"; {counts['ops']} ops dispatched in all (about one kernel launch each)")


def print_scaling(result: dict[str, Any]) -> None:
    """Section 4: sampled-step cost and peak extra memory per size."""
    print("\n== scaling (sampled step; memory: peak extra allocation during the step)")
    print(f"  {'d':>4}{'patch':>6}{'n':>6}{'passes ms':>11}{'step ms':>10}{'ratio':>7}"
          f"{'peak MiB':>10}{'passes MiB':>11}{'1 layer MiB':>12}{'all MiB':>9}{'kept MiB':>9}"
          f"{'peak/(layer+kept)':>18}")
    for r in result["scaling"]:
        print(f"  {r['d_model']:>4}{r['patch_size']:>6}{r['tokens']:>6}{r['passes_s'] * 1e3:11.2f}"
              f"{r['sampled_step_s'] * 1e3:10.2f}{r['ratio']:7.2f}{_mb(r['peak_extra_bytes']):>10}"
              f"{_mb(r['peak_passes_bytes']):>11}{_mb(r['layer_score_bytes']):>12}"
              f"{_mb(r['all_layers_score_bytes']):>9}{_mb(r['kept_bytes']):>9}"
              f"{r['peak_extra_bytes'] / (r['layer_score_bytes'] + r['kept_bytes']):18.2f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    result: dict[str, Any] = {"machine": machine_line(device), "config": {k: v for k, v in vars(cfg).items()}}
    print(result["machine"], flush=True)
    print(f"model: TinyViT {cfg.model}, batch {cfg.batch_size}, precision {cfg.precision}, "
          f"sample_size {StabilityMonitor().sample_size}; fit: {cfg.warm_steps} warm-up + {cfg.steps} timed "
          f"steps x {cfg.fit_reps} interleaved reps; parts: {cfg.reps} reps", flush=True)
    with tempfile.TemporaryDirectory() as log_dir, _quiet():
        dm = CIFAR10DataModule(batch_size=cfg.batch_size, synthetic_size=cfg.synthetic_size)
        dm.setup("fit")
        sampled = bench_sampled(cfg, dm, log_dir)
        fit = bench_fit(cfg, dm, log_dir)
        scaling = bench_scaling(cfg, dm, log_dir)
    ratios = overhead_ratios(fit, sampled)
    # amortized overhead predicted from the sampled-step cost, for candidate intervals
    extra, step = sampled["parts_s"]["sampled_step"], fit["step_s_none"]
    predicted = {n: 1.0 + extra / n / step for n in (1, 10, 20, 25, 50, 100)}
    result.update(fit=fit, sampled=sampled, scaling=scaling, ratios=ratios, predicted_ratio=predicted)
    print_not_sampling(result)
    print_fit(result)
    print_sampled(result)
    print_scaling(result)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    result["load_after"] = list(load)
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

"""The compiled diagnostics against the eager ones, side by side, on the dense-monitoring targets.

One process; every table's variants are interleaved repetition by repetition (a loaded machine
slows all alike) and reported as medians, with the machine and its load. Sections:

1. **compile time** — the first call of ``kappa_softmax`` and ``attention_diagnostics`` with the
   kernels on (tracing + inductor; a cold or warm on-disk cache shows here), then a call at new
   sizes (dynamic shapes: no new graph), and the graphs each kernel compiled;
2. **kernels** — ``kappa_softmax`` (eager / compiled) against ``torch.softmax`` into a buffer
   (targets ≤ 3× at n = 64, ≤ 1.2× at n ≥ 256), ``attention_diagnostics`` against the attention
   it diagnoses, on ``(16, 4, n, n)`` scores;
3. **sampled step** — the Tiny-ViT monitor's whole sampled step (``bench_overhead.SampledStep``)
   eager / compiled, with and without local errors, over its two passes (target ≤ 1.5×), and
   the host syncs and dispatched ops of each (≈ kernel launches on a GPU; a compiled kernel is
   one dispatched call here and one or a few launches there);
   The step's parts are timed alone in the same run: the probe's measurement, the attention
   diagnostics, κ(V), the weight spectra, reduction and logging (the profile of its floor);
4. **fits** — per-step medians of short fits with ``every_n_steps=1`` (eager / compiled,
   ``local_errors`` on / off) against a plain fit (target ≤ 1.25× with ``local_errors=False``;
   with local errors within 10 % of the floor: the plain step plus the probe's forward passes,
   i.e. the LP and FP32 passes and one more LP run of every block for the local errors).

    python examples/benchmarks/bench_compiled.py [--device cpu|cuda] [--quick] [--threads N]
                                                 [--sizes 64 256] [--out FILE.json]
    python examples/benchmarks/bench_compiled.py --render FILE.json   # its tables as Markdown

``--quick`` (CI) runs every section at toy sizes with one repetition and no timing claims.
On CUDA the same table is printed (times synchronized; the compiled kernels are Triton).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_overhead beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ → ``import tiny_vit``

import bench_overhead as bo

from lightning_stability import ProbeOptions, StabilityMonitor
from lightning_stability.capture.probe import RawMeasurement
from lightning_stability.capture.probe.spectra import weight_statistics
from lightning_stability.diagnostics import attention_diagnostics, kappa_softmax, kappa_v
from lightning_stability.diagnostics._compiled import compile_stats, forced_mode, unavailable
from tiny_vit import CIFAR10DataModule

MODES = ("off", "on")  # eager, compiled
PARTS = ("probe_measure", "attention_diagnostics", "kappa_v", "weight_spectra", "report_and_logging")


def medians(fns: dict[str, Callable[[], Any]], device: torch.device, reps: int) -> dict[str, float]:
    """Median wall seconds per call (and ``name/cpu``: this process's CPU seconds), interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for name in fns for k in (name, name + "/cpu")}
    for _ in range(reps):
        for name, fn in fns.items():
            bo.sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            bo.sync(device)
            times[name + "/cpu"].append(time.process_time() - c0)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def in_mode(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with forced_mode(mode):
            return fn()

    return run


def bench_compile(device: torch.device, n: int) -> dict[str, Any]:
    """Wall seconds of the first compiled call, and of a call at new sizes."""
    g = torch.Generator(device=device).manual_seed(1)
    s = torch.randn(16, 4, n, n, generator=g, device=device)
    qkv = [torch.randn(16, 4, n, 24, generator=g, device=device) for _ in range(3)]
    out: dict[str, Any] = {}
    with forced_mode("on"):
        for name, fn in (
            ("kappa_softmax first call", lambda: kappa_softmax(s)),
            ("attention_diagnostics first call", lambda: attention_diagnostics(*qkv)),
            ("kappa_softmax at new sizes", lambda: kappa_softmax(s[:7, :3, : n - 5, : n - 3].contiguous())),
        ):
            t0 = time.perf_counter()
            fn()
            bo.sync(device)
            out[name] = time.perf_counter() - t0
    out["kernels"] = compile_stats()
    return out


def bench_kernels(device: torch.device, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        s = torch.randn(16, 4, n, n, generator=g, device=device)
        buf = torch.empty_like(s)
        qkv = [torch.randn(16, 4, n, 24, generator=g, device=device) for _ in range(3)]
        fns: dict[str, Callable[[], Any]] = {"softmax": lambda s=s, b=buf: torch.softmax(s, -1, out=b)}
        fns["attention"] = lambda t=qkv: torch.softmax(t[0] @ t[1].transpose(-1, -2) / 24**0.5, -1) @ t[2]
        for mode in MODES:
            fns[f"kappa_softmax/{mode}"] = in_mode(mode, lambda s=s: kappa_softmax(s))
            fns[f"attention_diagnostics/{mode}"] = in_mode(mode, lambda t=qkv: attention_diagnostics(*t))
        med = medians(fns, device, reps if n <= 256 else max(1, reps // 4))
        key = "/cpu" if device.type == "cpu" else ""  # CPU: this process's CPU time (steadier)
        row: dict[str, Any] = {"n": n, "medians_s": med}
        for mode in MODES:
            row[f"kappa_over_softmax/{mode}"] = med[f"kappa_softmax/{mode}{key}"] / med["softmax" + key]
            row[f"diag_over_attention/{mode}"] = (
                med[f"attention_diagnostics/{mode}{key}"] / med["attention" + key]
            )
        rows.append(row)
    return rows


_SYNC_NAMES = {name.replace(".", "::") for name in bo._SYNC_OPS}


def launches(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """What one call of ``fn`` launches, from a profiler trace (compiled code runs as in use):
    ops dispatched from Python (each ≈ one kernel launch on a GPU), compiled-kernel calls (one
    or a few launches each on a GPU), host-syncing ops (as ``bench_overhead._SYNC_OPS``) and, on
    CUDA, the device kernels actually launched."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        bo.sync(device)
    events = prof.events()
    out = {
        "ops": sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::")),
        "compiled_calls": sum(1 for e in events if e.name.startswith("Torch-Compiled Region")),
        "host_syncs": sum(1 for e in events if e.name in _SYNC_NAMES),
    }
    if device.type == "cuda":
        out["cuda_kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def train_step(s: bo.SampledStep, precision: str) -> Callable[[], None]:
    """One plain training step of the batch (forward under the fit's autocast, backward, SGD)."""
    opt = torch.optim.SGD(s.model.parameters(), lr=1e-6)
    x, y = s.batch
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16

    def run() -> None:
        with torch.autocast(s.device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(s.model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def breakdown(s: bo.SampledStep) -> dict[str, Callable[[], Any]]:
    """The sampled step's parts, each timed on its own in the same interleaved run (the profile
    of its floor): the probe's measurement (passes, local errors, diagnostics), every captured
    attention call's diagnostics, their κ(V) alone (float64 LAPACK, never compiled), the weight
    spectra, and the reduction + logging of one report."""
    calls = s.calls

    def kappa_v_all() -> None:
        for call in calls:
            kappa_v(call.v.float())

    def diagnostics_all() -> None:
        for call in calls:
            attention_diagnostics(
                call.q.float(), call.k.float(), call.v.float(), mask=call.keep, scale=call.scale,
                bias=None if call.bias is None else call.bias.float(),
            )

    def spectra() -> None:
        weight_statistics(s.probe.blocks, s.heads, s.probe.spectra, RawMeasurement())

    fns: dict[str, Callable[[], Any]] = {}
    for mode in MODES:
        fns[f"part/probe_measure/{mode}"] = in_mode(mode, s.measure)
        fns[f"part/attention_diagnostics/{mode}"] = in_mode(mode, diagnostics_all)
    fns["part/kappa_v"] = kappa_v_all
    fns["part/weight_spectra"] = spectra
    fns["part/report_and_logging"] = s.logging
    return fns


def bench_sampled(cfg: argparse.Namespace, dm: CIFAR10DataModule, log_dir: str) -> dict[str, Any]:
    s = bo.SampledStep(cfg, dm, log_dir)
    fns: dict[str, Callable[[], Any]] = {"lp_pass": s.lp_pass, "fp32_pass": s.fp32_pass}
    fns["train_step"] = train_step(s, cfg.precision)
    for mode in MODES:
        fns[f"step/{mode}"] = in_mode(mode, s.whole)
        fns[f"step_no_local/{mode}"] = in_mode(mode, s.whole_no_local)
    fns.update(breakdown(s))
    med = medians(fns, s.device, cfg.reps)
    key = "/cpu" if s.device.type == "cpu" else ""  # CPU: this process's CPU time (1 thread: its work)
    passes = med["lp_pass" + key] + med["fp32_pass" + key]
    out: dict[str, Any] = {"parts_s": med, "clock": "process CPU" if key else "wall", "passes_s": passes}
    train = med["train_step" + key]
    # every_n_steps=1 in the same clock: (training step + sampled step) / training step
    out["floor_every_1"] = (train + passes + med["lp_pass" + key]) / train
    out["floor_every_1_no_local"] = (train + passes) / train
    for mode in MODES:
        out[f"step_over_passes/{mode}"] = med[f"step/{mode}{key}"] / passes
        out[f"step_no_local_over_passes/{mode}"] = med[f"step_no_local/{mode}{key}"] / passes
        out[f"every_1/{mode}"] = (train + med[f"step/{mode}{key}"]) / train
        out[f"every_1_no_local/{mode}"] = (train + med[f"step_no_local/{mode}{key}"]) / train
        with forced_mode(mode):
            out[f"launches/{mode}"] = launches(s.whole, s.device)
    out["key"] = key
    s.close()
    return out


def bench_fits(cfg: argparse.Namespace, dm: CIFAR10DataModule, log_dir: str) -> dict[str, Any]:
    """Per-step median of each variant's fit (every step sampled) and of a plain fit."""
    variants: dict[str, tuple[str, Callable[[], Any]]] = {"plain": ("off", lambda: None)}
    for mode in MODES:
        variants[f"every_1/{mode}"] = (mode, lambda: StabilityMonitor(every_n_steps=1))
        variants[f"every_1_no_local/{mode}"] = (
            mode,
            lambda: StabilityMonitor(every_n_steps=1, probe=ProbeOptions(local_errors=False)),
        )
    per: dict[str, list[float]] = {k: [] for k in variants}
    with forced_mode("on"):  # compile before timing (not part of a step's cost)
        bo.fit_intervals(cfg, dm, StabilityMonitor(every_n_steps=1), log_dir)
    for rep in range(cfg.fit_reps):
        print(f"  [fit repetition {rep + 1}/{cfg.fit_reps}]", file=sys.stderr, flush=True)
        names = list(variants)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            mode, factory = variants[name]
            with forced_mode(mode):
                iv = bo.fit_intervals(cfg, dm, factory(), log_dir)[cfg.warm_steps :]
            per[name].append(statistics.median(iv))
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"step_s": med, **{f"{k}/ratio": v / med["plain"] for k, v in med.items() if k != "plain"}}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes, one repetition (smoke test)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="score sizes n (default 64 256)")
    p.add_argument("--reps", type=int, default=0)
    p.add_argument("--fit-reps", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="timed steps per fit (default 40)")
    p.add_argument("--skip-fits", action="store_true")
    p.add_argument("--cold", action="store_true", help="compile into a fresh inductor cache")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    cfg = bo.parse(["--quick"] if args.quick else [])
    cfg.device, cfg.out, cfg.threads = args.device, args.out, args.threads
    cfg.sizes = args.sizes or ([16] if args.quick else [64, 256])
    cfg.reps = args.reps or (1 if args.quick else 15)
    cfg.fit_reps = args.fit_reps or (1 if args.quick else 3)
    cfg.warm_steps, cfg.steps = (1, 2) if args.quick else (5, args.steps or 40)
    cfg.skip_fits, cfg.quick, cfg.cold = args.skip_fits, args.quick, args.cold
    return cfg


def _print_parts(p: dict[str, float], k: str) -> None:
    print("\n== the sampled step's parts (median ms, same clock; each timed on its own)")
    for name in PARTS:
        names = [f"part/{name}/{m}" for m in MODES] if f"part/{name}/on" + k in p else [f"part/{name}"]
        cells = [f"{p[n + k] * 1e3:8.2f}" for n in names]
        print(f"  {name:<24}" + "  ".join(cells))


def _print(result: dict[str, Any]) -> None:
    print("\n== compile time (wall s; kernels on)")
    for name, sec in result["compile"].items():
        if name != "kernels":
            print(f"  {name:<36}{sec:9.2f}")
    for name, k in result["compile"]["kernels"].items():
        if not name.startswith("test_"):
            print(
                f"  kernel {name:<22} graphs {k['compiles']}, inductor {k['inductor_s']:.1f} s, "
                "compiling calls "
                + ", ".join(f"{x:.1f}" for x in k["compiling_calls_s"])
                + " s"
                + (f"; eager: {k['eager_because']}" if k["eager_because"] else "")
            )
    print("\n== kernels (ratios of medians; CPU: process CPU time)")
    print(
        f"  {'n':>6}{'kappa/softmax eager':>21}{'compiled':>10}{'diag/attention eager':>22}{'compiled':>10}"
    )
    for r in result["kernels"]:
        print(
            f"  {r['n']:>6}{r['kappa_over_softmax/off']:21.2f}{r['kappa_over_softmax/on']:10.2f}"
            f"{r['diag_over_attention/off']:22.2f}{r['diag_over_attention/on']:10.2f}"
        )
    s = result["sampled"]
    p, k = s["parts_s"], s["key"]
    print(f"\n== one sampled step (median ms, {s['clock']} time; target step/passes <= 1.5x)")
    print(
        f"  LP pass {p['lp_pass' + k] * 1e3:.2f}, FP32 pass {p['fp32_pass' + k] * 1e3:.2f}, "
        f"training step {p['train_step' + k] * 1e3:.2f}; every_n_steps=1 floor (training step + "
        f"passes + one more LP pass) {s['floor_every_1']:.3f}x, without local errors "
        f"{s['floor_every_1_no_local']:.3f}x"
    )
    for mode, label in (("off", "eager"), ("on", "compiled")):
        n = s[f"launches/{mode}"]
        print(
            f"  {label:<9} step {p[f'step/{mode}' + k] * 1e3:8.2f} ms = {s[f'step_over_passes/{mode}']:.2f}x"
            f"   no local errors {p[f'step_no_local/{mode}' + k] * 1e3:8.2f} ms = "
            f"{s[f'step_no_local_over_passes/{mode}']:.2f}x"
        )
        cuda = f", CUDA kernels {n['cuda_kernels']}" if "cuda_kernels" in n else ""
        every = f"training step + sampled step over the training step {s[f'every_1/{mode}']:.3f}x"
        print(f"            {every} (local_errors=False {s[f'every_1_no_local/{mode}']:.3f}x)")
        print(
            f"            ops from Python {n['ops']}, compiled-kernel calls {n['compiled_calls']}, "
            f"host syncs {n['host_syncs']}{cuda}"
        )
    _print_parts(p, k)
    if "fits" in result:
        f = result["fits"]
        print("\n== fits, every_n_steps=1 (per-step wall medians over a plain fit; noisy when shared)")
        for key in ("every_1_no_local", "every_1"):
            print(f"  {key:<18} eager {f[f'{key}/off/ratio']:.3f}x   compiled {f[f'{key}/on/ratio']:.3f}x")
        print(
            f"  floor with local errors {f['floor_ratio']:.3f}x; without {f['floor_no_local_ratio']:.3f}x "
            "(plain step + the probe's forward passes)"
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def render(result: dict[str, Any]) -> str:
    """The targets table and the sampled step's parts of a result, as Markdown (docs/PERFORMANCE.md)."""
    key = result["sampled"]["key"]
    s, p = result["sampled"], result["sampled"]["parts_s"]
    lines = [
        f"{result['machine']}; load average after {result['load_after'][0]:.1f}",
        "",
        "| target | eager | compiled | goal |",
        "|---|---|---|---|",
    ]
    for r in result["kernels"]:
        goal = "≤ 3×" if r["n"] <= 64 else "≤ 1.2×"
        met = "met" if r["kappa_over_softmax/on"] <= (3.0 if r["n"] <= 64 else 1.2) else "not met"
        soft = r["medians_s"]["softmax" + key]
        lines.append(
            f"| `kappa_softmax` / softmax, n = {r['n']} (softmax {_ms(soft)}) "
            f"| {r['kappa_over_softmax/off']:.2f}× | **{r['kappa_over_softmax/on']:.2f}×** | {goal}: {met} |"
        )
    for r in result["kernels"]:
        lines.append(
            f"| `attention_diagnostics` / attention, n = {r['n']} "
            f"| {r['diag_over_attention/off']:.2f}× | {r['diag_over_attention/on']:.2f}× | (none) |"
        )
    passes = s["passes_s"]
    for name, label in (("step", "sampled step"), ("step_no_local", "sampled step, `local_errors=False`")):
        met = "met" if s[f"{name}_over_passes/on"] <= 1.5 else "not met"
        lines.append(
            f"| {label} / its two passes ({_ms(passes)}) | {_ms(p[f'{name}/off' + key])} = "
            f"{s[f'{name}_over_passes/off']:.2f}× | {_ms(p[f'{name}/on' + key])} = "
            f"**{s[f'{name}_over_passes/on']:.2f}×** | ≤ 1.5×: {met} |"
        )
    train = _ms(p["train_step" + key])
    on, off = s["every_1_no_local/on"], s["every_1_no_local/off"]
    lines.append(
        f"| `every_n_steps=1`, `local_errors=False`: (training step {train} + sampled step) / training "
        f"step | {off:.3f}× | **{on:.3f}×** | ≤ 1.25×: {'met' if on <= 1.25 else 'not met'} |"
    )
    floor = s["floor_every_1"]
    on, off = s["every_1/on"], s["every_1/off"]
    lines.append(
        f"| `every_n_steps=1`, all signals, over its floor {floor:.3f}× (training step + both passes + "
        f"one more LP pass) | {off:.3f}× (+{(off / floor - 1) * 100:.0f} %) | **{on:.3f}×** "
        f"(+{(on / floor - 1) * 100:.0f} %) | within 10 %: {'met' if on <= 1.1 * floor else 'not met'} |"
    )
    n_off, n_on = s["launches/off"], s["launches/on"]
    lines.append(
        f"| ops dispatched from Python per sampled step (≈ GPU kernel launches) | {n_off['ops']} "
        f"| {n_on['ops']} + {n_on['compiled_calls']} compiled-kernel calls | |"
    )
    lines.append(f"| host syncs per sampled step | {n_off['host_syncs']} | {n_on['host_syncs']} | |")
    return "\n".join(lines + _render_parts(result))


def _render_parts(result: dict[str, Any]) -> list[str]:
    """The Markdown rows of the sampled step's parts and of the compile times."""
    key, p = result["sampled"]["key"], result["sampled"]["parts_s"]
    lines: list[str] = []
    lines += ["", "| part of the sampled step (timed alone) | eager | compiled |", "|---|---|---|"]
    two = f"{_ms(p['lp_pass' + key])} + {_ms(p['fp32_pass' + key])}"
    lines.append(f"| the two passes (LP, FP32) | {two} | same |")
    for name in PARTS:
        if f"part/{name}/on" + key in p:
            cells = f"{_ms(p[f'part/{name}/off' + key])} | {_ms(p[f'part/{name}/on' + key])}"
        else:
            cells = f"{_ms(p[f'part/{name}' + key])} | same (not compiled)"
        lines.append(f"| {name.replace('_', ' ')} | {cells} |")
    c = result["compile"]
    lines += ["", "| compile | wall s |", "|---|---|"]
    for name, sec in c.items():
        if name != "kernels":
            lines.append(f"| {name} | {sec:.2f} |")
    for name, k in c["kernels"].items():
        if not name.startswith("test_"):
            calls = ", ".join(f"{x:.1f}" for x in k["compiling_calls_s"])
            lines.append(f"| kernel `{name}`: {k['compiles']} graph(s), compiling calls (s) | {calls} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # Markdown of a committed result: --render FILE.json
        rendered = json.loads(Path(argv[1]).read_text())
        print(render(rendered))
        return rendered
    cfg = parse(argv)
    if cfg.cold:  # read by inductor at its first compile: nothing compiled before is found
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    result: dict[str, Any] = {"machine": bo.machine_line(device), "command": " ".join(sys.argv)}
    result["cold"] = cfg.cold
    reason = unavailable(device)
    result["compiled_available"] = reason or "yes"
    print(result["machine"], flush=True)
    print(f"compiled kernels: {result['compiled_available']}", flush=True)
    result["compile"] = bench_compile(device, cfg.sizes[0])
    result["kernels"] = bench_kernels(device, cfg.sizes, cfg.reps)
    with tempfile.TemporaryDirectory() as log_dir, bo._quiet():
        dm = CIFAR10DataModule(batch_size=cfg.batch_size, synthetic_size=cfg.synthetic_size)
        dm.setup("fit")
        result["sampled"] = bench_sampled(cfg, dm, log_dir)
        if not cfg.skip_fits:
            fits = bench_fits(cfg, dm, log_dir)
            step = fits["step_s"]["plain"]
            parts = result["sampled"]["parts_s"]  # wall: the fits are timed in wall clock
            fits["floor_no_local_ratio"] = (step + parts["lp_pass"] + parts["fp32_pass"]) / step
            fits["floor_ratio"] = (step + 2 * parts["lp_pass"] + parts["fp32_pass"]) / step
            result["fits"] = fits
    result["compile"]["kernels"] = compile_stats()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    result["load_after"] = list(load)
    _print(result)
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

"""A/B of two checkouts' ``StabilityProbe`` in one process, interleaved (machine load hits both alike).

    python examples/benchmarks/bench_probe_ab.py BEFORE_SRC AFTER_SRC [--reps 11]

e.g. ``/work/main/src`` (before) against ``src`` (after). Tiny-ViT at the paper's size (d=96,
6 blocks, 65 tokens), 16 examples, BF16 autocast, one thread. Times the probe's ``measure`` +
``compose_report`` (the extra work of a sampled step) and one BF16 training step, as medians,
and prints the sampled-step ratio (training step + measure) after/before; for the after side
also with ``local_errors=False`` (what ``r_local``/``r_*_local`` cost) and, where the after side
has it, with ``reuse_weight_spectra=True`` (the weights never move here: the frozen case). ``--cpu`` times CPU
seconds of the process (``time.process_time``) instead of wall time: with one thread that is
the work done, unaffected by other processes on a shared machine. ``--parts`` also prints the
median of each step of ``measure`` (the ``_Collector`` methods) and of ``compose_report``, and
one FP32 and one BF16 forward of the sample alone (the passes the probe cannot avoid).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ → ``import tiny_vit``


def load_probe(src: str) -> ModuleType:
    """``lightning_stability.capture.probe`` from ``src`` (earlier copies stay alive in their functions)."""
    for name in [n for n in sys.modules if n.startswith("lightning_stability")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        return importlib.import_module("lightning_stability.capture.probe")
    finally:
        sys.path.remove(src)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The two checkouts and the options of the module docstring."""
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument(
        "--quick", action="store_true", help="bench_overhead's --quick model (d=16, 2 blocks)"
    )
    parser.add_argument("--cpu", action="store_true", help="CPU time of the process, not wall time")
    parser.add_argument("--parts", action="store_true", help="also time each step of measure")
    return parser.parse_args(argv)


class PartTimes:
    """Seconds of each step of ``measure``, per side, recorded by wrapping the probe's functions."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.parts: dict[str, dict[str, list[float]]] = {}
        self.current = ""  # the variant running: its parts are recorded under this name

    def timed(self, fn: Callable[..., object], name: str) -> Callable[..., object]:
        """``fn``, recording its duration under the running side and ``name``."""

        def wrapper(*a: object, **kw: object) -> object:
            t0 = self.clock()
            try:
                return fn(*a, **kw)
            finally:
                if self.current:
                    self.parts.setdefault(self.current, {}).setdefault(name, []).append(self.clock() - t0)

        return wrapper

    def instrument(self, mod: ModuleType) -> None:
        """Wrap the ``_Collector`` steps and ``compose_report`` of one side's probe module."""
        collector = getattr(mod, "passes", mod)._Collector  # a package (its passes module) or one file
        for name in ("exact_pass", "low_precision_pass", "local_passes", "finish"):
            setattr(collector, name, self.timed(getattr(collector, name), name))
        mod.compose_report = self.timed(mod.compose_report, "compose_report")  # type: ignore[attr-defined]


def make_variants(
    cfg: argparse.Namespace,
    model: torch.nn.Module,
    x: torch.Tensor,
    sides: tuple[ModuleType, ModuleType],
    recorder: PartTimes,
) -> dict[str, Callable[[], None]]:
    """The functions timed: a BF16 training step, each side's sampled-step work, the bare passes."""
    before, after = sides
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.zero_grad(set_to_none=True)

    def measure(mod: ModuleType, side: str = "", **kw: bool) -> Callable[[], None]:
        probe = mod.StabilityProbe(model, **kw)

        def run() -> None:
            recorder.current = side
            raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            keys, vec = raw.flat()
            mod.compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), 0)
            recorder.current = ""

        return run

    def forward(dtype: torch.dtype | None) -> Callable[[], None]:
        def run() -> None:
            ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                model(x)

        return run

    variants = {
        "train_step": train_step,
        "before": measure(before, "before"),
        "after": measure(after, "after"),
        "after_no_local": measure(after, local_errors=False),
    }
    if "reuse_weight_spectra" in after.StabilityProbe.__init__.__code__.co_varnames:
        # the training step here never steps an optimizer: the weights stay bitwise equal (frozen)
        variants["after_reuse_frozen"] = measure(after, reuse_weight_spectra=True)
    if cfg.parts:
        variants["fp32_pass"] = forward(None)
        variants["bf16_pass"] = forward(torch.bfloat16)
    return variants


def median_ms(
    variants: dict[str, Callable[[], None]], reps: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median milliseconds of each variant over ``reps`` interleaved repetitions (after one warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def print_ratios(med: dict[str, float]) -> None:
    """Each variant's median, then the ratios after/before (of ``measure`` and of a sampled step)."""
    for name, ms in med.items():
        print(f"{name:16s} {ms:8.2f} ms")
    step = med["train_step"]
    print(f"measure after/before           {med['after'] / med['before']:.3f}x")
    print(f"sampled step after/before      {(step + med['after']) / (step + med['before']):.3f}x")
    print(f"  without local errors         {(step + med['after_no_local']) / (step + med['before']):.3f}x")
    if "after_reuse_frozen" in med:
        ratio = (step + med["after_reuse_frozen"]) / (step + med["before"])
        print(f"  frozen weights, reused       {ratio:.3f}x")


def print_parts(med: dict[str, float], parts: dict[str, dict[str, list[float]]]) -> None:
    """``measure`` over the two bare passes per side, then the median of each of its steps."""
    passes = med["fp32_pass"] + med["bf16_pass"]
    b, a = med["before"] / passes, med["after"] / passes
    print(f"measure / (FP32 + BF16 pass)   before {b:.2f}x  after {a:.2f}x")
    print(f"{'part':20s} {'before':>9s} {'after':>9s}")
    for name in parts.get("after", {}):
        b, a = (statistics.median(parts[s][name][1:]) * 1e3 for s in ("before", "after"))
        print(f"{name:20s} {b:8.2f}  {a:8.2f}  ms")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    clock = time.process_time if cfg.cpu else time.perf_counter
    torch.set_num_threads(1)
    before, after = load_probe(cfg.before), load_probe(cfg.after)
    from tiny_vit import TinyViT

    torch.manual_seed(0)
    model = TinyViT(d_model=16, depth=2, n_heads=2, patch_size=8) if cfg.quick else TinyViT()
    x = torch.randn(16, 3, 32, 32)
    recorder = PartTimes(clock)
    if cfg.parts:  # each side is its own module object: patching one leaves the other alone
        for mod in (before, after):
            recorder.instrument(mod)
    variants = make_variants(cfg, model, x, (before, after), recorder)
    med = median_ms(variants, cfg.reps, clock)
    print_ratios(med)
    if cfg.parts:
        print_parts(med, recorder.parts)


if __name__ == "__main__":
    main()

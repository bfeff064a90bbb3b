"""A/B of two checkouts' ``StabilityProbe`` in one process, interleaved (machine load hits both alike).

    python examples/benchmarks/bench_probe_ab.py BEFORE_SRC AFTER_SRC [--reps 11]

e.g. ``/work/main/src`` (before) against ``src`` (after). Tiny-ViT at the paper's size (d=96,
6 blocks, 65 tokens), 16 examples, BF16 autocast, one thread. Times the probe's ``measure`` +
``compose_report`` (the extra work of a sampled step) and one BF16 training step, as medians,
and prints the sampled-step ratio (training step + measure) after/before; for the after side
also with ``local_errors=False`` (what ``r_local``/``r_*_local`` cost).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument(
        "--quick", action="store_true", help="bench_overhead's --quick model (d=16, 2 blocks)"
    )
    cfg = parser.parse_args()
    torch.set_num_threads(1)
    before, after = load_probe(cfg.before), load_probe(cfg.after)
    from tiny_vit import TinyViT

    torch.manual_seed(0)
    model = TinyViT(d_model=16, depth=2, n_heads=2, patch_size=8) if cfg.quick else TinyViT()
    x = torch.randn(16, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.zero_grad(set_to_none=True)

    def measure(mod: ModuleType, **kw: bool) -> Callable[[], None]:
        probe = mod.StabilityProbe(model, **kw)

        def run() -> None:
            raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            keys, vec = raw.flat()
            mod.compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), 0)

        return run

    variants = {
        "train_step": train_step,
        "before": measure(before),
        "after": measure(after),
        "after_no_local": measure(after, local_errors=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(cfg.reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"{name:16s} {ms:8.2f} ms")
    step = med["train_step"]
    print(f"measure after/before           {med['after'] / med['before']:.3f}x")
    print(f"sampled step after/before      {(step + med['after']) / (step + med['before']):.3f}x")
    print(f"  without local errors         {(step + med['after_no_local']) / (step + med['before']):.3f}x")


if __name__ == "__main__":
    main()

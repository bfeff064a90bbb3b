"""Time ``kappa_softmax`` against ``torch.softmax`` on the same scores, side by side.

For ``(16, 4, n, n)`` float32 random-normal scores (and a peaked ×10 variant), n ∈ {64, 256,
1024}, prints the median time of each and their ratio (target: ≤ 10×).

    python examples/benchmarks/bench_kappa_softmax.py [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from lightning_stability.diagnostics import kappa_softmax


def _median_time(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (0: by size)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'scores':>22} {'kappa_softmax ms':>17} {'softmax ms':>11} {'ratio':>7}")
    for variant, scale in (("normal", 1.0), ("peaked x10", 10.0)):
        for n in args.sizes:
            s = torch.randn(16, 4, n, n, generator=gen, device=device) * scale
            reps = args.reps or (20 if n <= 256 else 7)
            t_k = _median_time(partial(kappa_softmax, s), device, reps)
            t_s = _median_time(partial(torch.softmax, s, -1), device, reps)
            label = f"{variant} n={n}"
            print(f"{label:>22} {t_k * 1e3:17.3f} {t_s * 1e3:11.3f} {t_k / t_s:7.2f}")


if __name__ == "__main__":
    main()

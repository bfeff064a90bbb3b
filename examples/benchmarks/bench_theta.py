"""Time ``theta_balanced_mass`` against ``torch.softmax`` on the same attention rows, side by side.

For float32 random-normal scores of shape ``(16, 4, 65, 65)`` (ViT-like) and ``(4, 8, 1024,
1024)`` (long context), near-uniform (×0.1, attention at initialisation), diffuse (×1) and
peaked (×4), prints the median time of
``theta_balanced_mass(softmax(S))`` and of ``torch.softmax(S)``, their ratio, and the share of
rows whose θ is exact (``upper − theta ≤ 1e-12``) and the largest ``upper − theta`` over all rows.

    python examples/benchmarks/bench_theta.py [--threads 1] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_stability.diagnostics import theta_balanced_mass


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 17, 17)] if args.quick else [(16, 4, 65, 65), (4, 8, 1024, 1024)]
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    head = ("rows", "theta ms", "softmax ms", "ratio", "exact", "max gap", "mean θ")
    print(" ".join(h.rjust(w) for h, w in zip(head, (24, 10, 11, 8, 8, 9, 8), strict=True)))
    out: list[dict[str, float | str]] = []
    for shape in shapes:
        for scale in (0.1, 1.0, 4.0):
            s = torch.randn(*shape, generator=gen) * scale
            p = torch.softmax(s, -1)
            t_theta = _median_time(lambda p=p: theta_balanced_mass(p), args.reps)
            t_soft = _median_time(lambda s=s: torch.softmax(s, -1), max(args.reps, 5))
            r = theta_balanced_mass(p)
            row = {
                "rows": f"{tuple(shape)} x{scale:g}",
                "theta_s": t_theta,
                "softmax_s": t_soft,
                "ratio": t_theta / t_soft,
                "exact": r.exact.double().mean().item(),
                "max_gap": (r.upper - r.theta).max().item(),
                "mean_theta": r.theta.mean().item(),
            }
            out.append(row)
            print(
                f"{row['rows']:>24} {t_theta * 1e3:10.1f} {t_soft * 1e3:11.3f} {row['ratio']:8.0f} "
                f"{row['exact']:8.4f} {row['max_gap']:9.1e} {row['mean_theta']:8.5f}"
            )
    return out


if __name__ == "__main__":
    main()

"""Time ``kappa_softmax`` against ``torch.softmax`` on the same scores, side by side.

For ``(16, 4, n, n)`` float32 random-normal scores (and a peaked ×10 variant), n ∈ {64, 256,
1024}, prints the median time of each and their ratio (issue 15 targets: ≤ 5× at n = 64,
≤ 1.5× at n ≥ 256). The two are interleaved rep by rep, so a loaded machine slows both alike;
the load average is printed with the figures. ``--diagnostics`` adds ``attention_diagnostics``
(q, k, v of head size 24 giving the same score shape) against ``q @ kᵀ`` + softmax + ``@ v``,
i.e. against the attention it diagnoses.

    python examples/benchmarks/bench_kappa_softmax.py [--device cuda] [--threads 1] [--diagnostics]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from lightning_stability.diagnostics import attention_diagnostics, kappa_softmax


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every repetition.

    Keys ``name`` hold wall-clock medians, ``name/cpu`` this process's CPU-time medians (on a
    machine shared with other jobs the CPU time is the steadier of the two).
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {key: [] for name in fns for key in (name, f"{name}/cpu")}
    for _ in range(reps):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[f"{name}/cpu"].append(time.process_time() - c0)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _row(label: str, med: dict[str, float], a: str, b: str) -> str:
    def cols(x: float, y: float) -> str:
        return f"{x * 1e3:12.3f} {y * 1e3:11.3f} {x / y:7.2f}"

    return f"{label:>18} | {cols(med[a], med[b])} | {cols(med[a + '/cpu'], med[b + '/cpu'])}"


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (0: by size)")
    parser.add_argument("--diagnostics", action="store_true", help="also time attention_diagnostics")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} load={load:.1f}")
    head = f"{'ms':>12} {'baseline ms':>11} {'ratio':>7}"
    print(f"{'wall clock':>44} | {'process CPU time':>32}")
    print(f"{'kappa_softmax':>18} | {head} | {head}   (baseline: torch.softmax)")
    for variant, scale in (("normal", 1.0), ("peaked x10", 10.0)):
        for n in args.sizes:
            s = torch.randn(16, 4, n, n, generator=gen, device=device) * scale
            reps = args.reps or (31 if n <= 256 else 9)
            med = _interleaved_medians(
                {"k": lambda s=s: kappa_softmax(s), "s": lambda s=s: torch.softmax(s, -1)}, device, reps
            )
            print(_row(f"{variant} n={n}", med, "k", "s"))
    if args.diagnostics:
        head = f"{'ms':>12} {'baseline ms':>11} {'ratio':>7}"
        print(f"{'attn_diagnostics':>18} | {head} | {head}   (baseline: the attention itself)")
        for n in args.sizes:
            qkv = tuple(torch.randn(16, 4, n, 24, generator=gen, device=device) for _ in range(3))
            reps = args.reps or (31 if n <= 256 else 9)
            med = _interleaved_medians(
                {"d": lambda t=qkv: attention_diagnostics(*t), "a": lambda t=qkv: _attention(*t)},
                device,
                reps,
            )
            print(_row(f"n={n}", med, "d", "a"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.1f}")


if __name__ == "__main__":
    main()

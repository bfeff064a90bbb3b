"""Cost of a sampled step of ``StabilityMonitor`` in one process, under DDP and under FSDP2, side by side.

The same tiny pre-LN Transformer trains in three set-ups on CPU: one process, DDP over 2
processes and FSDP2 (``ModelParallelStrategy(data_parallel_size=2)``, ``fully_shard`` on every
block and the root) over 2 processes (gloo), each rank with the same batch size and sample.
The monitor measures every second step, so sampled and plain training steps alternate within
each run (machine contention hits both alike); per set-up the median wall time of each kind of
step (rank 0, timed from ``on_train_batch_start`` to after the monitor's ``on_train_batch_end``)
and their ratio are printed, with the peak bytes of parameters the probe held in full at once
(FSDP2: one block's) and the machine line. Run it as

    python examples/benchmarks/bench_distributed.py [--steps 24] [--out FILE.json]

It launches the 2-process set-ups itself with ``torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
D, HEADS, DEPTH, TOKENS, D_IN, BATCH, SAMPLE = 64, 4, 4, 32, 16, 8, 4


def make_model(sharded: bool) -> Any:
    """The benchmark's model (a LightningModule); ``sharded``: FSDP2 in ``configure_model``."""
    from lightning.pytorch import LightningModule

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))
            return x + self.mlp(self.norm2(x))

    class Model(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(D_IN, D)
            self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
            self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x).mean(1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def configure_model(self) -> None:
            if sharded:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for block in self.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(self, mesh=mesh)

    return Model()


def run(setup: str, steps: int) -> dict[str, Any]:
    """Fit in this process (rank of a 2-process set-up, or the one process); rank 0's timings."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_stability import StabilityMonitor
    from lightning_stability.capture.sharding import GATHERED

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[tuple[int, float]] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.times.append((trainer.global_step, time.perf_counter() - self._t0))

    rank = int(os.environ.get("RANK", 0))
    gen = torch.Generator().manual_seed(rank)
    data = torch.utils.data.TensorDataset(
        torch.randn(steps * BATCH, TOKENS, D_IN, generator=gen),
        torch.randint(0, 10, (steps * BATCH,), generator=gen),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    strategy: Any = {
        "one": "auto",
        "ddp": "ddp",
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }[setup]
    timer = Timer()
    trainer = Trainer(
        accelerator="cpu",
        devices=1 if setup == "one" else 2,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[
            StabilityMonitor(every_n_steps=2, sample_size=SAMPLE),
            timer,
        ],  # timer last: after the monitor
    )
    GATHERED.reset()
    model = make_model(setup == "fsdp2")
    trainer.fit(model, loader)
    warm = timer.times[4:]  # compilation of kernels, first all-gathers
    sampled = [t for step, t in warm if step % 2 == 0]
    plain = [t for step, t in warm if step % 2]
    params = sum(p.numel() for p in make_model(False).parameters())
    return {
        "setup": setup,
        "train_step_s": statistics.median(plain),
        "sampled_step_s": statistics.median(sampled),
        "sampled_over_train": statistics.median(sampled) / statistics.median(plain),
        "monitor_s": statistics.median(sampled) - statistics.median(plain),
        "steps_timed": [len(sampled), len(plain)],
        "gathered_peak_bytes": GATHERED.peak,
        "model_fp32_bytes": 4 * params,
    }


def launch(setup: str, steps: int) -> dict[str, Any]:
    """Run ``setup`` in fresh processes (2 through ``torch.distributed.run``); rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", setup, "--steps", str(steps), "--result", str(out)]
        if setup != "one":
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        env.setdefault("OMP_NUM_THREADS", "1")  # as torch.distributed.run sets for each rank
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = os.getloadavg()
    return (
        f"machine: {cpu}, {os.cpu_count()} CPUs, 1 torch thread per process; torch {torch.__version__}, "
        f"python {platform.python_version()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


SETUPS = {"one": "one process", "ddp": "DDP, 2 processes", "fsdp2": "FSDP2, 2 processes"}


def render(result: dict[str, Any]) -> str:
    """Markdown: per set-up the median training and sampled step of rank 0, and the machine."""
    lines = [
        f"Tiny pre-LN Transformer d={D}, {HEADS} heads, {DEPTH} blocks, {TOKENS} tokens, batch {BATCH} "
        f"per rank, sample {SAMPLE}, bf16-mixed; wall medians of rank 0.",
        "",
        f"- before: {result['machine_before']}",
        f"- after: {result['machine_after']}",
        "",
        "| set-up | training step | sampled step | sampled / training | monitor's extra | "
        "parameters held in full |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {SETUPS.get(r['setup'], r['setup'])} | {1e3 * r['train_step_s']:.1f} ms | "
            f"{1e3 * r['sampled_step_s']:.1f} ms | {r['sampled_over_train']:.2f}× | "
            f"{1e3 * r['monitor_s']:.1f} ms | "
            f"{r['gathered_peak_bytes'] / 1024:.0f} of {r['model_fp32_bytes'] / 1024:.0f} KiB |"
        )
    first, *others = result["results"]
    relative = ", ".join(f"{r['setup'].upper()} {r['monitor_s'] / first['monitor_s']:.2f}×" for r in others)
    return "\n".join(
        [*lines, "", f"The monitor's extra time relative to {SETUPS[first['setup']]}: {relative}."]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run(args.worker, args.steps)
        if int(os.environ.get("RANK", 0)) == 0:
            args.result.write_text(json.dumps(result))
        if torch.distributed.is_initialized():  # an open gloo group can abort the interpreter's exit
            torch.distributed.destroy_process_group()
        return
    before = machine_line()
    results = [launch(setup, args.steps) for setup in ("one", "ddp", "fsdp2")]
    result = {"machine_before": before, "machine_after": machine_line(), "results": results}
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

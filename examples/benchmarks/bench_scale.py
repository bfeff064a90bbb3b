"""Cost and memory of the monitor's sampled step against width, depth and sequence length.

Transformers Llamas built from configs (random init, ``d_head = 64``, FFN ``8d/3`` rounded up to
256 as Llama's, vocabulary 1024), trained in ``bf16-mixed`` with AdamW, batch ``B``; the monitor
samples ``S`` examples. Each configuration runs in its own process (fresh allocator and peak
RSS). Per configuration, medians of interleaved repetitions (each repetition runs every variant
once, so contention on a shared machine hits all alike), wall seconds (``--clock cpu --threads 1``:
CPU seconds of the process, for a busy machine):

- ``train``: a training step (forward, backward, AdamW step; learning rate 0, so the weights
  stay bitwise the same and the ``frozen`` variant below can reuse their spectra);
- ``sampled``: the monitor's whole work at a sampled step (``on_train_batch_end``: both passes,
  local errors, diagnostics, weight terms, logging); a sampled step of training costs
  ``train + sampled``;
- ``exact``: the same with ``weight_spectra="exact"`` (the weight terms' float64 values instead
  of the certified ones: ``exact − frozen`` is what they cost that way);
- ``no_local``: the same with ``local_errors=False``;
- ``frozen``: the same with ``reuse_weight_spectra=True`` on unchanged weights (the weight terms
  read from the kept spectra: ``sampled − frozen`` is what the weight terms cost);
- ``fp32_pass``, ``lp_pass``: the exact FP32 and the low-precision forward of the sample alone
  (no hooks: what the probe's two passes cost before any capture).

The parts of a sampled step follow: weight terms ``sampled − frozen``, local errors
``sampled − no_local``, the rest (capture, attention diagnostics, statistics, logging)
``frozen − fp32_pass − lp_pass − local errors``.

Memory: ``peak_extra_bytes`` — the largest amount of tensor memory allocated during the step
above what was allocated before it (``bench_overhead``'s dispatch-mode tracker), for a training
step and a sampled step; ``rss_added_bytes`` — how much a sampled step raised the process's peak
RSS above the peak its training steps had reached.

Then the growth law: per axis, the least-squares slope of ``log(quantity)`` against
``log(axis value)``.

    python examples/benchmarks/bench_scale.py [--axes width depth seq] [--max-params 320e6]
                                              [--reps 3] [--out FILE.json]
    python examples/benchmarks/bench_scale.py --one '{"d": 768, "layers": 8, "seq": 256}'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timing helpers

import lightning.pytorch as pl
from bench_overhead import _AllocTracker, machine_line
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import ProbeOptions, StabilityMonitor
from lightning_stability.capture.side_forward import eval_mode, exact_fp32

#: Values of each axis; the other two stay at the base configuration (d=768, 8 layers, 256 tokens).
BASE = {"d": 768, "layers": 8, "seq": 256}
AXES = {
    "width": ("d", [256, 512, 768, 1024, 1536, 1792]),
    "depth": ("layers", [2, 4, 8, 16, 24]),
    "seq": ("seq", [64, 128, 256, 512, 1024]),
}
VOCAB = 1024


def ffn_width(d: int) -> int:
    return 256 * math.ceil(int(8 * d / 3) / 256)


def params(d: int, layers: int, vocab: int = VOCAB) -> int:
    """Parameters of the Llama built by :func:`build` (untied embeddings, RMSNorm weights)."""
    per_layer = 4 * d * d + 3 * d * ffn_width(d) + 2 * d
    return layers * per_layer + 2 * vocab * d + d


class LM(pl.LightningModule):
    def __init__(self, d: int, layers: int, seq: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=d,
            intermediate_size=ffn_width(d),
            num_hidden_layers=layers,
            num_attention_heads=d // 64,
            num_key_value_heads=d // 64,
            max_position_embeddings=seq,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.0, weight_decay=0.1)


class Setup:
    """One model, its optimizer, a trainer (never fitted) and one monitor per variant."""

    def __init__(self, d: int, layers: int, seq: int, batch: int, sample: int, log_dir: str) -> None:
        torch.manual_seed(0)
        self.lm = LM(d, layers, seq)
        self.opt = self.lm.configure_optimizers()
        self.batch = torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
        options = {
            "sampled": ProbeOptions(),
            "exact": ProbeOptions(weight_spectra="exact"),
            "no_local": ProbeOptions(local_errors=False),
            "frozen": ProbeOptions(reuse_weight_spectra=True),
        }
        self.monitors = {
            name: StabilityMonitor(every_n_steps=1, sample_size=sample, probe=probe)
            for name, probe in options.items()
        }
        self.trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=1,
            logger=TensorBoardLogger(log_dir),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        self.x = self.batch[:sample, :-1]

    def train(self) -> None:
        with self.trainer.precision_plugin.forward_context():
            loss = self.lm.training_step(self.batch, 0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def monitor(self, name: str) -> Callable[[], None]:
        mon = self.monitors[name]

        def run() -> None:
            mon._last_step = -1
            mon.on_train_batch_end(self.trainer, self.lm, None, self.batch[:, :-1], 0)

        return run

    def close(self) -> None:
        """Close the loggers' and dashboards' writers (before their directory goes)."""
        for mon in self.monitors.values():
            mon.teardown(self.trainer, self.lm, "fit")
        for logger in self.trainer.loggers:
            logger.finalize("success")

    def lp_pass(self) -> None:
        with (
            torch.no_grad(),
            eval_mode(self.lm),
            self.monitors["sampled"]._low_precision(self.trainer, self.lm)(),
        ):
            self.lm(self.x)

    def fp32_pass(self) -> None:
        with torch.no_grad(), eval_mode(self.lm), exact_fp32(self.lm):
            self.lm(self.x)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tracked_peak(fn: Callable[[], None]) -> int:
    tracker = _AllocTracker()
    with tracker:
        fn()
    return tracker.peak


def measure_one(cfg: dict[str, Any], reps: int, batch: int, sample: int) -> dict[str, Any]:
    """Everything about one configuration (run in a fresh process by :func:`run_one`)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    clock = time.process_time if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as log_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Setup(cfg["d"], cfg["layers"], cfg["seq"], batch, sample, log_dir)
        fns: dict[str, Callable[[], None]] = {
            "train": s.train,
            "fp32_pass": s.fp32_pass,
            "lp_pass": s.lp_pass,
        }
        fns.update({name: s.monitor(name) for name in s.monitors})
        for fn in fns.values():  # warm up (allocator, optimizer state, kept spectra)
            fn()
        s.train()
        before = peak_rss()
        s.monitor("sampled")()
        rss_added = peak_rss() - before
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        out = {k: statistics.median(v) for k, v in times.items()}
        memory = {"train": tracked_peak(s.train), "sampled": tracked_peak(s.monitor("sampled"))}
        s.close()
    return {
        **cfg,
        "params": params(cfg["d"], cfg["layers"]),
        "batch": batch,
        "sample": sample,
        "seconds": out,
        "seconds_all": times,
        "peak_extra_bytes": memory,
        "rss_added_bytes": rss_added,
        "machine": machine_line(torch.device("cpu")),
    }


def run_one(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        json.dumps(cfg),
        "--reps",
        str(args.reps),
        "--batch",
        str(args.batch),
        "--sample",
        str(args.sample),
    ]
    env = {**os.environ, "BENCH_THREADS": str(args.threads), "BENCH_CLOCK": args.clock}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cfg}: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def derived(row: dict[str, Any]) -> dict[str, float]:
    """The parts of a sampled step, from the variants (seconds)."""
    t = row["seconds"]
    return {
        "train": t["train"],
        "monitor": t["sampled"],
        "sampled_over_train": (t["train"] + t["sampled"]) / t["train"],
        "weights": max(t["sampled"] - t["frozen"], 0.0),
        **({"weights_exact": max(t["exact"] - t["frozen"], 0.0)} if "exact" in t else {}),
        **({"exact_over_train": (t["train"] + t["exact"]) / t["train"]} if "exact" in t else {}),
        "local_errors": max(t["sampled"] - t["no_local"], 0.0),
        "fp32_pass": t["fp32_pass"],
        "lp_pass": t["lp_pass"],
        "rest": max(
            t["frozen"] - t["fp32_pass"] - t["lp_pass"] - max(t["sampled"] - t["no_local"], 0.0), 0.0
        ),
        "peak_extra_sampled": float(row["peak_extra_bytes"]["sampled"]),
        "peak_extra_train": float(row["peak_extra_bytes"]["train"]),
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (positive values only)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var > 0 else math.nan


def fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for axis, (key, _) in AXES.items():
        pts = [r for r in rows if r["axis"] == axis]
        if len(pts) < 2:
            continue
        parts = [derived(r) for r in pts]
        out[axis] = {q: slope([float(r[key]) for r in pts], [p[q] for p in parts]) for q in parts[0]}
    return out


def previous_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """With ``--resume``: the rows of ``--out`` measured with the same clock, threads, batch and sample."""
    if not (args.resume and args.out and args.out.exists()):
        return []
    old = json.loads(args.out.read_text())
    same = old.get("clock") == args.clock and old.get("threads") == args.threads
    wanted = configs(args)
    rows = [r for r in old.get("rows", []) if any(all(r[k] == v for k, v in c.items()) for c in wanted)]
    return rows if same and all(r.get("batch", args.batch) == args.batch for r in rows) else []


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for axis in args.axes:
        key, values = AXES[axis]
        for v in values:
            cfg = {**BASE, key: v}
            if params(cfg["d"], cfg["layers"]) <= args.max_params:
                out.append({**cfg, "axis": axis})
    return out


def table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'axis':6s} {'d':>5s} {'L':>3s} {'n':>5s} {'params':>7s} {'train':>7s} {'monitor':>8s} "
        f"{'ratio':>6s} {'weights':>8s} {'local':>6s} {'fp32':>7s} {'lp':>6s} {'rest':>6s} {'peak MiB':>9s}"
    )
    for r in rows:
        p = derived(r)
        print(
            f"{r['axis']:6s} {r['d']:5d} {r['layers']:3d} {r['seq']:5d} {r['params'] / 1e6:6.0f}M "
            f"{p['train']:7.2f} {p['monitor']:8.2f} {p['sampled_over_train']:6.2f} {p['weights']:8.2f} "
            f"{p['local_errors']:6.2f} {p['fp32_pass']:7.2f} {p['lp_pass']:6.2f} {p['rest']:6.2f} "
            f"{p['peak_extra_sampled'] / 2**20:9.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    ap.add_argument("--max-params", type=float, default=320e6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall seconds, or CPU seconds of the process (with --threads 1: robust to a busy machine)",
    )
    ap.add_argument("--one", help="measure one configuration (JSON) in this process and print it")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the configurations --out already holds (same clock and threads)",
    )
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), args.reps, args.batch, args.sample)))
        return
    rows = previous_rows(args)
    for cfg in configs(args):
        if any(all(r[k] == v for k, v in cfg.items()) for r in rows):
            continue  # measured by an earlier run into the same --out (--resume)
        print(f"  [{cfg}]", file=sys.stderr, flush=True)
        rows.append({**run_one({k: v for k, v in cfg.items() if k != "axis"}, args), "axis": cfg["axis"]})
        if args.out:  # keep what is done so far
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    table(rows)
    result = {
        "command": "python examples/benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "clock": args.clock,
        "threads": args.threads,
        "rows": rows,
        "fits": fits(rows),
    }
    print(json.dumps(result["fits"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

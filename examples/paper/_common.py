"""Shared machinery of the paper's three experiments (``examples/paper/exp{1,2,3}_*.py``).

One function, :func:`run_fit`, trains the pre-LN Tiny-ViT of ``examples/tiny_vit.py``
for a fixed number of steps with :class:`~lightning_stability.StabilityMonitor`
(one monitor per measured precision) and optionally
:class:`~lightning_stability.LNEpsilonBump`, and returns what was measured as plain
Python data: per measured precision, ``{step: {tag: value}}`` with the tags the
monitor logs (``stability/r_block``, ``stability/block{i}/...``; a tag the monitor
gains later, such as ``stability/block{i}/r_local``, is recorded automatically),
the training loss of every step, and every ε the bump callback changed.
Nothing is written to TensorBoard. Each experiment script saves every run's measurements
(``results/<exp>.json``, MB-sized, not committed), the numbers behind its tables
(``results/<exp>_summary.json``, KB-sized, committed) and the tables themselves
(``results/<exp>.md``, committed; ``docs/REPRODUCTION.md`` holds the same tables, checked by
``tests/docs/test_result_tables.py``). ``--tables_only`` rebuilds the summary from the raw runs when they
are there, and the tables from the summary otherwise.

Training runs in FP32 (``precision="32-true"``): on CPU Lightning silently turns
``16-mixed`` into ``bf16-mixed``, and bf16 autocast is slower than FP32 for a model
this small. The low precision is *measured* with the monitor's what-if
(``precision="bf16"``/``"fp16"``: the sampled batch replayed under that autocast
against exact FP32), and ``LNEpsilonBump`` is given the FP16 ``ε_mach`` explicitly.
Each table says which precision trained and which was measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

EXAMPLES_DIR = Path(__file__).resolve().parents[1]
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

from lightning_stability import LNEpsilonBump, StabilityMonitor  # noqa: E402
from tiny_vit import CIFAR10DataModule, TinyViT  # noqa: E402

#: ``torch.finfo(dtype).eps`` of the measured precisions (SPEC notation).
EPS_MACH = {"fp32": 2.0**-23, "bf16": 2.0**-7, "fp16": 2.0**-10}


# --------------------------------------------------------------------------- model


class ScaledEmbedTinyViT(TinyViT):
    """Tiny-ViT whose token embedding (patches + CLS + position) is multiplied by a fixed ``embed_scale``.

    Not in the paper: our configuration for Exp-3 in which some LayerNorms are
    ε-dominated (``ρ_LN < 1`` under FP16's ε_mach). With the default Tiny-ViT every
    norm's input has a per-token variance near 0.3 (``ρ_LN ≈ 3000``), so Algorithm 1
    never acts. The scale is a constant, not a parameter: training cannot undo it.
    ``embed_scale=1`` is exactly :class:`TinyViT`.

    Args:
        embed_scale: multiplier of the embedded tokens before the first block.
        **kwargs: :class:`TinyViT` arguments.
    """

    def __init__(self, embed_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embed_scale = float(embed_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop((torch.cat([cls, x], dim=1) + self.pos_embed) * self.embed_scale)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


# --------------------------------------------------------------------------- recording


class Recorder(Callback):
    """Collects, after every training step, what the monitors measured, the loss and the ε bumps.

    Must come **after** the monitors and the bump callback in ``callbacks=[...]`` (Lightning
    calls callbacks in list order), so their values for this step exist when it reads them.

    Args:
        monitors: ``{measured precision name: monitor}``.
        bump: the ``LNEpsilonBump`` of the run, if any.
    """

    def __init__(self, monitors: dict[str, StabilityMonitor], bump: LNEpsilonBump | None = None) -> None:
        self.monitors = monitors
        self.bump = bump
        self.metrics: dict[str, dict[int, dict[str, float]]] = {name: {} for name in monitors}
        self.loss: dict[int, float] = {}
        self.bumps: list[dict[str, Any]] = []
        self._eps: dict[str, float] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1  # Lightning's step of this batch: the monitors' report.step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss[step] = float(loss.detach())
        for name, monitor in self.monitors.items():
            report = monitor.last_report
            if report is not None and report.step == step and step not in self.metrics[name]:
                self.metrics[name][step] = report.metrics()
        if self.bump is not None:
            for layer, eps in self.bump.current_eps.items():
                before = self._eps.get(layer)
                if before is not None and eps != before:
                    self.bumps.append({"step": step, "layer": layer, "eps_from": before, "eps_to": eps})
                self._eps[layer] = eps


# --------------------------------------------------------------------------- one run


@dataclass
class RunConfig:
    """One training run of an experiment.

    Args:
        seed: seeds the model init (``seed_everything``) and the data (synthetic set and shuffle order).
        steps: optimizer steps.
        d_model: Tiny-ViT width.
        depth: number of blocks.
        n_heads: attention heads.
        batch_size: training batch size.
        lr: peak AdamW learning rate (cosine schedule with 10 warmup steps, as ``tiny_vit.py``).
        measure: ``{precision: every_n_steps}`` — one ``StabilityMonitor(precision=...)`` each.
        sample_size: examples the monitors measure.
        embed_scale: see :class:`ScaledEmbedTinyViT` (1 = the paper's model).
        ln_bump: ``LNEpsilonBump`` keyword arguments, or ``None`` for no intervention.
        data_dir: CIFAR-10 python batches; ``None`` = synthetic CIFAR-shaped data.
        synthetic_size: synthetic examples (the last eighth is the unused val split).
    """

    seed: int
    steps: int
    d_model: int = 96
    depth: int = 6
    n_heads: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    measure: dict[str, int] = field(default_factory=dict)
    sample_size: int = 16
    embed_scale: float = 1.0
    ln_bump: dict[str, Any] | None = None
    data_dir: str | None = None
    synthetic_size: int = 4096


@dataclass
class RunResult:
    """What one run measured (JSON-serialisable)."""

    config: dict[str, Any]
    metrics: dict[str, dict[int, dict[str, float]]]
    loss: dict[int, float]
    bumps: list[dict[str, Any]]
    bumped_layers: list[str]
    ln_eps_mach: float | None
    wall_s: float


def run_fit(cfg: RunConfig) -> RunResult:
    """Train one configuration and return what the monitors measured (see the module docstring)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = ScaledEmbedTinyViT(
        embed_scale=cfg.embed_scale,
        d_model=cfg.d_model,
        depth=cfg.depth,
        n_heads=cfg.n_heads,
        lr=cfg.lr,
    )
    data = CIFAR10DataModule(
        data_dir=cfg.data_dir, batch_size=cfg.batch_size, synthetic_size=cfg.synthetic_size, seed=cfg.seed
    )
    monitors = {
        p: StabilityMonitor(every_n_steps=n, sample_size=cfg.sample_size, precision=p, seed=cfg.seed)  # type: ignore[arg-type]
        for p, n in cfg.measure.items()
    }
    bump = LNEpsilonBump(**cfg.ln_bump, seed=cfg.seed) if cfg.ln_bump is not None else None
    recorder = Recorder(monitors, bump)
    callbacks: list[Callback] = [*monitors.values(), *([bump] if bump else []), recorder]
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=cfg.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    return RunResult(
        config=asdict(cfg),
        metrics=recorder.metrics,
        loss=recorder.loss,
        bumps=recorder.bumps,
        bumped_layers=sorted(bump.bumped) if bump else [],
        ln_eps_mach=bump.resolved_eps_mach if bump else None,
        wall_s=wall,
    )


# --------------------------------------------------------------------------- series helpers


def series(result: RunResult, precision: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one tag as measured at ``precision`` (steps where it was logged)."""
    rows = result.metrics[precision]
    steps = np.array(sorted(s for s, m in rows.items() if tag in m), dtype=np.int64)
    return steps, np.array([rows[int(s)][tag] for s in steps], dtype=np.float64)


def block_max(result: RunResult, precision: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-step max over blocks of ``stability/block{i}/<name>`` (empty when the tag is absent)."""
    rows = result.metrics[precision]
    steps, values = [], []
    for s in sorted(rows):
        vals = [
            v
            for t, v in rows[s].items()
            if t.startswith("stability/block") and t.endswith(f"/{name}") and t.count("/") == 2
        ]
        if vals:
            steps.append(s)
            values.append(max(vals))
    return np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64)


def has_tag(results: Sequence[RunResult], name: str) -> bool:
    """Whether any run logged ``stability/block{i}/<name>`` (e.g. ``r_local`` once it exists)."""
    suffix = f"/{name}"
    return any(
        t.endswith(suffix) for r in results for rows in r.metrics.values() for m in rows.values() for t in m
    )


# --------------------------------------------------------------------------- output


def fmt(v: float | None, digits: int = 3) -> str:
    """Compact number for a markdown cell (``—`` for missing/NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.{digits}e}"
    return f"{v:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment() -> str:
    """One line naming the machine and versions, for the tables' provenance."""
    import lightning

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores), OMP_NUM_THREADS={threads}, "
        f"torch threads {torch.get_num_threads()}"
    )


def run_info(results: Sequence[RunResult], finished: float | None = None) -> dict[str, Any]:
    """Provenance of a set of runs for its summary: how many, their training wall time, when, where.

    Args:
        results: the runs.
        finished: POSIX time the last run finished (default: now).
    """
    stamp = time.gmtime(time.time() if finished is None else finished)
    return {
        "runs": len(results),
        "train_wall_min": round(sum(r.wall_s for r in results) / 60, 1),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M", stamp),
        "environment": environment(),
    }


def provenance_line(info: dict[str, Any]) -> str:
    """The provenance line of a table, from :func:`run_info`."""
    return (
        f"Runs: {info['runs']}, {info['train_wall_min']:.1f} min of training wall time in all, "
        f"finished {info['finished_utc']} UTC. Environment: {info['environment']}"
    )


def save_summary(out: Path, name: str, summary: dict[str, Any]) -> Path:
    """The numbers behind the tables (``out/<name>_summary.json``, KB-sized, committed)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def load_summary(out: Path, name: str) -> dict[str, Any]:
    """Inverse of :func:`save_summary`."""
    return json.loads((out / f"{name}_summary.json").read_text())


def save_raw(out: Path, name: str, results: Sequence[RunResult]) -> Path:
    """All runs' measurements as one JSON file (``out/<name>.json``; MB-sized, not committed)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps([asdict(r) for r in results]))
    return path


def load_raw(path: Path) -> list[RunResult]:
    """Inverse of :func:`save_raw` (JSON turns the integer step keys into strings; undo that)."""
    out = []
    for d in json.loads(path.read_text()):
        d["metrics"] = {p: {int(s): m for s, m in rows.items()} for p, rows in d["metrics"].items()}
        d["loss"] = {int(s): v for s, v in d["loss"].items()}
        out.append(RunResult(**d))
    return out


def eta(n_runs: int, seconds_per_run: float) -> str:
    """``"~12 min"`` style estimate."""
    total = n_runs * seconds_per_run
    return f"~{total / 60:.0f} min" if total >= 90 else f"~{total:.0f} s"


def log(msg: str) -> None:
    """Progress line with a UTC timestamp (flushed; the full runs go to a log file)."""
    print(time.strftime("%H:%M:%S", time.gmtime()), msg, flush=True)

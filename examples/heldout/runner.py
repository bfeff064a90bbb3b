"""Train one held-out run and keep its step series as a small JSON file.

A run is a :class:`RunSpec`: a family, its config overrides, the optimizer settings, the data and
the monitor's sampling. :func:`train` fits it with Lightning (FP32 training, CSV logger,
``StabilityMonitor`` measuring the BF16 or FP16 what-if) plus any extra callbacks, and
:func:`extract` reads the CSV log back into the run's record:

* ``steps`` — every optimizer step's ``train/*`` values (loss, what-if loss, grad norm, |logit| max);
* ``checks`` — a table (``tags``, one row per sampled step; :func:`load_record` turns it back into
  one ``{tag: value}`` per step): the monitor's ``stability/*`` tags that the
  scoring needs (the alarm's own inputs and the paper rule's ``kappa_softmax_max``), to 9
  significant digits: the logged float32 values exactly (the alarm compares ``eps_mach`` for
  equality and its levels to the logged values);
* ``guard`` — only for runs with ``StabilityGuard``: the same kind of table of its
  ``stability/guard/*`` tags, one row per step at which it logged.

The step series are rounded to 5 significant digits (the events' thresholds are 0.1 nats and more).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from heldout.data import byte_batches, digit_batches, masked_byte_batches
from heldout.models import HeldoutModule
from lightning_stability import ProbeOptions, StabilityMonitor

#: Monitor tags kept per check (per-block ``stability/block{i}/<name>`` for the block names).
KEPT_MODEL_TAGS = ("eps_mach", "fp16_headroom", "kappa_softmax_max", "alarm", "attn_logit_max")
KEPT_BLOCK_TAGS = ("attn_logit_max", "rho_ln", "amax")
_BLOCK_TAG = re.compile(r"stability/block\d+/(?P<name>[^/]+)")


@dataclass
class RunSpec:
    """Everything that defines one run (the JSON record repeats it).

    Attributes:
        scenario: scenario name (``<family>_<mechanism>`` or ``healthy_<family>``).
        arm: ``"fail"``, ``"control"`` or ``"healthy"``.
        seed: seed of the initialisation and of the data stream.
        family: model family (:func:`heldout.models.build_backbone`).
        arch: config overrides of the family.
        optim: :class:`~heldout.models.HeldoutModule` optimizer and loss arguments
            (``lr``, ``warmup_steps``, ``weight_decay``, ``adam_eps``, ``betas``, ``z_loss``).
        whatif: the low precision measured (``"bf16"``/``"fp16"``).
        steps: optimizer steps.
        batch_size: examples per batch.
        every_n_steps: the monitor's sampling interval.
        sample_size: examples the monitor measures.
    """

    scenario: str
    arm: str
    seed: int
    family: str
    arch: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    whatif: str = "bf16"
    steps: int = 300
    batch_size: int = 16
    every_n_steps: int = 2
    sample_size: int = 4

    @property
    def name(self) -> str:
        """``<scenario>/<arm>/seed<k>``: the run's path under the results directory."""
        return f"{self.scenario}/{self.arm}/seed{self.seed}"


class _Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[Any]:
        s = self.spec
        seq = s.arch.get("seq_len", 64)
        if s.family == "vit":
            return digit_batches(s.batch_size, s.seed)
        if s.family == "bert":
            return masked_byte_batches(s.batch_size, seq, s.seed)
        return byte_batches(s.batch_size, seq, s.seed)


def train(
    spec: RunSpec,
    log_dir: Path,
    callbacks: Sequence[Callback] = (),
    monitor: bool = True,
    monitor_options: dict[str, Any] | None = None,
) -> Path:
    """Fit ``spec`` (FP32, CPU) with the monitor (unless ``monitor=False``; ``monitor_options``: extra
    ``StabilityMonitor`` arguments, e.g. ``log_per_head``) and ``callbacks``; returns the CSV log file."""
    module = HeldoutModule(spec.family, spec.arch, spec.whatif, seed=spec.seed, **spec.optim)
    monitors = (
        [
            StabilityMonitor(
                every_n_steps=spec.every_n_steps,
                sample_size=spec.sample_size,
                precision=spec.whatif,
                probe=ProbeOptions(local_errors=False),
                **(monitor_options or {}),
            )
        ]
        if monitor
        else []
    )
    logger = CSVLogger(log_dir, name=spec.name, version="")
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=spec.steps,
        logger=logger,
        callbacks=[*monitors, *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    loader = DataLoader(_Stream(spec), batch_size=None)
    trainer.fit(module, loader)
    return Path(logger.log_dir) / "metrics.csv"


def _round(v: float, digits: int = 5) -> float | None:
    if math.isnan(v):
        return None
    return v if math.isinf(v) else float(f"{v:.{digits}g}")


def extract(
    csv_path: Path, kept: Callable[[str], bool] | None = None
) -> tuple[dict[str, list[float | None]], list[dict[str, float]]]:
    """``(steps, checks)`` of a run's CSV log (see the module docstring); NaN is stored as ``None``.

    ``kept`` chooses the tags of ``checks`` (default: the monitor's tags the scoring needs)."""
    kept = kept or _kept
    rows: dict[int, dict[str, float]] = {}
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            merged = rows.setdefault(step, {})
            merged.update({k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)})
    order = sorted(rows)
    train_tags = sorted({k for r in rows.values() for k in r if k.startswith("train/")})
    steps: dict[str, list[float | None]] = {"step": [float(s) for s in order]}
    for tag in train_tags:
        steps[tag] = [_round(rows[s][tag]) if tag in rows[s] else None for s in order]
    checks = []
    for s in order:
        values = {k: v for k, v in rows[s].items() if kept(k)}
        if values:
            values["step"] = float(s)
            checks.append({k: _round(v, 9) for k, v in values.items()})
    return steps, checks  # type: ignore[return-value]


def _guard_tag(tag: str) -> bool:
    return tag.startswith("stability/guard/")


def _kept(tag: str) -> bool:
    if _guard_tag(tag):
        return False
    m = _BLOCK_TAG.fullmatch(tag)
    if m:
        return m["name"] in KEPT_BLOCK_TAGS
    return tag.startswith("stability/") and tag.removeprefix("stability/") in KEPT_MODEL_TAGS


def run_and_save(
    spec: RunSpec,
    results: Path,
    log_dir: Path,
    callbacks: Sequence[Callback] = (),
    monitor_options: dict[str, Any] | None = None,
) -> Path:
    """Train ``spec``, write ``<results>/<scenario>/<arm>/seed<k>.json``; returns its path."""
    t0 = time.perf_counter()
    csv_path = train(spec, log_dir, callbacks, monitor_options=monitor_options)
    return save(spec, csv_path, results, time.perf_counter() - t0)


def _table(rows: list[dict[str, float]]) -> dict[str, Any]:
    tags = sorted({k for c in rows for k in c})
    return {"tags": tags, "rows": [[c.get(t) for t in tags] for c in rows]}


def save(spec: RunSpec, csv_path: Path, results: Path, wall_s: float) -> Path:
    """Write the record of ``spec`` read from its CSV log; returns its path."""
    steps, checks = extract(csv_path)
    out = results / f"{spec.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"spec": asdict(spec), "wall_s": round(wall_s, 1), "steps": steps, "checks": _table(checks)}
    _, guard = extract(csv_path, _guard_tag)
    if guard:
        record["guard"] = _table(guard)
    out.write_text(json.dumps(record, separators=(",", ":")))
    return out


def load_record(path: Path) -> dict[str, Any]:
    """A saved run record: ``checks`` back to one ``{tag: value}`` per check, ``None`` back to NaN."""
    record = json.loads(path.read_text())
    record["steps"] = {k: [math.nan if v is None else v for v in vs] for k, vs in record["steps"].items()}
    for key in ("checks", "guard"):
        if key in record:
            tags, rows = record[key]["tags"], record[key]["rows"]
            record[key] = [
                {t: (math.nan if v is None else v) for t, v in zip(tags, row, strict=True)} for row in rows
            ]
    return record


if __name__ == "__main__":  # a one-run smoke test: python examples/heldout/runner.py
    torch.set_num_threads(1)
    spec = RunSpec("smoke", "fail", 0, "llama", {"seq_len": 32}, {"lr": 1e-3}, steps=20)
    print(run_and_save(spec, Path("/tmp/heldout_smoke/results"), Path("/tmp/heldout_smoke/logs")))

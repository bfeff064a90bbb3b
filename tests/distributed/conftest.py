"""Launching the 2-process scenarios of ``workers.py`` and rebuilding their measurements in one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_stability.capture.probe import StabilityProbe, compose_report

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).with_name("workers.py")
#: Scenarios launched together (one ``torch.distributed.run`` each group: process start-up dominates).
GROUPS = {
    "fsdp2": ("fsdp2", "fsdp2_mp", "fsdp2_checkpoint", "fsdp2_llama"),
    "tp": ("tp_llama", "tp_hand_written"),
}


class Runs:
    """Results of the scenarios, each group launched on first use (2 processes, gloo, CPU)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: set[str] = set()

    def launch(self, group: str) -> None:
        out = self.root / group
        out.mkdir(parents=True, exist_ok=True)
        paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        for _ in range(3):  # another job on the machine may take the rendezvous port first
            proc = subprocess.run(
                [*cmd, str(WORKERS), ",".join(GROUPS[group]), str(out)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
                break
        if proc.returncode:
            tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            raise RuntimeError(f"workers failed ({proc.returncode}):\n{tail}")
        self.done.add(group)

    def result(self, scenario: str, rank: int = 0) -> dict[str, Any]:
        group = next(g for g, names in GROUPS.items() if scenario in names)
        if group not in self.done:
            self.launch(group)
        data: dict[str, Any] = json.loads((self.root / group / f"{scenario}_rank{rank}.json").read_text())
        if "error" in data:
            raise AssertionError(f"{scenario} failed on rank {rank}:\n{data['error']}")
        return data

    def path(self, scenario: str, name: str) -> Path:
        group = next(g for g, names in GROUPS.items() if scenario in names)
        return self.root / group / name


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


def one_process(
    runs: Runs,
    scenario: str,
    model: nn.Module,
    step: int,
    low_precision: Callable[[], AbstractContextManager[Any]],
    prepare: Callable[[Any], Any] = lambda x: x,
    **probe_kw: Any,
) -> tuple[StabilityProbe, list[dict[str, float]], dict[str, float], Any]:
    """The same measurement on ``model`` unsharded in this process, on each rank's sampled examples.

    Loads the full parameters the ranks measured at ``step``; returns the probe, each rank's
    raw values, their reduction across ranks (the metric table's operations) and the report.
    """
    params = torch.load(runs.path(scenario, f"params_{scenario}_step{step}.pt"))
    params = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in params.items()}
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and set(missing) <= {n for n, _ in model.named_buffers()}, (missing, unexpected)
    probe = StabilityProbe(model, **probe_kw)
    per_rank, raws = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (torch.distributed.run sets OMP_NUM_THREADS=1)
    try:
        for rank in (0, 1):
            args, kwargs = torch.load(runs.path(scenario, f"inputs_{scenario}_rank{rank}_step{step}.pt"))
            raw = probe.measure(prepare(args), prepare(kwargs), low_precision, seed=step)
            keys, vec = raw.flat()
            per_rank.append(dict(zip(keys, vec.tolist(), strict=True)))
            raws.append(raw)
    finally:
        torch.set_num_threads(threads)
    reduced = {}
    for key in raws[0].values:
        values = [r[key] for r in per_rank]
        op = key.ranks
        reduced[key] = max(values) if op == "max" else min(values) if op == "min" else sum(values)
    report = compose_report(probe, raws[0], reduced, step - 1)
    return probe, [_named(r) for r in per_rank], _named(reduced), report


def _named(values: dict[Any, float]) -> dict[str, float]:
    """Raw values keyed as the workers record them (``repr`` of each ``RawKey``)."""
    return {repr(k): v for k, v in values.items()}


def assert_close(
    got: dict[str, float],
    want: dict[str, float],
    rel: float,
    what: str,
    loose: dict[str, float] | None = None,
) -> None:
    """Same keys; every value within ``rel`` relative (NaN equal to NaN, inf to inf), keys containing
    a name of ``loose`` within its tolerance instead."""
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:10]}"
    bad = []
    for key, w in want.items():
        g = got[key]
        tol = next((t for name, t in (loose or {}).items() if name in key), rel)
        if math.isnan(w) and math.isnan(g):
            continue
        if not (g == w or abs(g - w) <= tol * max(abs(w), abs(g))):
            bad.append(f"{key}: {g!r} vs {w!r}")
    assert not bad, f"{what}: {len(bad)} values differ:\n" + "\n".join(bad[:20])


def check_one_process(
    runs: Runs,
    scenario: str,
    make_model: Callable[[], nn.Module],
    low_precision: Callable[[nn.Module], AbstractContextManager[Any]],
    steps: list[int],
    loose: dict[str, float] | None = None,
    **probe_kw: Any,
) -> list[tuple[StabilityProbe, Any]]:
    """Every sampled step was measured, nothing skipped, and every number equals one process's.

    For each step: each rank's raw values against the unsharded model measured in this process
    on that rank's examples (bitwise, but ``loose`` keys), and the logged metrics against the
    report composed from their cross-rank reduction. Returns each step's probe and report.
    """
    result = runs.result(scenario)
    assert result["warnings"] == [], result["warnings"]  # no skipped step, no "cannot measure"
    assert [row["step"] for row in result["rows"]] == steps
    out = []
    for j, (row, logged) in enumerate(zip(result["rows"], result["metrics"], strict=True)):
        model = make_model()
        probe, per_rank, reduced, report = one_process(
            runs, scenario, model, row["step"], lambda m=model: low_precision(m), **probe_kw
        )
        for rank in (0, 1):
            local = runs.result(scenario, rank)["rows"][j]["local"]
            assert_close(local, per_rank[rank], 0.0, f"{scenario} rank {rank} step {row['step']}", loose)
        assert_close(row["reduced"], reduced, 0.0, f"{scenario} reduced", loose)
        metrics = {k: v for k, v in logged["metrics"].items() if k != "stability/alarm"}
        assert_close(metrics, report.metrics(), 0.0, f"{scenario} logged", loose)
        out.append((probe, report))
    return out

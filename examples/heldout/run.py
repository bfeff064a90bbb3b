"""Held-out evaluation of the default alarm: train the runs, save their series, score them.

::

    # the runs (5 scenarios x 2 arms x seeds 0-4, then the long healthy runs), in the background:
    nice -n 10 python examples/heldout/run.py train --scenarios all --seeds 0 1 2 3 4
    nice -n 10 python examples/heldout/run.py train --healthy all --seeds 0 1 2
    # rewrite the records from the CSV logs (after a change of what a record keeps)
    python examples/heldout/run.py extract --scenarios all --healthy all --seeds 0 1 2 3 4
    # score every saved run: tables (Markdown + JSON) and figures
    python examples/heldout/run.py score
    # the guard: the same runs with each guard variant, then compared with the unguarded ones
    nice -n 10 python examples/heldout/run.py train --scenarios all --variant guard
    nice -n 10 python examples/heldout/run.py train --scenarios all --variant guard_every_step
    python examples/heldout/run.py guard     # results/guard_summary.json, guard_tables.md, a figure
    # fresh seeds, in their own directory (not scored with the alarm's runs), unguarded and guarded
    F=examples/heldout/results/fresh; S="llama_logit_growth vit_fp16_overflow"
    nice -n 10 python examples/heldout/run.py train --out $F --scenarios $S --seeds 5 6 7 8 9 [--variant NAME]
    python examples/heldout/run.py guard --out $F  # results/fresh/guard_summary.json, guard_tables.md
    # CI: two tiny runs, a few steps, scored end to end into a temporary directory
    python examples/heldout/run.py quick --out /tmp/heldout_quick

Runs already saved are not trained again. ``--variant NAME`` trains with the monitor options and
the extra callbacks of ``VARIANTS[NAME]`` (a guard) into ``results/<NAME>/``; the default variant
``none`` adds nothing. Run from the repository root with ``src`` and ``examples`` importable
(``pip install -e .`` and this file's own path handling do that).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from heldout.report import write_report  # noqa: E402
from heldout.runner import RunSpec, run_and_save, save  # noqa: E402
from heldout.scenarios import HEALTHY, SCENARIOS, healthy_spec  # noqa: E402
from lightning_stability import StabilityGuard  # noqa: E402

RESULTS = HERE / "results"


@dataclass(frozen=True)
class Variant:
    """What a variant adds to every run: monitor options and callbacks listed after the monitor."""

    monitor: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[RunSpec], list[Callback]] = lambda spec: []


#: variant name → what it adds; the alarm's evaluation uses "none".
VARIANTS: dict[str, Variant] = {
    "none": Variant(),
    # the guard, QK-clipping only at the monitor's sampled checks, by the block's maximum (the
    # monitor logs no per-head values)
    "guard": Variant(callbacks=lambda spec: [StabilityGuard(qk_clip_every_step=False)]),
    # the guard, a block armed by its first QK-clip then clipped after every optimizer step by
    # the per-head maxima of its own training forward (MuonClip's schedule)
    "guard_every_step": Variant(callbacks=lambda spec: [StabilityGuard(qk_clip_every_step=True)]),
}


def _quiet() -> None:
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def planned(scenarios: list[str], healthy: list[str], seeds: list[int], quick: bool) -> list[RunSpec]:
    """The runs to train, controls first (the gap event of a failing run needs its control)."""
    specs = [
        SCENARIOS[s].spec(arm, seed, quick)
        for s in scenarios
        for seed in seeds
        for arm in ("control", "fail")
    ]
    specs += [healthy_spec(h, seed, quick) for h in healthy for seed in seeds]
    return specs


def train_all(specs: list[RunSpec], results: Path, logs: Path, variant: str) -> None:
    """Train every spec whose JSON is not saved yet."""
    for spec in specs:
        out = results / f"{spec.name}.json"
        if out.exists():
            continue
        v = VARIANTS[variant]
        path = run_and_save(spec, results, logs, v.callbacks(spec), v.monitor)
        print(f"saved {path}", flush=True)


def extract_all(specs: list[RunSpec], results: Path, logs: Path) -> None:
    """Rewrite the record of every spec whose CSV log exists (keeping its recorded wall time)."""
    for spec in specs:
        csv_path = logs / spec.name / "metrics.csv"
        if not csv_path.exists():
            continue
        old = results / f"{spec.name}.json"
        wall = json.loads(old.read_text())["wall_s"] if old.exists() else math.nan
        print(f"saved {save(spec, csv_path, results, wall)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``train``, ``extract``, ``score``, ``guard`` or ``quick`` (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["train", "extract", "score", "guard", "quick"])
    p.add_argument("--scenarios", nargs="*", default=[], help="scenario names, or 'all'")
    p.add_argument("--healthy", nargs="*", default=[], help="healthy run names, or 'all'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variant", default="none", choices=sorted(VARIANTS))
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default examples/heldout/results)"
    )
    p.add_argument("--logs", type=Path, default=Path("runs/heldout_logs"), help="CSV logs (not committed)")
    a = p.parse_args(argv)
    _quiet()
    results = a.out or RESULTS
    logs = a.out / "logs" if a.command == "quick" and a.out else a.logs
    if a.variant != "none":
        results, logs = results / a.variant, logs / a.variant
    if a.command == "quick":
        specs = planned(["llama_logit_growth"], ["healthy_vit"], [0], quick=True)
        train_all(specs, results, logs, a.variant)
        print(write_report(results, figures=False))
        return
    if a.command in ("train", "extract"):
        scen = list(SCENARIOS) if a.scenarios == ["all"] else a.scenarios
        healthy = list(HEALTHY) if a.healthy == ["all"] else a.healthy
        specs = planned(scen, healthy, a.seeds, quick=False)
        if a.command == "train":
            train_all(specs, results, logs, a.variant)
        else:
            extract_all(specs, results, logs)
        return
    if a.command == "guard":
        from heldout.guard_figure import plot_guard
        from heldout.guard_report import guard_report

        root = a.out or RESULTS
        variants = [v for v in VARIANTS if v != "none" and (root / v).is_dir()]
        print(guard_report(root, variants))
        if a.out is None:
            plot_guard(root, variants)
        return
    print(write_report(results, figures=True))


if __name__ == "__main__":
    main()

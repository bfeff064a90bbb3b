"""What the guard costs in wall time: the same run without and with each guard variant, interleaved.

::

    nice -n 10 python examples/heldout/guard_timing.py > examples/heldout/results/guard_timing.json

For each run of :data:`TIMED` (seed 0, the first :data:`STEPS` steps), the unguarded run and one run per
guard variant of :data:`VARIANTS` (``heldout.run.VARIANTS``; all with the monitor, as in the evaluation)
alternate :data:`REPEATS` times, A B C, C B A, A B C, so that a change of the machine's load falls on
all of them; per variant, the median wall-time ratio guarded / unguarded is printed with every time,
with whether the guard acted and whether the losses equal the unguarded ones step for step. Wall time
of ``trainer.fit`` only (model built outside).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from heldout.run import VARIANTS, _quiet  # noqa: E402
from heldout.runner import extract, train  # noqa: E402
from heldout.scenarios import SCENARIOS  # noqa: E402
from lightning_stability import StabilityGuard  # noqa: E402

STEPS = 100
REPEATS = 3
#: (scenario, arm) timed: a control, where the guard has nothing to do, and failing runs where it
#: QK-clips at nearly every check (sampled) or every step (armed)
TIMED = (("llama_logit_growth", "control"), ("llama_logit_growth", "fail"), ("vit_fp16_overflow", "fail"))
#: the guard variants timed against the unguarded run
VARIANTS_TIMED = ("guard", "guard_every_step")


def _one(scenario: str, arm: str, variant: str, logs: Path) -> tuple[float, list[float | None], int]:
    spec = replace(SCENARIOS[scenario].spec(arm, 0), steps=STEPS, arm=f"{arm}_{variant}")
    callbacks = VARIANTS[variant].callbacks(spec)
    t0 = time.perf_counter()
    csv = train(spec, logs, callbacks)
    wall = time.perf_counter() - t0
    guards = [cb for cb in callbacks if isinstance(cb, StabilityGuard)]
    acted = sum(1 for g in guards for a in g.actions if a.applied)
    armed = sum(sum(g.armed.steps_clipped.values()) for g in guards)  # clips at every step
    return wall, extract(csv)[0]["train/loss"], acted + armed


def _time_run(scenario: str, arm: str, tmp: Path) -> dict[str, object]:
    order = ("none", *VARIANTS_TIMED)
    times: dict[str, list[float]] = {v: [] for v in order}
    losses: dict[str, list[float | None]] = {}
    acted: dict[str, int] = dict.fromkeys(order, 0)
    for r in range(REPEATS):
        for variant in order if r % 2 == 0 else order[::-1]:
            wall, loss, n = _one(scenario, arm, variant, tmp / f"r{r}")
            times[variant].append(round(wall, 2))
            losses[variant] = loss
            acted[variant] = max(acted[variant], n)
    out: dict[str, object] = {"unguarded_s": times["none"]}
    for v in VARIANTS_TIMED:
        ratios = [g / u for g, u in zip(times[v], times["none"], strict=True)]
        out[v] = {
            "guarded_s": times[v],
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "guard_actions": acted[v],
            "identical_loss": losses[v] == losses["none"],
        }
    return out


def main() -> None:
    """Time every run of :data:`TIMED`; print one JSON document."""
    _quiet()
    out: dict[str, object] = {
        "steps": STEPS,
        "repeats": REPEATS,
        "variants": list(VARIANTS_TIMED),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "runs": {},
    }
    # what the runs print (the monitor's verdict) goes to stderr: stdout is the JSON document only
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for scenario, arm in TIMED:
            out["runs"][f"{scenario}/{arm}"] = _time_run(scenario, arm, Path(tmp))  # type: ignore[index]
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

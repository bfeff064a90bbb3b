"""What the guard costs in wall time: the same run with and without ``StabilityGuard()``, interleaved.

::

    nice -n 10 python examples/heldout/guard_timing.py --out examples/heldout/results/guard_timing.json

For each run of :data:`TIMED` (seed 0, the first :data:`STEPS` steps), the unguarded and the guarded run
(both with the monitor, as in the evaluation) alternate :data:`REPEATS` times, A B B A …, so that a
change of the machine's load falls on both; the median wall-time ratio guarded / unguarded is
printed with every time and written to ``--out`` (the monitor's verdicts at the end of each fit go
to stdout too, so a redirect of stdout is no JSON file). The guarded runs also report whether the
guard acted and whether the losses equal the unguarded ones step for step. Wall time of
``trainer.fit`` only (model built outside).
"""

from __future__ import annotations

import argparse
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

from heldout.run import _quiet  # noqa: E402
from heldout.runner import extract, train  # noqa: E402
from heldout.scenarios import SCENARIOS  # noqa: E402
from lightning_stability import StabilityGuard  # noqa: E402

STEPS = 100
REPEATS = 3
#: (scenario, arm) timed: a control, where the guard has nothing to do, and a failing run where it
#: QK-clips at nearly every check
TIMED = (("llama_logit_growth", "control"), ("llama_logit_growth", "fail"))


def _one(scenario: str, arm: str, guarded: bool, logs: Path) -> tuple[float, list[float | None], int]:
    spec = replace(SCENARIOS[scenario].spec(arm, 0), steps=STEPS, arm=f"{arm}_{int(guarded)}")
    guard = StabilityGuard()
    t0 = time.perf_counter()
    csv = train(spec, logs, [guard] if guarded else [])
    wall = time.perf_counter() - t0
    acted = sum(1 for a in guard.actions if a.applied) if guarded else 0
    return wall, extract(csv)[0]["train/loss"], acted


def main() -> None:
    """Time every run of :data:`TIMED`; print one JSON document and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON document here")
    args = parser.parse_args()
    _quiet()
    out: dict[str, object] = {
        "steps": STEPS,
        "repeats": REPEATS,
        "cpu_count": os.cpu_count(),
        "load_before": os.getloadavg(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for scenario, arm in TIMED:
            times: dict[bool, list[float]] = {False: [], True: []}
            losses: dict[bool, list[float | None]] = {}
            acted = 0
            for r in range(REPEATS):
                for guarded in (False, True) if r % 2 == 0 else (True, False):
                    wall, loss, n = _one(scenario, arm, guarded, Path(tmp) / f"r{r}")
                    times[guarded].append(round(wall, 2))
                    losses[guarded] = loss
                    acted = max(acted, n)
            ratios = [g / u for g, u in zip(times[True], times[False], strict=True)]
            out["runs"][f"{scenario}/{arm}"] = {  # type: ignore[index]
                "unguarded_s": times[False],
                "guarded_s": times[True],
                "ratio_median": round(statistics.median(ratios), 3),
                "guard_actions": acted,
                "identical_loss": losses[True] == losses[False],
            }
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

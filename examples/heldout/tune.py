"""How the knobs of the held-out scenarios were chosen: seed 100 only, loss events only.

::

    nice -n 10 python examples/heldout/tune.py > examples/heldout/results/tuning_seed100.txt

Each candidate trains once on seed 100 (not one of the evaluation seeds 0–4) without the monitor, and
prints the steps of the divergence and low-precision events (:mod:`heldout.events`), the 10-step
mean loss at steps 50, 100, 200 and the end, and the last step's largest |output logit|. Nothing the
alarm reads is printed or used.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heldout.events import divergence, low_precision, trailing_mean
from heldout.run import _quiet
from heldout.runner import RunSpec, extract, train

#: (label, family, arch, optim, what-if, steps): the candidates tried, in order
GRID: list[tuple[str, str, dict[str, Any], dict[str, Any], str, int]] = [
    *[
        (f"llama lr{lr} qk{qk}", "llama", {"seq_len": 64, "qk_norm": qk}, {"lr": lr}, "bf16", 300)
        for lr in (0.1, 0.3)
        for qk in (False, True)
    ],
    *[
        (f"gpt lr{lr} z{z} {p}", "gpt", {"seq_len": 64, "qk_norm": True}, {"lr": lr, "z_loss": z}, p, n)
        for lr, p, n in (
            (0.1, "fp16", 300),
            (0.3, "fp16", 300),
            (1.0, "fp16", 300),
            (0.2, "bf16", 600),
            (0.3, "bf16", 600),
        )
        for z in (0.0, 1e-4)
    ],
    *[
        (f"vit lr{lr} w20", "vit", {"layers": 4}, {"lr": lr}, "fp16", 300)
        for lr in (0.01, 0.03, 0.1, 0.3, 1.0)
    ],
    ("vit lr0.3 w100", "vit", {"layers": 4}, {"lr": 0.3, "warmup_steps": 100}, "fp16", 300),
    *[
        (f"bert eps{e}", "bert", {"seq_len": 64, "norm_eps": e}, {"lr": 1e-3}, "fp16", 300)
        for e in (1e-12, 1.0)
    ],
    *[
        (f"llama adam_eps{e}", "llama", {"seq_len": 64}, {"lr": 1e-3, "adam_eps": e}, "bf16", 300)
        for e in (1e-8, 1e-3, 1e-2)
    ],
]


def _nan(xs: list[float | None]) -> list[float]:
    return [math.nan if x is None else x for x in xs]


def main() -> None:
    """Train every candidate of :data:`GRID` on seed 100 and print one line each."""
    _quiet()
    for label, family, arch, optim, whatif, steps in GRID:
        spec = RunSpec(
            f"tune/{label.replace(' ', '_')}",
            "x",
            100,
            family,
            arch,
            {"warmup_steps": 20, **optim},
            whatif,
            steps,
        )
        series, _ = extract(train(spec, Path("runs/heldout_tune"), monitor=False))
        s, loss, lp = series["step"], _nan(series["train/loss"]), _nan(series["train/whatif_loss"])
        m = trailing_mean(loss)
        at = [round(float(m[i]), 2) for i in (49, 99, 199, len(m) - 1)]
        print(
            f"{label:28s} divergence={divergence(s, loss)} low_precision={low_precision(s, loss, lp)} "
            f"loss@50,100,200,end={at} logit_absmax_end={series['train/logit_absmax'][-1]}",
            flush=True,
        )


if __name__ == "__main__":
    main()

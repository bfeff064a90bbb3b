"""The guard's figure: loss curves and the monitor's attention logits, unguarded vs each guard variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from heldout.events import trailing_mean
from heldout.guard_report import TAU, _block_logits, _loss
from heldout.report import IMAGES, load_all

#: scenarios where the guard acts by QK-clip (the others: no QK-clip, nothing to compare)
SHOWN = ("llama_logit_growth", "vit_fp16_overflow")


def plot_guard(results: Path, variants: Sequence[str], out: Path = IMAGES) -> None:
    """``heldout_guard.png``: per scenario, the 20-step mean loss (top) and the max attention logit at the
    monitor's checks (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = load_all(results)
    runs = {v: load_all(results / v) for v in variants}
    fig, axes = plt.subplots(2, len(SHOWN), figsize=(6 * len(SHOWN), 6.4), squeeze=False)
    styles = {"fail (no guard)": "C3", "control (no guard)": "C0"}
    colors = {v: f"C{i + 1}" for i, v in enumerate(variants)}
    for col, scenario in enumerate(SHOWN):
        top, bottom = axes[0][col], axes[1][col]
        series = [("fail (no guard)", base, "fail"), ("control (no guard)", base, "control")]
        series += [(v, runs[v], "fail") for v in variants]
        for label, records, arm in series:
            color = styles.get(label) or colors[label]
            for i, (_, rec) in enumerate(
                sorted((k, r) for k, r in records.items() if k[:2] == (scenario, arm))
            ):
                steps = rec["steps"]["step"]
                top.plot(
                    steps,
                    trailing_mean(_loss(rec), 20),
                    color=color,
                    lw=0.8,
                    alpha=0.7,
                    label=label if i == 0 else None,
                )
                pts = np.asarray(_block_logits(rec), dtype=np.float64)
                if pts.size:
                    bottom.plot(pts[:, 0], pts[:, 1], color=color, lw=0.6, alpha=0.6)
        bottom.axhline(TAU, color="k", ls="--", lw=0.7)
        bottom.set_yscale("log")
        top.set_title(f"{scenario}: 20-step mean training loss, every seed", fontsize=9)
        bottom.set_title("monitor's max attention logit at its checks (dashed: τ = 100)", fontsize=9)
        bottom.set_xlabel("step")
        top.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "heldout_guard.png", dpi=80)
    plt.close(fig)

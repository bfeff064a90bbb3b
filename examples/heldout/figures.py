"""Figures of the held-out evaluation: per-scenario loss and alarm timelines, and the threshold sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heldout.scenarios import SCENARIOS
from heldout.score import alarm_steps


def plot_all(runs: Sequence[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """``heldout_scenarios.png`` (loss of every seed, events, first alarms) and ``heldout_sweep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    _scenarios(runs, out / "heldout_scenarios.png")
    _sweep(summary, out / "heldout_sweep.png")


def _scenarios(runs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [n for n in SCENARIOS if any(r["spec"]["scenario"] == n for r in runs)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in runs:
            if r["spec"]["scenario"] != name:
                continue
            fail = r["spec"]["arm"] == "fail"
            color = "C3" if fail else "C0"
            ax.plot(r["steps"]["step"], r["steps"]["train/loss"], color=color, lw=0.7, alpha=0.7)
            if fail and r["event"] is not None:
                ax.axvline(r["event"].step, color="k", ls="--", lw=0.6)
            fired = alarm_steps(r["checks"])
            if fired:
                ax.plot([fired[0][0]], [ax.get_ylim()[0]], marker="^", color=color, ms=7, clip_on=False)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (red: failing, blue: control)")
    fig.suptitle("dashed: event of a failing seed; triangle: first firing of the default alarm", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sweep(summary: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, marker in (
        ("default_logit", "default, logit τ moved", "o"),
        ("logit_only", "logit > τ alone", "s"),
        ("precision_aware", "logit·ε_mach > τ·2⁻⁷ alone", "^"),
    ):
        pts = summary["sweeps"][key]
        xs = [max(p["fa_per_1000"], 0.01) for p in pts]
        ys = [p["warned_first"] / max(p["event_runs"], 1) for p in pts]
        axes[0].plot(xs, ys, marker=marker, label=label, lw=1)
        for p, x, y in zip(pts, xs, ys, strict=True):
            if key == "default_logit":
                axes[0].annotate(f"{p['threshold']:g}", (x, y), fontsize=6)
    pts = summary["sweeps"]["default_headroom"]
    axes[1].plot(
        [max(p["fa_per_1000"], 0.01) for p in pts],
        [p["warned_first"] / max(p["event_runs"], 1) for p in pts],
        marker="o",
        lw=1,
    )
    for p in pts:
        axes[1].annotate(
            f"{p['threshold']:g}",
            (max(p["fa_per_1000"], 0.01), p["warned_first"] / max(p["event_runs"], 1)),
            fontsize=6,
        )
    for ax, title in zip(
        axes, ("attention-logit threshold τ (default 100)", "FP16 headroom bits (default 2)"), strict=True
    ):
        ax.set_xscale("log")
        ax.set_xlabel("false alarms per 1,000 healthy checks (0 drawn at 0.01)")
        ax.set_ylabel("runs with an event warned first (fraction)")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

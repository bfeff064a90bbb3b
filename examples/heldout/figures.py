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
        firsts: list[tuple[int, str]] = []
        for r in runs:
            if r["spec"]["scenario"] != name:
                continue
            color = "C3" if r["spec"]["arm"] == "fail" else "C0"
            ax.plot(r["steps"]["step"], r["steps"]["train/loss"], color=color, lw=0.7, alpha=0.7)
            if r["spec"]["arm"] == "fail" and r["event"] is not None:
                ax.axvline(r["event"].step, color="k", ls="--", lw=0.6)
            fired = alarm_steps(r["checks"])
            if fired:
                firsts.append((fired[0][0], color))
        bottom = ax.get_ylim()[0]
        for step, color in firsts:
            ax.plot([step], [bottom], marker="^", color=color, ms=7, alpha=0.7, clip_on=False)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (red: failing, blue: control)")
    fig.suptitle("dashed: event of a failing seed; triangle: first firing of the default alarm", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sweep(summary: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    sw = summary["sweeps"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    logit = (
        ("default_logit", "default, τ moved"),
        ("logit_only", "logit > τ alone"),
        ("precision_aware", "logit·ε_mach > τ·2⁻⁷ alone"),
    )
    for key, label in logit:
        xs = [p["threshold"] for p in sw[key]]
        axes[0].plot(xs, [p["fa_per_1000"] for p in sw[key]], marker="o", lw=1, label=label)
        axes[1].plot(xs, [_nan(p["median_lead"]) for p in sw[key]], marker="o", lw=1, label=label)
    for key, label in (("default_headroom", "default, bits moved"), ("headroom_only", "headroom alone")):
        xs = [p["threshold"] for p in sw[key]]
        axes[2].plot(
            xs, [p["fa_per_1000"] for p in sw[key]], marker="o", lw=1, label=f"{label}: false alarms"
        )
        axes[2].plot(
            xs,
            [_nan(p["median_lead"]) for p in sw[key]],
            marker="s",
            ls=":",
            lw=1,
            label=f"{label}: median lead",
        )
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.axvline(100, color="k", ls="--", lw=0.7)
        ax.set_xlabel("attention-logit threshold τ (dashed: default 100)")
    axes[2].axvline(2, color="k", ls="--", lw=0.7)
    axes[2].set_xlabel("FP16 headroom bits (dashed: default 2); FP16 runs")
    axes[0].set_ylabel("false alarms per 1,000 healthy checks")
    axes[1].set_ylabel("median lead over warned runs (steps)")
    axes[2].set_ylabel("per 1,000 checks / steps")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)

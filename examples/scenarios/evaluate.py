"""Does it warn? Run each instability scenario and its control over seeds, then score alarms on the logs.

::

    nice -n 10 python examples/scenarios/evaluate.py --out runs/scenarios_eval   # 4 scenarios x 3 seeds
    python examples/scenarios/evaluate.py --quick --out /tmp/scen_quick           # CI: tiny, 1 seed
    python examples/scenarios/evaluate.py --out runs/scenarios_eval --no-train    # re-score the logs

Each run goes through the scenario's LightningCLI config (``configs/<scenario>.yaml`` and
``configs/<scenario>_control.yaml``) with ``--seed_everything/--model.seed/--data.seed`` set
to the seed. Then, for every run, the monitor's sampled steps are replayed through the
candidate rules of the rule book (:mod:`lightning_stability.rules`: the
:class:`~lightning_stability.rules.alarm.Alarm` objects the monitor uses online), and the
loss-based detectors of :mod:`lightning_stability.analysis.detectors` run on the same run's
``train/loss`` and ``train/grad_norm``.

**Event (divergence) rules**, from the training's own per-step logs, not from the monitor:

* ``loss``: the first step at which the mean of the last 10 losses (fewer in the first 10
  steps) is ≥ 0.3 nats above the lowest such mean so far, or the loss is non-finite.
  Scenarios (a) and (d).
* ``fp16 overflow``: the first step at which the training forward's largest |activation|
  (``scenario/act_max``) exceeds 65504 — where an FP16 run would overflow. Scenario (b).
* ``none``: scenario (c) is ε-dominated from initialisation; nothing diverges, the
  question is only whether the rule names it and stays silent on the control.

Every signal is read from the monitor's own ``stability/*`` tags. Only logs without
``attn_logit_max``/``amax``/``fp16_headroom`` tags fall back to the model's own
``scenario/*`` values at the same steps (flagged ``*`` in the table).

**One implementation.** When the run's monitor used the default alarm, its logged
``stability/alarm`` must equal the offline replay of the default alarm on the same tags;
``RunScore.online_matches`` records that (``None``: the run logged no alarm, or another rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lightning_stability.analysis.detectors import (  # noqa: E402
    first_step,
    lightning_spike_steps,
    olmo_spike_steps,
)
from lightning_stability.analysis.logs import Run, load_run  # noqa: E402
from lightning_stability.diagnostics.rolling import RollingZScore  # noqa: E402
from lightning_stability.rules import RULE_BY_NAME, Alarm, AlarmResult, rule_book  # noqa: E402
from lightning_stability.rules.thresholds import FP16_MAX, R_LOCAL_AT_RISK_EPS  # noqa: E402

LOSS_WINDOW = 10
LOSS_RISE = 0.3

#: scenario → (event rule, steps in full mode, one-line description)
SCENARIOS: dict[str, tuple[str, int, str]] = {
    "logit_growth": ("loss", 160, "(a) attention-logit growth, lr 0.1, no qk-norm; control: qk-norm"),
    "fp16_overflow": ("fp16 overflow", 200, "(b) residual stream past 65504 at lr 0.3; control: lr 0.1"),
    "eps_norm": ("none", 100, "(c) ε-dominated LayerNorm (embedding std 1e-4); control: std 0.02"),
    "short_warmup": ("loss", 120, "(d) optimizer spike, no warmup (not numerical); control: warmup 100"),
}

def _one(name: str, **changes: Any) -> Callable[[], Alarm]:
    """A fresh alarm of one rule of the rule book (its levels changed by ``changes``)."""
    rule = dataclasses.replace(RULE_BY_NAME[name], **changes)
    return lambda: Alarm([rule], RollingZScore)


#: name → factory of a fresh candidate alarm (the same objects the monitor calls)
CANDIDATES: dict[str, Callable[[], Alarm]] = {
    "paper z(κ_softmax)>1.5": _one("kappa_softmax_z"),
    "z(log10 attn_logit_max)>3": _one("logit_growth_z"),
    "attn_logit_max>100": _one("attn_logit_max"),
    "entropy<0.1": _one("entropy_collapse"),
    "fp16_headroom<2": _one("fp16_headroom"),
    "rho_ln<1": _one("rho_ln"),
    "r_local>10·eps": _one("r_local", watch=R_LOCAL_AT_RISK_EPS, fallback=None),
    "r_local>1·eps": _one("r_local", fallback=None),
    "default": lambda: Alarm(rule_book("default").alarm_rules, name="default"),
}


# ----------------------------------------------------------------------------- running


def run_one(scenario: str, control: bool, seed: int, out: Path, quick: bool) -> Path:
    """Train one run through LightningCLI; returns its TensorBoard run directory."""
    import gpt

    name = f"{scenario}_control" if control else scenario
    config = HERE / "configs" / f"{name}.yaml"
    args = [
        "fit",
        f"--config={config}",
        f"--seed_everything={seed}",
        f"--model.seed={seed}",
        f"--data.seed={seed}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version=seed{seed}",
    ]
    if quick:
        args += QUICK_ARGS
    gpt.main(args)
    return out / name / f"seed{seed}"


#: --quick: a tiny model and few steps (CI smoke: the pipeline runs end to end, not the evidence)
QUICK_ARGS = [
    "--trainer.max_steps=30",
    "--model.d_model=32",
    "--model.n_layers=2",
    "--model.n_heads=2",
    "--model.max_len=16",
    "--data.seq_len=16",
    "--data.n_sequences=256",
    "--data.batch_size=8",
]


# ----------------------------------------------------------------------------- scoring


@dataclass
class RunScore:
    """Everything the table shows for one run."""

    scenario: str
    control: bool
    seed: int
    event: int | None
    alarms: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)  # rule → [(step, block)]
    available: dict[str, bool] = field(default_factory=dict)
    fallback: bool = False
    detectors: dict[str, int | None] = field(default_factory=dict)
    final_loss: float = math.nan
    online_matches: bool | None = None
    r_local_peak: float | None = None  # max over blocks and checks (up to the event) of r_local / eps_mach
    r_local_peak_all: float | None = None  # the same over every check


def loss_divergence(run: Run) -> int | None:
    """First step where the mean of the last ≤ 10 losses is ≥ 0.3 nats above its running minimum."""
    s = run.get("train/loss")
    if s is None:
        return None
    lowest = math.inf
    for j in range(len(s)):
        if not math.isfinite(s.values[j]):
            return int(s.steps[j])
        mean = float(np.mean(s.values[max(0, j + 1 - LOSS_WINDOW) : j + 1]))  # partial window at the start
        lowest = min(lowest, mean)
        if mean >= lowest + LOSS_RISE:
            return int(s.steps[j])
    return None


def overflow_step(run: Run) -> int | None:
    """First step whose training forward held an |activation| > 65504."""
    s = run.get("scenario/act_max")
    if s is None:
        return None
    hit = np.nonzero(~(s.values <= FP16_MAX))[0]
    return int(s.steps[hit[0]]) if hit.size else None


def sampled_steps(run: Run) -> list[dict[str, float]]:
    """One ``{tag: value}`` per monitor step, with the ``scenario/*`` fallbacks for missing signals."""
    tags = [t for t in run.scalars if t.startswith("stability/")]
    steps = sorted({int(x) for t in tags for x in run.scalars[t].steps})
    table = {
        t: dict(zip(run.scalars[t].steps.tolist(), run.scalars[t].values.tolist(), strict=True)) for t in tags
    }
    scen = {
        t: dict(zip(s.steps.tolist(), s.values.tolist(), strict=True))
        for t, s in run.scalars.items()
        if t.startswith("scenario/")
    }
    out = []
    for step in steps:
        values = {t: table[t][step] for t in tags if step in table[t]}
        values["step"] = float(step)
        for t, series in scen.items():
            name = t.removeprefix("scenario/")
            if name == "act_max":
                if "stability/fp16_headroom" not in values and step in series and series[step] > 0:
                    values["stability/fp16_headroom"] = math.log2(FP16_MAX / series[step])
                    values["fallback"] = 1.0
            elif f"stability/{name}" not in values and step in series:
                values[f"stability/{name}"] = series[step]
                values["fallback"] = 1.0
        out.append(values)
    return out


def r_local_peak(checks: list[dict[str, float]], event: int | None) -> float | None:
    """Largest ``r_local / eps_mach`` over blocks and the checks before ``event`` (all without one).

    How many roundings' worth of error the worst block adds on its own: what the ``r_local``
    rule (``LocalErrorFloor``) thresholds, so the table shows how far each run is from it.
    """
    peaks = [
        v / c["stability/eps_mach"]
        for c in checks
        if "stability/eps_mach" in c and (event is None or c["step"] < event)
        for t, v in c.items()
        if t.startswith("stability/block") and t.endswith("/r_local") and math.isfinite(v)
    ]
    return max(peaks) if peaks else None


def score_run(run: Run, scenario: str, control: bool, seed: int) -> RunScore:
    """Event step, every candidate rule's firings and the loss-based detectors for one run."""
    kind = SCENARIOS[scenario][0]
    event = (
        loss_divergence(run) if kind == "loss" else overflow_step(run) if kind == "fp16 overflow" else None
    )
    score = RunScore(scenario, control, seed, event)
    checks = sampled_steps(run)
    score.fallback = any(v.get("fallback") for v in checks)
    for name, factory in CANDIDATES.items():
        rule = factory()
        fired: list[tuple[int, int | None]] = []
        seen = False
        for values in checks:
            result: AlarmResult = rule.update(values)
            seen = seen or result.available
            if result.fired:
                fired.append((int(values["step"]), result.block))
        score.alarms[name] = fired
        score.available[name] = seen
    score.r_local_peak = r_local_peak(checks, event)
    score.r_local_peak_all = r_local_peak(checks, None)
    logged = [int(v["step"]) for v in checks if v.get("stability/alarm") == 1.0]
    if any("stability/alarm" in v for v in checks) and not score.fallback:
        score.online_matches = logged == [step for step, _ in score.alarms["default"]]
    loss, grad = run.get("train/loss"), run.get("train/grad_norm")
    if loss is not None:
        score.final_loss = float(np.mean(loss.values[-LOSS_WINDOW:]))
        score.detectors["Lightning spike (loss)"] = first_step(lightning_spike_steps(loss.steps, loss.values))
        score.detectors["OLMo 6σ (loss)"] = first_step(olmo_spike_steps(loss.steps, loss.values))
    if grad is not None:
        score.detectors["OLMo 6σ (grad norm)"] = first_step(olmo_spike_steps(grad.steps, grad.values))
    return score


# ----------------------------------------------------------------------------- table and figures


def _first(score: RunScore, rule: str) -> str:
    if not score.available.get(rule, False):
        return "n/a"
    fired = score.alarms.get(rule, [])
    if not fired:
        return "—"
    step, index = fired[0]
    block = "-" if index is None else str(index)
    lead = f", lead {score.event - step}" if score.event is not None else ""
    return f"{step} (b{block}{lead})"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2g}"


def _det(step: int | None, event: int | None) -> str:
    if step is None:
        return "—"
    return f"{step}" + (f" (lead {event - step})" if event is not None else "")


def markdown_table(pairs: list[tuple[RunScore, RunScore]]) -> str:
    """One row per (scenario, seed): the failing run's first alarms and the control's alarm counts."""
    rules = list(CANDIDATES)
    dets = ["Lightning spike (loss)", "OLMo 6σ (loss)", "OLMo 6σ (grad norm)"]
    head = [
        "scenario",
        "seed",
        "event (rule)",
        "loss fail/ctrl",
        "max r_local/ε: fail before event (all) / ctrl",
    ]
    head += [f"{r}: first (block, lead) / ctrl checks" for r in rules]
    head += [f"{d}: first / ctrl" for d in dets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fail, ctrl in pairs:
        kind = SCENARIOS[fail.scenario][0]
        row = [
            fail.scenario + ("\\*" if fail.fallback else ""),
            str(fail.seed),
            f"{fail.event if fail.event is not None else '—'} ({kind})",
        ]
        row.append(f"{fail.final_loss:.2f}/{ctrl.final_loss:.2f}")
        row.append(f"{_num(fail.r_local_peak)} ({_num(fail.r_local_peak_all)}) / {_num(ctrl.r_local_peak)}")
        for r in rules:
            n_ctrl = len(ctrl.alarms.get(r, [])) if ctrl.available.get(r, False) else "n/a"
            row.append(f"{_first(fail, r)} / {n_ctrl}")
        for d in dets:
            row.append(f"{_det(fail.detectors.get(d), fail.event)} / {_det(ctrl.detectors.get(d), None)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rule_summary(pairs: list[tuple[RunScore, RunScore]]) -> str:
    """One row per rule, one cell per scenario: first firing step per seed, its lead, the blocks
    named, and the firing checks on each seed's control; then the monitor's online alarm check."""
    scenarios = list(dict.fromkeys(f.scenario for f, _ in pairs))
    lines = ["| rule | " + " | ".join(scenarios) + " |", "|" + "---|" * (len(scenarios) + 1)]
    for rule in [*CANDIDATES, "Lightning spike (loss)", "OLMo 6σ (loss)", "OLMo 6σ (grad norm)"]:
        cells = []
        for scenario in scenarios:
            runs = [(f, c) for f, c in pairs if f.scenario == scenario]
            cells.append(_summary_cell(rule, runs))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    online = [f.online_matches for pair in pairs for f in pair if f.online_matches is not None]
    lines.append("")
    lines.append(
        f"Monitor's logged `stability/alarm` == offline replay of the default: "
        f"{sum(online)} of {len(online)} runs"
    )
    return "\n".join(lines)


def _summary_cell(rule: str, runs: list[tuple[RunScore, RunScore]]) -> str:
    if rule in CANDIDATES:
        if not any(f.available.get(rule, False) for f, _ in runs):
            return "n/a"
        firsts = [f.alarms.get(rule, [])[:1] for f, _ in runs]
        ctrl = ", ".join(str(len(c.alarms.get(rule, []))) for _, c in runs)
        blocks = [str(b) for b in sorted({b for x in firsts for _, b in x if b is not None})]
        steps = [x[0][0] if x else None for x in firsts]
    else:
        steps = [f.detectors.get(rule) for f, _ in runs]
        fired = [c.detectors.get(rule) for _, c in runs]
        ctrl = ", ".join("0" if x is None else f"at {x}" for x in fired)
        blocks = []
    if all(x is None for x in steps):
        return f"silent; ctrl {ctrl}"
    shown = ", ".join("—" if x is None else str(x) for x in steps)
    leads = [
        f.event - x for (f, _), x in zip(runs, steps, strict=True) if x is not None and f.event is not None
    ]
    text = f"{shown}"
    if leads:
        text += "; lead " + ", ".join(str(v) for v in leads)
    if blocks:
        text += "; block " + "/".join(blocks)
    return text + f"; ctrl {ctrl}"


def plot_scenario(scenario: str, runs: list[tuple[Run, Run, RunScore]], path: Path) -> None:
    """Loss, max attention logit, FP16 headroom, κ_softmax, entropy, ρ_LN: scenario vs control, all seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train/loss", "loss", False),
        ("attn_logit_max", "max attention logit", True),
        ("fp16_headroom", "FP16 headroom (bits)", False),
        ("rho_ln", "min ρ_LN", True),
        ("kappa_softmax_max", "κ_softmax max", True),
        ("attention_entropy", "min attention entropy (nats)", False),
        ("r_local", "max r_local (a block's own error)", True),
        ("r_block", "r_block (last block)", True),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, (key, title, logy) in zip(axes.flat, panels, strict=True):
        for k, (fail, ctrl, score) in enumerate(runs):
            for run, color, label in ((fail, "C3", "scenario"), (ctrl, "C0", "control")):
                xs, ys = _panel_series(run, key)
                if xs.size:
                    ax.plot(xs, ys, color=color, alpha=0.8, lw=1, label=label if k == 0 else None)
            if score.event is not None:
                ax.axvline(score.event, color="k", ls="--", lw=0.8)
            fired = score.alarms.get("default", [])
            if fired:
                ax.axvline(fired[0][0], color="C2", ls=":", lw=1.2)
        ax.set_title(title, fontsize=9)
        if logy:
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{SCENARIOS[scenario][2]}   (dashed: event, dotted: first default alarm)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _panel_series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    if key == "train/loss":
        s = run.get(key)
        return (s.steps, s.values) if s is not None else (np.array([]), np.array([]))
    checks = sampled_steps(run)
    xs, ys = [], []
    for v in checks:
        tag = f"stability/{key}"
        blocks = [x for t, x in v.items() if t.startswith("stability/block") and t.endswith("/" + key)]
        val = v.get(
            tag, (min(blocks) if key in ("attention_entropy", "rho_ln") else max(blocks)) if blocks else None
        )
        if val is not None:
            xs.append(v["step"])
            ys.append(val)
    return np.array(xs), np.array(ys)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    """Run (unless ``--no-train``), score, write ``table.md``, ``scores.json`` and one figure per scenario."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/scenarios_eval"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps, seed 0 only (CI)")
    p.add_argument("--no-train", action="store_true", help="score the logs already under --out")
    p.add_argument("--figures", type=Path, default=None, help="where the PNGs go (default: --out)")
    a = p.parse_args(argv)
    seeds = [0] if a.quick else a.seeds
    pairs: list[tuple[RunScore, RunScore]] = []
    for scenario in a.scenarios:
        per_seed = []
        for seed in seeds:
            loaded = []
            for control in (False, True):
                name = f"{scenario}_control" if control else scenario
                path = a.out / name / f"seed{seed}"
                if not a.no_train and not path.is_dir():
                    path = run_one(scenario, control, seed, a.out, a.quick)
                loaded.append(load_run(path, name=f"{name}/seed{seed}"))
            fail = score_run(loaded[0], scenario, False, seed)
            ctrl = score_run(loaded[1], scenario, True, seed)
            pairs.append((fail, ctrl))
            per_seed.append((loaded[0], loaded[1], fail))
        fig_dir = a.figures or a.out
        fig_dir.mkdir(parents=True, exist_ok=True)
        plot_scenario(scenario, per_seed, fig_dir / f"scenario_{scenario}.png")
    table = markdown_table(pairs)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = rule_summary(pairs)
    (a.out / "table.md").write_text(table + "\n\n" + summary + "\n")
    (a.out / "scores.json").write_text(json.dumps([[asdict(f), asdict(c)] for f, c in pairs], indent=1))
    print(table + "\n\n" + summary)
    return table


if __name__ == "__main__":
    main()

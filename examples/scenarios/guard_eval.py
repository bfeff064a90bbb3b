"""Does the guard keep runs alive? The diverging scenarios with ``StabilityGuard``, scored as in evaluate.py.

::

    nice -n 10 python examples/scenarios/guard_eval.py --baseline runs/scenarios_eval --out runs/guard_eval
    python examples/scenarios/guard_eval.py --out runs/guard_eval --no-train          # re-score the logs
    python examples/scenarios/guard_eval.py --variant n1 --every-n-steps 1 ...         # another protocol
    python examples/scenarios/guard_eval.py --quick --out /tmp/guard_quick             # CI smoke test

For every scenario (default: the two that diverge, ``logit_growth`` and ``fp16_overflow``) and
seed, three or four runs are compared, all through the scenario's LightningCLI config
(``configs/<scenario>.yaml``, ``configs/<scenario>_control.yaml``) with the seed set as
``evaluate.py`` sets it:

* the scenario **without** the guard and its control: read from ``--baseline`` (the
  ``evaluate.py`` layout ``<baseline>/<name>/seed<k>``), trained there if missing;
* the scenario **with** the guard and the control with the guard: the config's callbacks are
  replaced by ``StabilityMonitor(<the config's own arguments>, log_per_head=True)`` followed by
  ``StabilityGuard(tau=...)`` (the guard's own matching, defaults otherwise); ``--every-n-steps``
  overrides the monitor's sampling. The generated config is saved next to the run.

The divergence rule is ``evaluate.py``'s (``loss_divergence`` for (a), ``overflow_step`` for
(b): the same functions). Each guarded run also records the guard's actions
(``guard_actions.json``) and the wall time of the monitor's and the guard's
``on_train_batch_end`` at every sampled step next to the mean training step, so the guard's
own overhead is measured on the same runs (``timing.json``). The scenarios train in FP32, where
the guard's FP32 override has nothing to change; for a monitor measuring FP16, :class:`FP16WhatIf`
logs what it would change in an FP16 run (the FP16 forward as is and with the guard's FP32 blocks).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback
from torch import Tensor, nn
from typing_extensions import override

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate import LOSS_WINDOW, QUICK_ARGS, SCENARIOS, loss_divergence, overflow_step, run_one  # noqa: E402

from lightning_stability.analysis.logs import Run, load_run  # noqa: E402
from lightning_stability.mitigations import FP32Override, attention_module  # noqa: E402
from lightning_stability.rules.thresholds import QK_CLIP_TAU  # noqa: E402

DIVERGING = ["logit_growth", "fp16_overflow"]


# ----------------------------------------------------------------------------- configs and runs


def guarded_config(
    scenario: str, control: bool, every_n_steps: int | None, guard_args: dict[str, Any]
) -> dict:
    """The scenario's config with ``[StabilityMonitor(..., log_per_head=True), StabilityGuard(...)]``."""
    name = f"{scenario}_control" if control else scenario
    config = yaml.safe_load((HERE / "configs" / f"{name}.yaml").read_text())
    monitor = next(
        cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("StabilityMonitor")
    )
    monitor_args = dict(monitor.get("init_args", {}), log_per_head=True)
    if every_n_steps is not None:
        monitor_args["every_n_steps"] = every_n_steps
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_stability.StabilityMonitor", "init_args": monitor_args},
        {"class_path": "lightning_stability.StabilityGuard", "init_args": dict(guard_args)},
    ]
    return config


class FP16WhatIf(Callback):
    """At each monitor step: the model's forward under FP16 autocast, as is and with the guard's FP32 blocks.

    The scenarios train in FP32, where the guard's FP32 override has nothing to change; this
    measures what it would change in an FP16 run: the forward of the batch's first
    ``sample_size`` examples under ``torch.autocast("cpu", torch.float16)``, once plainly and
    once with every block the guard decided to move to FP32 so far (applied or not) run through
    :class:`~lightning_stability.mitigations.FP32Override`. Logged per sampled step:
    ``guard_eval/fp16_{plain,guarded}_amax`` (largest |output| of a module computing in FP16,
    ``inf`` once one overflows) and ``guard_eval/fp16_{plain,guarded}_nonfinite`` (1 when an FP16
    output or the logits are not finite). Eval mode, no grad, no randomness: training is untouched.
    """

    def __init__(self, monitor: Any, guard: Any, sample_size: int = 8) -> None:
        self.monitor, self.guard, self.sample_size = monitor, guard, sample_size

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        report = self.monitor.last_report
        step = trainer.global_step - 1  # Lightning's step of this batch: the monitor's report.step
        if report is None or report.step != step or trainer.logger is None:
            return
        x = batch[0][: self.sample_size]
        names = sorted({a.block_name for a in self.guard.actions if a.action == "fp32"})
        targets = [self._target(pl_module, n) for n in names]
        metrics: dict[str, float] = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            for label, mods in (("plain", []), ("guarded", [t for t in targets if t is not None])):
                amax, finite = _fp16_forward(pl_module, x, mods)
                metrics[f"guard_eval/fp16_{label}_amax"] = amax
                metrics[f"guard_eval/fp16_{label}_nonfinite"] = 0.0 if finite else 1.0
            metrics["guard_eval/fp16_guarded_blocks"] = float(len(targets))
        finally:
            pl_module.train(was_training)
        trainer.logger.log_metrics(metrics, step=step)

    def _target(self, model: nn.Module, name: str) -> nn.Module | None:
        block = model.get_submodule(name)
        if self.guard.fp32_scope == "block":
            return block
        found = attention_module(block)
        return None if found is None else found[1]


@torch.no_grad()
def _fp16_forward(model: nn.Module, x: Tensor, fp32_modules: list[nn.Module]) -> tuple[float, bool]:
    """Largest |output| among FP16 module outputs and whether everything stayed finite."""
    amax, finite = 0.0, True

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        nonlocal amax, finite
        if isinstance(out, Tensor) and out.dtype == torch.float16:
            a = float(out.abs().amax())
            amax = max(amax, a)
            finite = finite and math.isfinite(a)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    overrides = [FP32Override(m) for m in fp32_modules]
    try:
        for o in overrides:
            o.apply()
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        finite = finite and bool(torch.isfinite(logits).all())
    finally:
        for o in overrides:
            o.restore()
        for h in handles:
            h.remove()
    return amax, finite


class _HookTimer:
    """Wall time of every call of ``callback.on_train_batch_end`` (an instance attribute, removed after)."""

    def __init__(self, callback: Any, sampled: Any) -> None:
        self.callback = callback
        self.sampled = sampled  # step -> whether the monitor reported at it (evaluated after the call)
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self.at_report: list[bool] = []

    def __enter__(self) -> _HookTimer:
        original = self.callback.on_train_batch_end

        def timed(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = original(trainer, *args, **kwargs)
            self.seconds.append(time.perf_counter() - t0)
            self.steps.append(int(trainer.global_step) - 1)  # the monitor's report.step convention
            self.at_report.append(bool(self.sampled(int(trainer.global_step) - 1)))
            return out

        self.callback.on_train_batch_end = timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.callback.__dict__["on_train_batch_end"]


def run_guarded(
    scenario: str,
    control: bool,
    seed: int,
    out: Path,
    variant: str,
    every_n_steps: int | None,
    guard_args: dict[str, Any],
    quick: bool,
) -> Path:
    """Train one guarded run through LightningCLI; writes ``guard_actions.json`` and ``timing.json``."""
    from gpt import MarkovDataModule, ScenarioGPT
    from lightning.pytorch.cli import LightningCLI

    from lightning_stability import StabilityGuard, StabilityMonitor

    torch.set_num_threads(1)
    name = f"{scenario}_control" if control else scenario
    run_name = f"{name}_guard_{variant}"
    cfg_dir = out / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = cfg_dir / f"{run_name}.yaml"
    cfg_path.write_text(yaml.safe_dump(guarded_config(scenario, control, every_n_steps, guard_args)))
    args = [
        f"--config={cfg_path}",
        f"--seed_everything={seed}",
        f"--model.seed={seed}",
        f"--data.seed={seed}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={run_name}",
        f"--trainer.logger.init_args.version=seed{seed}",
    ]
    if quick:
        args += QUICK_ARGS
    cli = LightningCLI(
        ScenarioGPT, MarkovDataModule, run=False, args=args, save_config_kwargs={"overwrite": True}
    )
    trainer = cli.trainer
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, StabilityMonitor))  # type: ignore[attr-defined]
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, StabilityGuard))  # type: ignore[attr-defined]
    if monitor.precision == "fp16":
        trainer.callbacks.append(FP16WhatIf(monitor, guard, int(monitor.sample_size)))  # type: ignore[attr-defined]

    def reported(step: int) -> bool:
        return monitor.last_report is not None and monitor.last_report.step == step

    t0 = time.perf_counter()
    with _HookTimer(monitor, reported) as t_mon, _HookTimer(guard, reported) as t_guard:
        trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - t0
    path = out / run_name / f"seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "guard_actions.json").write_text(json.dumps([asdict(a) for a in guard.actions], indent=1))
    timing = {
        "fit_seconds": wall,
        "steps": int(trainer.global_step),
        "monitor_hook_s": _at(t_mon, True),
        "guard_hook_s": _at(t_guard, True),
        "guard_hook_other_s": _at(t_guard, False),
        "sampled_steps": sum(t_guard.at_report),
    }
    (path / "timing.json").write_text(json.dumps(timing, indent=1))
    return path


def _at(timer: _HookTimer, at_report: bool) -> list[float]:
    return [s for s, r in zip(timer.seconds, timer.at_report, strict=True) if r == at_report]


# ----------------------------------------------------------------------------- scoring


@dataclass
class GuardScore:
    """One (scenario, seed) row: without the guard, with it, and the control with it."""

    scenario: str
    seed: int
    variant: str
    event_without: int | None
    event_with: int | None
    final_without: float
    final_with: float
    final_control: float
    final_control_guarded: float
    control_identical: bool
    actions: list[dict[str, Any]] = field(default_factory=list)
    control_actions: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    fp16: dict[str, Any] = field(default_factory=dict)  # FP16WhatIf of the guarded run (FP16 scenarios)


def event(run: Run, scenario: str) -> int | None:
    """``evaluate.py``'s divergence rule for the scenario (the same functions)."""
    kind = SCENARIOS[scenario][0]
    return loss_divergence(run) if kind == "loss" else overflow_step(run) if kind == "fp16 overflow" else None


def final_loss(run: Run) -> float:
    """Mean of the last 10 training losses (``evaluate.py``'s "final loss")."""
    s = run.get("train/loss")
    return float(sum(s.values[-LOSS_WINDOW:]) / len(s.values[-LOSS_WINDOW:])) if s is not None else math.nan


def _losses(run: Run) -> list[float]:
    s = run.get("train/loss")
    return [] if s is None else s.values.tolist()


def score(scenario: str, seed: int, variant: str, baseline: Path, out: Path) -> GuardScore:
    """Read the four runs of one (scenario, seed) and score them."""
    fail = load_run(baseline / scenario / f"seed{seed}")
    ctrl = load_run(baseline / f"{scenario}_control" / f"seed{seed}")
    g_dir = out / f"{scenario}_guard_{variant}" / f"seed{seed}"
    c_dir = out / f"{scenario}_control_guard_{variant}" / f"seed{seed}"
    guarded, ctrl_guarded = load_run(g_dir), load_run(c_dir)
    return GuardScore(
        scenario=scenario,
        seed=seed,
        variant=variant,
        event_without=event(fail, scenario),
        event_with=event(guarded, scenario),
        final_without=final_loss(fail),
        final_with=final_loss(guarded),
        final_control=final_loss(ctrl),
        final_control_guarded=final_loss(ctrl_guarded),
        control_identical=_losses(ctrl) == _losses(ctrl_guarded),
        actions=json.loads((g_dir / "guard_actions.json").read_text()),
        control_actions=json.loads((c_dir / "guard_actions.json").read_text()),
        timing=json.loads((g_dir / "timing.json").read_text()),
        fp16={**fp16_whatif(guarded), **{f"control_{k}": v for k, v in fp16_whatif(ctrl_guarded).items()}},
    )


def fp16_whatif(run: Run) -> dict[str, Any]:
    """First sampled step whose FP16 forward was non-finite, plain and with the guard's FP32 blocks."""
    out: dict[str, Any] = {}
    for label in ("plain", "guarded"):
        s = run.get(f"guard_eval/fp16_{label}_nonfinite")
        a = run.get(f"guard_eval/fp16_{label}_amax")
        if s is None or a is None:
            continue
        bad = [int(t) for t, v in zip(s.steps, s.values, strict=True) if v > 0]
        out[f"{label}_first_nonfinite"] = bad[0] if bad else None
        out[f"{label}_nonfinite_checks"] = len(bad)
        out[f"{label}_checks"] = len(s.values)
        finite = [float(v) for v in a.values if math.isfinite(v)]
        out[f"{label}_max_finite_amax"] = max(finite) if finite else math.nan
    return out


def _one(a: dict[str, Any], tau: float) -> str:
    """``step b{block} action (cause; heads, η)``, and why it was not applied."""
    applied = "" if a["applied"] else " **not applied**: " + a["detail"]
    heads = ""
    if a["action"] == "qk_clip":
        over = [i for i, s in enumerate(a["heads"]) if s > tau] if len(a["heads"]) > 1 else "all"
        heads = f"; heads {over}, η {a['value']:.3g}"
    return f"{a['step']} b{a['block']} {a['action']} ({a['cause']}{heads}){applied}"


def _actions(actions: list[dict[str, Any]], tau: float) -> str:
    """The first action in full, then how many of each kind, in which blocks, until which step."""
    if not actions:
        return "none"
    text = "first: " + _one(actions[0], tau)
    if len(actions) > 1:
        kinds: dict[str, dict[int, int]] = {}
        for a in actions:
            per_block = kinds.setdefault(a["action"], {})
            per_block[a["block"]] = per_block.get(a["block"], 0) + 1
        counts = "; ".join(
            f"{sum(b.values())} × {kind} (" + ", ".join(f"b{i} ×{n}" for i, n in sorted(b.items())) + ")"
            for kind, b in kinds.items()
        )
        logits = [max(a["heads"]) for a in actions if a["action"] == "qk_clip" and a["heads"]]
        peak = f", max logit at a clip {max(logits):.4g}" if logits else ""
        text += f"; in all {counts}, steps {actions[0]['step']}–{actions[-1]['step']}{peak}"
    return text


def markdown_table(scores: list[GuardScore], margin: float, tau: float) -> str:
    """The README table: one row per (scenario, seed)."""
    head = [
        "scenario",
        "seed",
        "diverged without guard (step)",
        "with guard: diverged? (step)",
        "guard actions (step, block, action (cause, heads))",
        "final loss: without / with guard / stable control",
        f"with guard − control (margin {margin:g})",
        "control with guard: actions, loss identical",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scores:
        gap = s.final_with - s.final_control
        ok = "within" if abs(gap) <= margin else "**outside**"
        lines.append(
            "| "
            + " | ".join(
                [
                    s.scenario,
                    str(s.seed),
                    "—" if s.event_without is None else str(s.event_without),
                    "no" if s.event_with is None else f"**yes ({s.event_with})**",
                    _actions(s.actions, tau),
                    f"{s.final_without:.3f} / {s.final_with:.3f} / {s.final_control:.3f}",
                    f"{gap:+.3f} ({ok})",
                    f"{len(s.control_actions)}, {'yes' if s.control_identical else 'no'}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def fp16_table(scores: list[GuardScore]) -> str:
    """FP16 scenarios: the FP16 what-if forward of the guarded run, plain vs with the guard's FP32 blocks."""
    rows = [s for s in scores if s.fp16]
    if not rows:
        return ""

    def first(f: dict[str, Any], label: str) -> str:
        n = f.get(f"{label}_nonfinite_checks", 0)
        step = f.get(f"{label}_first_nonfinite")
        return "finite" if step is None else f"non-finite from {step} ({n}/{f[f'{label}_checks']} checks)"

    head = [
        "scenario",
        "seed",
        "FP16 forward, as is",
        "FP16 forward with the guard's FP32 blocks",
        "max finite FP16 |output| as is / guarded",
        "control: as is / guarded",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        f = s.fp16
        ctrl = {k.removeprefix("control_"): v for k, v in f.items() if k.startswith("control_")}
        lines.append(
            f"| {s.scenario} | {s.seed} | {first(f, 'plain')} | {first(f, 'guarded')} | "
            f"{f.get('plain_max_finite_amax', math.nan):.4g} / "
            f"{f.get('guarded_max_finite_amax', math.nan):.4g} | "
            f"{first(ctrl, 'plain')} / {first(ctrl, 'guarded')} |"
        )
    return "\n".join(lines)


def overhead_table(scores: list[GuardScore]) -> str:
    """Median wall time of the guard's hook vs the monitor's at sampled steps vs a training step."""
    guard = [x for s in scores for x in s.timing.get("guard_hook_s", [])]
    mon = [x for s in scores for x in s.timing.get("monitor_hook_s", [])]
    other = [x for s in scores for x in s.timing.get("guard_hook_other_s", [])]
    step = [s.timing["fit_seconds"] / max(s.timing["steps"], 1) for s in scores if s.timing]
    if not guard or not mon or not step:
        return ""
    med = statistics.median
    rows = [
        ("mean training step (fit wall time / steps, monitor and guard included)", med(step)),
        ("monitor's `on_train_batch_end` at a sampled step", med(mon)),
        ("guard's `on_train_batch_end` at a sampled step (decide + act)", med(guard)),
        ("guard's `on_train_batch_end` at another step", med(other) if other else math.nan),
    ]
    lines = ["| what (median over the guarded runs) | time | × training step |", "|---|---|---|"]
    lines += [f"| {what} | {t * 1e3:.3g} ms | {t / med(step):.2g} |" for what, t in rows if math.isfinite(t)]
    timed = [s.timing for s in scores if s.timing]
    for what, keys in (("monitor", ["monitor_hook_s"]), ("guard", ["guard_hook_s", "guard_hook_other_s"])):
        share = med(sum(sum(t[k]) for k in keys) / t["fit_seconds"] for t in timed)
        lines.append(f"| the {what}'s hooks, share of the fit's wall time | — | {share:.2g} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _job(kind: str, scenario: str, control: bool, seed: int, a: argparse.Namespace, guard_args: dict) -> str:
    if kind == "baseline":
        return str(run_one(scenario, control, seed, a.baseline, a.quick))
    return str(run_guarded(scenario, control, seed, a.out, a.variant, a.every_n_steps, guard_args, a.quick))


def main(argv: list[str] | None = None) -> str:
    """Train what is missing (``--jobs`` at a time), score, write ``guard_table_<variant>.md`` and json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/guard_eval"))
    p.add_argument(
        "--baseline", type=Path, default=None, help="evaluate.py's --out (default: <out>/baseline)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenarios", nargs="+", default=DIVERGING, choices=list(SCENARIOS))
    p.add_argument(
        "--variant", default="default", help="name of this guard/monitor setting (run directories)"
    )
    p.add_argument("--every-n-steps", type=int, default=None, help="monitor sampling (default: the config's)")
    p.add_argument("--tau", type=float, default=QK_CLIP_TAU)
    p.add_argument("--margin", type=float, default=0.1, help="final-loss margin to the control (nats)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps, seed 0 only (CI)")
    p.add_argument("--no-train", action="store_true", help="score the logs already there")
    a = p.parse_args(argv)
    a.baseline = a.baseline or a.out / "baseline"
    seeds = [0] if a.quick else a.seeds
    guard_args = {"tau": a.tau}
    jobs = []
    for scenario in a.scenarios:
        for seed in seeds:
            for control in (False, True):
                name = f"{scenario}_control" if control else scenario
                if not (a.baseline / name / f"seed{seed}").is_dir():
                    jobs.append(("baseline", scenario, control, seed))
                if not (a.out / f"{name}_guard_{a.variant}" / f"seed{seed}" / "timing.json").is_file():
                    jobs.append(("guarded", scenario, control, seed))
    if jobs and not a.no_train:
        if a.jobs <= 1:
            for job in jobs:
                _job(*job, a, guard_args)
        else:
            import multiprocessing

            with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_job, *job, a, guard_args) for job in jobs]
                for future in futures:
                    print("done:", future.result(), flush=True)
    scores = [score(sc, seed, a.variant, a.baseline, a.out) for sc in a.scenarios for seed in seeds]
    tables = [markdown_table(scores, a.margin, a.tau), fp16_table(scores), overhead_table(scores)]
    text = "\n\n".join(t for t in tables if t)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"guard_table_{a.variant}.md").write_text(text + "\n")
    (a.out / f"guard_scores_{a.variant}.json").write_text(json.dumps([asdict(s) for s in scores], indent=1))
    print(text)
    return text


if __name__ == "__main__":
    main()

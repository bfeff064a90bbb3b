"""Score saved held-out runs: the default alarm (through one adapter), its threshold sweeps and the baselines.

Every rule sees only what it would see online: the alarm and the paper's rule the monitor's sampled
checks in step order, the loss-based detectors every step's loss and gradient norm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from heldout.events import Event, run_event
from lightning_stability.analysis.detectors import lightning_spike_steps, olmo_spike_steps
from lightning_stability.diagnostics.rolling import RollingZScore
from lightning_stability.rules import RULE_BY_NAME, Alarm, rule_book

#: Rule name → thresholds of the frozen default (the values recorded in docs/HELDOUT.md).
FROZEN = {"attn_logit_max": 100.0, "fp16_headroom_bits": 2.0, "rho_ln": 1.0}


#: The frozen thresholds' names (``FROZEN``) → the rule book's rule each one moves.
_RULE_OF = {"attn_logit_max": "attn_logit_max", "fp16_headroom_bits": "fp16_headroom", "rho_ln": "rho_ln"}


def alarm_steps(checks: Sequence[Mapping[str, float]], **thresholds: float) -> list[tuple[int, str]]:
    """THE ADAPTER: ``(step, reason)`` of every check at which the default alarm fires.

    The one place that calls the alarm's implementation: the rule book's default alarm
    (``lightning_stability.rules``: ``Alarm(rule_book("default").alarm_rules)``, the object
    ``StabilityMonitor(alarm=AlarmOptions(rule="default"))`` calls online), fed the logged
    ``stability/*`` tags of each check in step order. ``thresholds`` override its watch levels
    (``attn_logit_max``, ``fp16_headroom_bits``, ``rho_ln``) for the sweeps; without them it is
    the frozen rule. When the rule moves, only this function changes.
    """
    book = rule_book("default", {_RULE_OF[k]: v for k, v in thresholds.items()})
    alarm = Alarm(book.alarm_rules, RollingZScore, name="default")
    out = []
    for values in checks:
        r = alarm.update(values, int(values["step"]))
        if r.fired:
            where = f" in block {r.block}" if r.block is not None else ""
            val = f" (value {r.value:.4g})" if r.value is not None else ""
            out.append((int(values["step"]), f"{r.label}{where}{val}"))
    return out


def rule_steps(alarm: Alarm, checks: Sequence[Mapping[str, float]]) -> list[int]:
    """Steps at which an alarm of the rule book fires over the checks (in order)."""
    return [int(v["step"]) for v in checks if alarm.update(v, int(v["step"])).fired]


def paper_steps(checks: Sequence[Mapping[str, float]]) -> list[int]:
    """The paper's rule (SPEC §7): rolling z-score of ``kappa_softmax_max``, window 20, z > 1.5."""
    return rule_steps(Alarm([RULE_BY_NAME["kappa_softmax_z"]], RollingZScore), checks)


def precision_aware_steps(checks: Sequence[Mapping[str, float]], c: float) -> list[int]:
    """Fires when any block's ``attn_logit_max × eps_mach`` exceeds ``c`` (the logit's rounding scale).

    At BF16 (ε = 2⁻⁷) ``c = 0.78`` is the logit 100; at FP16 (ε = 2⁻¹⁰) the same ``c`` is the logit 800.
    """
    out = []
    for v in checks:
        eps = v.get("stability/eps_mach", math.nan)
        logits = [
            x for t, x in v.items() if t.endswith("/attn_logit_max") and "/block" in t and math.isfinite(x)
        ]
        if logits and math.isfinite(eps) and max(logits) * eps > c:
            out.append(int(v["step"]))
    return out


def level_steps(checks: Sequence[Mapping[str, float]], rule: str, threshold: float) -> list[int]:
    """One rule of the default alarm alone, at another watch level (e.g. the logit part at another τ)."""
    moved = dataclasses.replace(RULE_BY_NAME[rule], watch=float(threshold))
    return rule_steps(Alarm([moved], RollingZScore), checks)


def loss_detectors(steps: Mapping[str, Sequence[float]]) -> dict[str, list[int]]:
    """Lightning's ``SpikeDetection`` on the loss and OLMo-core's 6σ rule (loss or gradient norm)."""
    s = np.asarray(steps["step"], dtype=np.int64)
    loss = np.asarray(steps["train/loss"], dtype=np.float64)
    grad = np.asarray(steps["train/grad_norm"], dtype=np.float64)
    olmo = sorted(set(olmo_spike_steps(s, loss)) | set(olmo_spike_steps(s, grad)))
    return {"lightning_spike": lightning_spike_steps(s, loss), "olmo_6sigma": olmo}


def event_of(record: Mapping[str, Any], control: Mapping[str, Any] | None) -> Event | None:
    """The run's event (:func:`heldout.events.run_event`); the gap only against a matched control."""
    st = record["steps"]
    ctrl = control["steps"]["train/loss"] if control is not None else None
    return run_event(st["step"], st["train/loss"], st["train/whatif_loss"], ctrl)


#: name → function(record) -> firing steps, for every rule compared
def rules_table() -> dict[str, Callable[[Mapping[str, Any]], list[int]]]:
    """The rules compared on every run: the frozen default, each of its parts, and the baselines."""
    return {
        "default": lambda r: [s for s, _ in alarm_steps(r["checks"])],
        "paper z(kappa_softmax)>1.5": lambda r: paper_steps(r["checks"]),
        "Lightning SpikeDetection": lambda r: loss_detectors(r["steps"])["lightning_spike"],
        "OLMo 6 sigma (loss or grad)": lambda r: loss_detectors(r["steps"])["olmo_6sigma"],
    }

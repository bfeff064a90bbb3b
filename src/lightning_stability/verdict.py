"""The verdict at the end of fit: where the low-precision forward was fragile, and what to try.

:class:`FitVerdict` folds every sampled step's
:class:`~lightning_stability.stability_report.StabilityReport` into running extremes (which
block, which value, which step) and composes a short text from the measured values only.
Plain Python (no Lightning): :class:`~lightning_stability.StabilityMonitor` prints it, keeps it
as ``monitor.summary`` and writes it to TensorBoard.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning_stability.stability_report import StabilityReport

#: Megatron's QK-clip threshold on the attention logit (τ = 100).
QK_CLIP_TAU = 100.0
#: FP16 headroom (bits) below which the summary warns: activations within 16× of 65504.
HEADROOM_WARN_BITS = 4.0
#: ε_mach from which a pass is low precision (FP16's 2⁻¹⁰; BF16's 2⁻⁷ is larger): ρ_LN is judged there only.
LOW_PRECISION_EPS_MACH = 2.0**-10
#: A block "stands out" when its r_local is this many times the median of the other blocks'.
STANDS_OUT = 2.0


@dataclass
class Extreme:
    """The most extreme value of one signal seen so far, where and when."""

    value: float
    step: int
    where: str
    detail: str = ""


class FitVerdict:
    """Running extremes over the sampled steps of one fit, and their summary."""

    def __init__(self) -> None:
        self.steps = 0
        self.dtype = ""
        self.r_local: Extreme | None = None  # max r_local
        self.headroom: Extreme | None = None  # min fp16_headroom
        self.logit: Extreme | None = None  # max attn_logit_max
        self.rho_ln: Extreme | None = None  # min rho_ln
        self.alarms: list[int] = []
        self.nonfinite: list[Extreme] = []
        self.r_block_last: float | None = None

    def update(self, report: StabilityReport) -> None:
        """Fold one sampled step in (the alarm flag included, when the monitor set it)."""
        self.steps += 1
        self.dtype = report.dtype
        self.r_block_last = report.r_block
        step = report.step
        for block in report.blocks:
            if block.r_local is not None and _above(block.r_local, self.r_local):
                self.r_local = Extreme(block.r_local, step, block.name, _local_detail(report, block.name))
            if block.attn_logit_max is not None and _above(block.attn_logit_max, self.logit):
                self.logit = Extreme(block.attn_logit_max, step, block.name)
            # ρ_LN < 1 is the norm of an FP32 pass (ε_mach 2⁻²³): only a low-precision pass is judged
            low = report.eps_mach >= LOW_PRECISION_EPS_MACH
            if low and block.rho_ln is not None and _above(-block.rho_ln, _neg(self.rho_ln)):
                self.rho_ln = Extreme(block.rho_ln, step, block.name)
        if report.fp16_headroom is not None and _above(-report.fp16_headroom, _neg(self.headroom)):
            self.headroom = Extreme(report.fp16_headroom, step, report.amax_module or "?")
        if report.alarm:
            self.alarms.append(step)
        if report.nonfinite:
            self.nonfinite.append(Extreme(float(report.nonfinite), step, report.first_nonfinite or "?"))

    # ----------------------------------------------------------------- text
    def summary(self) -> str:
        """The verdict: findings, then what to try, composed from the measured values."""
        if not self.steps:
            return "StabilityMonitor: no step was measured in this fit."
        lines = [f"StabilityMonitor verdict ({self.steps} sampled steps, low precision {self.dtype}):"]
        lines += [f"- {text}" for text in self._findings()]
        advice = self._advice()
        lines.append("What to try:")
        lines += [f"- {text}" for text in advice] if advice else ["- nothing measured calls for a change."]
        return "\n".join(lines)

    def _findings(self) -> list[str]:
        out = []
        if self.r_local is not None:
            e = self.r_local
            out.append(
                f"most fragile block by r_local (its own error on exact inputs): {e.where}, "
                f"r_local = {e.value:.3g} at step {e.step}{e.detail}"
            )
        if self.headroom is not None:
            e = self.headroom
            out.append(
                f"FP16 headroom: {e.value:.2f} bits (max |output| = {65504 / 2**e.value:.4g} in {e.where}, "
                f"step {e.step})"
            )
        if self.logit is not None:
            e = self.logit
            out.append(f"largest attention logit: {e.value:.4g} in {e.where} at step {e.step}")
        if self.rho_ln is not None and self.rho_ln.value < 1:
            e = self.rho_ln
            out.append(f"ε-dominated normalization: rho_ln = {e.value:.3g} in {e.where} at step {e.step}")
        if self.alarms:
            out.append(f"early warning (stability/alarm) fired at steps {_steps(self.alarms)}")
        else:
            out.append("early warning (stability/alarm): never fired")
        for e in self.nonfinite[:3]:
            out.append(f"non-finite low-precision outputs at step {e.step} (first in {e.where})")
        if self.r_block_last is not None:
            out.append(f"last r_block (propagated error at the last block): {self.r_block_last:.3g}")
        return out

    def _advice(self) -> list[str]:
        out = []
        e = self.r_local
        if e is not None and e.detail and "stands out" in e.detail:
            part = "FFN" if "(FFN)" in e.detail else "attention"
            out.append(
                f"keep {e.where}'s {part} in FP32 (an autocast-disabled region): it adds the most error."
            )
        if self.logit is not None and self.logit.value > QK_CLIP_TAU:
            out.append(
                f"qk-norm or QK-clip (τ = {QK_CLIP_TAU:g}): attention logits reached {self.logit.value:.4g} "
                f"in {self.logit.where}."
            )
        if self.rho_ln is not None and self.rho_ln.value < 1:
            rho = self.rho_ln
            out.append(f"LNEpsilonBump for ε-dominated norms (rho_ln = {rho.value:.3g} < 1 in {rho.where}).")
        if self.headroom is not None and self.headroom.value < HEADROOM_WARN_BITS:
            room = self.headroom
            out.append(
                f"stay in BF16 or scale {room.where}'s output down: {room.value:.2f} bits "
                "before FP16 overflows."
            )
        if self.alarms or self.nonfinite:
            out.append("a lower learning rate (or warm-up): the forward became fragile during training.")
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain values, for the monitor's checkpoint state (a resumed fit keeps its verdict)."""
        ext = ("r_local", "headroom", "logit", "rho_ln")
        state: dict[str, Any] = {
            k: (None if getattr(self, k) is None else asdict(getattr(self, k))) for k in ext
        }
        state.update(
            steps=self.steps,
            dtype=self.dtype,
            alarms=list(self.alarms),
            nonfinite=[asdict(e) for e in self.nonfinite],
            r_block_last=self.r_block_last,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("r_local", "headroom", "logit", "rho_ln"):
            setattr(self, key, None if state.get(key) is None else Extreme(**state[key]))
        self.steps = int(state.get("steps", 0))
        self.dtype = str(state.get("dtype", ""))
        self.alarms = [int(s) for s in state.get("alarms", [])]
        self.nonfinite = [Extreme(**e) for e in state.get("nonfinite", [])]
        self.r_block_last = state.get("r_block_last")


def _above(value: float, current: Extreme | None) -> bool:
    return not math.isnan(value) and (current is None or value > current.value)


def _neg(e: Extreme | None) -> Extreme | None:
    return None if e is None else Extreme(-e.value, e.step, e.where)


def _steps(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:8])
    return shown + (f" … ({len(steps)} in all)" if len(steps) > 8 else "")


def _local_detail(report: StabilityReport, name: str) -> str:
    """How much the block stands out, and whether attention or FFN carries its error."""
    blocks = {b.name: b for b in report.blocks}
    block = blocks[name]
    others = sorted(b.r_local for b in report.blocks if b.name != name and b.r_local is not None)
    text = ""
    if others and block.r_local is not None:
        median = others[len(others) // 2]
        if median > 0:
            ratio = block.r_local / median
            text = f", {ratio:.1f}× the other blocks' median"
            if ratio >= STANDS_OUT:
                text += " (stands out)"
    att, ffn = block.r_attention_local, block.r_ffn_local
    if att is not None and ffn is not None:
        text += f"; attention {att:.3g} vs FFN {ffn:.3g}" + (" (FFN)" if ffn > att else "")
    elif att is not None:
        text += f"; attention sub-layer {att:.3g}"
    return text

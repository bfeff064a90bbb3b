"""The grouped options of a measurement: what the probe measures, and which early warning runs.

Shared by :func:`~lightning_stability.measure`, :class:`~lightning_stability.StabilityMeter` and
:class:`~lightning_stability.StabilityMonitor`. Both are frozen dataclasses, so ``LightningCLI``
fills them from YAML (``probe: {residual_gain_iters: 3}``) or the command line
(``--trainer.callbacks.alarm.rule=paper``) and checks each field's type at parse time; every
entry point validates every value again (:func:`check_probe`, :func:`check_alarm`), naming
``probe.<field>`` or ``alarm.<field>`` and the value in a ``MisconfigurationException``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_stability.diagnostics.fp8_recipe import RECIPES, RecipeName
from lightning_stability.meter._cli_types import AtLeastTwoInt, NonNegativeFloat, NonNegativeInt
from lightning_stability.meter.checks import check_choice, check_int, check_number
from lightning_stability.rules.table import ALARM_NAMES, AlarmName
from lightning_stability.rules.thresholds import (
    FP16_HEADROOM_WATCH_BITS,
    FP16_MAX_BITS,
    PAPER_WINDOW,
    PAPER_Z,
    QK_CLIP_TAU,
    RHO_LN_WATCH,
)

__all__ = ["AlarmOptions", "ProbeOptions", "check_alarm", "check_probe"]


@dataclass(frozen=True)
class ProbeOptions:
    """What the probe measures at a sampled step, and with which constants.

    (The Args below are plain text: ``LightningCLI --help`` prints them as written.)

    Args:
        head_reduction: combine the heads' kappa_softmax by max or sum (the paper's conservative
            form, SPEC §1); kappa_score and kappa_v are always the max over heads.
        batch_reduction: combine the sampled examples by max or mean.
        residual_gain_iters: power-iteration steps for each block's residual gain rho_l;
            0 turns it off, and with it the unified bound (each iteration costs about
            3 extra block forwards per block).
        local_errors: measure r_local / r_attention_local / r_ffn_local (each block and
            sub-layer run once more in the low precision on its exact FP32 input).
        balanced_mass: also log theta, the balanced-mass factor of the attention rows
            (exact subset-mass search: costly, docs/guide/functions.md; off by default).
        reuse_weight_spectra: keep a copy of every conditioned weight (W_O, FFN, Q/K) and reuse
            its singular values while the weight is bitwise equal to the copy (frozen layers,
            fine-tuning a few blocks); the logged numbers are the same. Costs one copy of those
            weights in memory; saves nothing for weights the optimizer moves.
        weight_spectra: certified: sigma_max and sigma_min of the conditioned weights (wo_norm,
            kappa_wo, kappa_eff) each within a computed error bound of 1e-5 relative of the
            float64 value (kappa within 2e-5), iterative for large square weights (docs/SCALE.md);
            exact: float64 eigen/singular values, several times the cost for large square
            weights. kappa_wkwq is exact either way.
        eps_mach: numeric machine epsilon override (SPEC §2) for rho_ln, c_ln, predictor_scaled
            and the bound; None uses that of the measured low precision.
        ln_c1: constant C1 of C_LN (Proposition 1).
        ln_c2: constant C2 of C_LN.
        ln_c3: constant C3 of C_LN.
        bound_c: the absolute constant c of the unified bound.
        fp8_recipe: precision=fp8 only: the FP8 scaling recipe, current (per-tensor scale from
            each tensor's amax), delayed (per-tensor scale from an amax history of the sampled
            steps) or mxfp8 (a power-of-two scale per 32 elements); None: current (docs/FP8.md).
        fp8_attention: precision=fp8 only: also run the attention matmuls (QK^T, PV) of every
            scaled_dot_product_attention call in FP8 (TransformerEngine's fp8_dpa; off in every
            recipe by default).
    """

    head_reduction: Literal["max", "sum"] = "max"
    batch_reduction: Literal["max", "mean"] = "max"
    residual_gain_iters: NonNegativeInt = 0
    local_errors: bool = True
    balanced_mass: bool = False
    reuse_weight_spectra: bool = False
    weight_spectra: Literal["certified", "exact"] = "certified"
    eps_mach: float | None = None
    ln_c1: NonNegativeFloat = 1.0
    ln_c2: NonNegativeFloat = 1.0
    ln_c3: NonNegativeFloat = 1.0
    bound_c: NonNegativeFloat = 1.0
    fp8_recipe: RecipeName | None = None
    fp8_attention: bool = False


@dataclass(frozen=True)
class AlarmOptions:
    """The early warning (stability/alarm): which rule, at which levels (docs/RULES.md).

    (The Args below are plain text: ``LightningCLI --help`` prints them as written.)

    Args:
        rule: default: fires when a rule of the default alarm reaches its watch level, each naming
            its block: max attention logit above attn_logit_max, FP16 headroom below
            fp16_headroom_bits (FP16 passes only), min rho_ln below rho_ln (FP16/BF16 passes only).
            paper: the paper's rolling z-score of kappa_softmax_max (window, threshold).
        attn_logit_max: default rule: fire when any block's max attention logit exceeds this
            (QK-clip's tau = 100); inf turns this part off.
        fp16_headroom_bits: default rule: fire when fewer bits than this remain before FP16
            overflows (stability/fp16_headroom), when the measured pass is FP16; -inf turns it off.
        rho_ln: default rule: fire when any block's min rho_ln drops below this (an
            epsilon-dominated normalization, SPEC §2), when the measured pass is FP16/BF16; 0 turns it off.
        window: paper rule: sampled steps of history for the rolling z-score of
            kappa_softmax_max (the paper's 20, at least 2); it stays silent until that many
            samples exist, i.e. for the first window x every_n_steps training steps.
        threshold: paper rule: z-score above which it fires (the paper's 1.5).
    """

    rule: AlarmName = "default"
    attn_logit_max: float = QK_CLIP_TAU
    fp16_headroom_bits: float = FP16_HEADROOM_WATCH_BITS
    rho_ln: NonNegativeFloat = RHO_LN_WATCH
    window: AtLeastTwoInt = PAPER_WINDOW
    threshold: NonNegativeFloat = PAPER_Z

    @property
    def watch_levels(self) -> dict[str, float]:
        """Rule name → the watch level these options give it (:func:`lightning_stability.rules.rule_book`)."""
        return {
            "attn_logit_max": float(self.attn_logit_max),
            "fp16_headroom": float(self.fp16_headroom_bits),
            "rho_ln": float(self.rho_ln),
            "kappa_softmax_z": float(self.threshold),
        }


def _options(name: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise MisconfigurationException(f"`{name}` must be {kind.__name__}(...), got {value!r}")


def check_probe(probe: ProbeOptions, precision: str | None = None) -> None:
    """Raise ``MisconfigurationException`` naming ``probe.<field>`` and the value for a bad field.

    The FP8 fields need ``precision="fp8"`` (the monitor's ``precision``): set with another
    precision they would silently do nothing, so that is refused too.
    """
    _options("probe", probe, ProbeOptions)
    check_choice("probe.fp8_recipe", probe.fp8_recipe, (None, *RECIPES))
    check_choice("probe.fp8_attention", probe.fp8_attention, (True, False))
    for name, unset in (("fp8_recipe", None), ("fp8_attention", False)):
        value = getattr(probe, name)
        if value is not unset and precision != "fp8":
            raise MisconfigurationException(
                f"`probe.{name}` applies to precision='fp8' only, got probe.{name}={value!r} "
                f"with precision={precision!r}"
            )
    check_choice("probe.head_reduction", probe.head_reduction, ("max", "sum"))
    check_choice("probe.batch_reduction", probe.batch_reduction, ("max", "mean"))
    check_int("probe.residual_gain_iters", probe.residual_gain_iters, minimum=0)
    check_choice("probe.weight_spectra", probe.weight_spectra, ("certified", "exact"))
    for flag in ("local_errors", "balanced_mass", "reuse_weight_spectra"):
        check_choice(f"probe.{flag}", getattr(probe, flag), (True, False))
    if probe.eps_mach is not None:
        check_number("probe.eps_mach", probe.eps_mach, 0.0, 1.0, open_low=True, open_high=True)
    for const in ("ln_c1", "ln_c2", "ln_c3", "bound_c"):
        check_number(f"probe.{const}", getattr(probe, const), 0.0, math.inf, open_high=True)


def check_alarm(alarm: AlarmOptions) -> None:
    """Raise ``MisconfigurationException`` naming ``alarm.<field>`` and the value for a bad field."""
    _options("alarm", alarm, AlarmOptions)
    check_choice("alarm.rule", alarm.rule, ALARM_NAMES)
    check_number("alarm.attn_logit_max", alarm.attn_logit_max, 0.0, math.inf, open_low=True)
    check_number("alarm.fp16_headroom_bits", alarm.fp16_headroom_bits, -math.inf, FP16_MAX_BITS)
    check_number("alarm.rho_ln", alarm.rho_ln, 0.0, math.inf, open_high=True)
    check_int("alarm.window", alarm.window, minimum=2)
    check_number("alarm.threshold", alarm.threshold, 0.0, math.inf, open_high=True)

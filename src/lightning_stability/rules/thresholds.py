"""Every number the project judges by, named once.

The rule table (:mod:`lightning_stability.rules.table`) reads its levels from here; the
callbacks, the report and the examples import these names instead of repeating a literal.
Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

# ------------------------------------------------------------------- number formats
#: Largest finite FP16 value: an output past it overflows to inf.
FP16_MAX = 65504.0
#: ``log2(FP16_MAX)`` rounded up: the most FP16 headroom a value can have, in bits.
FP16_MAX_BITS = 16.0
#: Machine epsilon ``ε_mach`` (``torch.finfo(dtype).eps``) of each precision, by its short name.
#: An FP8 pass takes E4M3's (``torch.finfo(torch.float8_e4m3fn).eps``): the format every FP8 recipe
#: rounds the forward GEMMs' operands to (docs/FP8.md).
EPS_MACH: dict[str, float] = {"bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 2.0**-23, "fp8": 2.0**-3}
#: FP16's ε_mach: FP16-only rules apply to a pass with exactly this ε_mach.
FP16_EPS_MACH = EPS_MACH["fp16"]
#: ε_mach from which a pass is low precision (FP16's 2⁻¹⁰; BF16's 2⁻⁷ and FP8's 2⁻³ are larger):
#: ρ_LN is judged there only.
LOW_PRECISION_EPS_MACH = FP16_EPS_MACH
#: FP8's ε_mach (E4M3's 2⁻³): FP8-only rules apply to a pass with exactly this ε_mach.
FP8_EPS_MACH = EPS_MACH["fp8"]

# ------------------------------------------------------------------ attention logits
#: QK-clip's τ (Megatron, Kimi K2): the logit rule's watch level (and the default alarm's) and
#: the value StabilityGuard clips a head's largest logit to.
QK_CLIP_TAU = 100.0
#: Attention logit past which every run of Wortsman et al. (2023) diverged: the logit rule's at-risk level.
LOGIT_AT_RISK = 1e4
#: A logit within this relative distance of τ is not clipped again (a head clipped to τ and
#: re-measured lands on τ·(1 ± ~1e-7); rescaling it by η ≈ 1 would only add noise).
QK_RECLIP_TOLERANCE = 1e-4

# ------------------------------------------------------------------- FP16 range
#: Bits of FP16 headroom below which an FP16 pass is "watch" (and the default alarm fires).
FP16_HEADROOM_WATCH_BITS = 2.0
#: Bits of FP16 headroom below which an FP16 pass is "at risk" (and StabilityGuard moves the block to FP32).
FP16_HEADROOM_AT_RISK_BITS = 1.0

# ------------------------------------------------------------------ normalization
#: ρ_LN below which a norm is ε-dominated (SPEC §2): watch, the default alarm, the guard's ε-bump.
RHO_LN_WATCH = 1.0

# -------------------------------------------------------------- block-local error
#: r_local (a block's own error on its exact input), in ε_mach, above which a block is "watch":
#: more than one rounding's worth.
R_LOCAL_WATCH_EPS = 1.0
#: r_local, in ε_mach, above which a block is "at risk" (and StabilityGuard moves it to FP32).
R_LOCAL_AT_RISK_EPS = 10.0
#: r_local, in ε_mach, from which "keep this block in FP32" is advised (with :data:`STANDS_OUT`).
#: A healthy BF16 Llama at initialisation measures up to 0.94 ε_mach in its first block.
FP32_ADVICE_FLOOR_EPS = 2.0
#: A block (a layer, under FP8) "stands out" when its r_local (its ``fp8_error_token``) is at least
#: this many times the other blocks' (layers') median.
STANDS_OUT = 2.0

# ------------------------------------------------------------------ FP8 what-if
#: A linear layer's FP8 error per token (``fp8_error_token``), in E4M3's ε_mach, above which the
#: layer is "watch" and from which keeping it in BF16 is advised (with :data:`STANDS_OUT`): one
#: E4M3 rounding's worth (12.5%, twice the largest relative rounding error 2⁻⁴ of one element).
#: Healthy layers measure 0.23–0.30 ε_mach; a layer whose input loses its small values to
#: per-tensor scaling, 7 (docs/FP8.md).
FP8_LAYER_WATCH_EPS = 1.0
#: ``fp8_error_token``, in E4M3's ε_mach, above which a layer is "at risk": half of each token's
#: output lost (50%).
FP8_LAYER_AT_RISK_EPS = 4.0

# --------------------------------------------------------------- the paper's alarm
#: Sampled steps of history of the paper's rolling z-score of κ_softmax (Exp. 2).
PAPER_WINDOW = 20
#: z-score above which the paper's rule fires (Exp. 2).
PAPER_Z = 1.5

# -------------------------------------------------------------- the ε rule's defaults
#: ρ* of Algorithm 1: an ε-bumped norm is brought to ρ_LN = ρ*.
EPS_BUMP_TARGET_RHO = 0.6
#: Lower clip of a proposed ε.
EPS_BUMP_MIN = 1e-6
#: Upper clip of a proposed ε.
EPS_BUMP_MAX = 1e-2

# ------------------------------------------------- candidates of the scenario evaluation
#: Mean attention entropy (nats) below which attention has collapsed (a candidate alarm, not in use).
ENTROPY_COLLAPSE = 0.1
#: z-score of log10 of the max attention logit above which the candidate growth rule fires (not in use).
LOG_LOGIT_Z = 3.0

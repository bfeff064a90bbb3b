"""What one sampled step of :class:`~lightning_stability.StabilityMonitor` measured."""

from __future__ import annotations

from dataclasses import dataclass, field

#: ``BlockReport`` fields logged as ``stability/block{i}/<name>``.
BLOCK_METRICS = (
    "kappa_score",
    "kappa_softmax",
    "kappa_v",
    "wo_norm",
    "kappa_eff",
    "kappa_wkwq",
    "c_ln",
    "rho_ln",
    "predictor",
    "r_block",
    "r_block_median",
    "residual_gain",
    "attention_entropy",
)
#: ``StabilityReport`` fields logged as ``stability/<name>``.
MODEL_METRICS = (
    "predictor",
    "predictor_scaled",
    "r_block",
    "r_block_median",
    "kappa_softmax_max",
    "bound",
    "bound_rigorous",
    "nonfinite",
    "eps_mach",
)


@dataclass
class BlockReport:
    """Diagnostics of one residual block (SPEC §1–§5). ``None``: not measurable for this block.

    Attributes:
        name: qualified module name of the block.
        kappa_score: ``‖Q‖‖K‖/‖QKᵀ‖`` reduced over heads and examples.
        kappa_softmax: ``max_i ‖J(P_i)‖₂‖S_i‖/‖P_i‖`` reduced over heads and examples.
        kappa_v: ``σmax(V)/(σmin(V)+λ)`` reduced over heads and examples.
        wo_norm: ``‖W_O‖₂`` of the attention output projection.
        kappa_eff: ``Σ κ(W)`` over the block's FFN linear maps.
        kappa_wkwq: max over heads of ``κ(W_Kᵀ W_Q)`` (SPEC §8).
        c_ln: ``Σ C_LN`` over the block's normalization layers.
        rho_ln: min ``ρ_LN`` over the block's normalization layers (< 1: ε-dominated).
        predictor: the combined predictor (SPEC §4).
        r_block: ``‖X̃−X‖/‖X‖`` at the block output over the whole sample.
        r_block_median: median over tokens of the per-token relative error.
        residual_gain: ``‖J_f‖₂`` of the residual branch (when estimated).
        attention_entropy: mean attention-row entropy (nats).
    """

    name: str
    kappa_score: float | None = None
    kappa_softmax: float | None = None
    kappa_v: float | None = None
    wo_norm: float | None = None
    kappa_eff: float | None = None
    kappa_wkwq: float | None = None
    c_ln: float | None = None
    rho_ln: float | None = None
    predictor: float | None = None
    r_block: float | None = None
    r_block_median: float | None = None
    residual_gain: float | None = None
    attention_entropy: float | None = None
    per_head: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class StabilityReport:
    """One sampled step: model-level values and one :class:`BlockReport` per block, in model order.

    Attributes:
        step: ``trainer.global_step`` when measured.
        dtype: low-precision dtype the low-precision pass really used (``"bfloat16"``…).
        eps_mach: its machine epsilon.
        blocks: per-block reports.
        predictor: max over blocks of the combined predictor.
        predictor_scaled: ``predictor · eps_mach``.
        r_block: mismatch at the last block's output.
        r_block_median: median per-token mismatch at the last block's output.
        kappa_softmax_max: max κ_softmax over rows, heads, examples and blocks.
        bound: the unified bound, first-order ``(1+ρ)`` form (needs residual gains).
        bound_rigorous: the ``(1+ρ)/(1−ρ)`` form; ``inf`` when the small-gain condition fails.
        small_gain: whether every ``ρ_ℓ < 1`` (``None`` without residual gains).
        nonfinite: non-finite elements in the low-precision block outputs.
        first_nonfinite: the first module whose low-precision output went non-finite.
        norm_dtypes: dtype each normalization layer computed in during the low-precision pass.
    """

    step: int
    dtype: str
    eps_mach: float
    blocks: list[BlockReport]
    predictor: float | None = None
    predictor_scaled: float | None = None
    r_block: float | None = None
    r_block_median: float | None = None
    kappa_softmax_max: float | None = None
    bound: float | None = None
    bound_rigorous: float | None = None
    small_gain: bool | None = None
    nonfinite: int = 0
    first_nonfinite: str | None = None
    norm_dtypes: dict[str, str] = field(default_factory=dict)

    def metrics(self, prefix: str = "stability") -> dict[str, float]:
        """Flat ``{tag: value}`` for the loggers; values not measured are left out."""
        out: dict[str, float] = {}
        for name in MODEL_METRICS:
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}/{name}"] = float(value)
        for i, block in enumerate(self.blocks):
            for name in BLOCK_METRICS:
                value = getattr(block, name)
                if value is not None:
                    out[f"{prefix}/block{i}/{name}"] = float(value)
            for name, values in block.per_head.items():
                for h, value in enumerate(values):
                    out[f"{prefix}/block{i}/head{h}/{name}"] = float(value)
        return out

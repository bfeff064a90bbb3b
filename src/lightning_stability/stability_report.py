"""What one sampled step of :class:`~lightning_stability.StabilityMonitor` measured.

The fields are the rows of :data:`lightning_stability.metrics.METRICS` (a test checks that
they agree); :meth:`StabilityReport.metrics` turns them into logged tags from the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_stability.metrics import BY_NAME, LAYER_METRICS, METRICS, OPERAND_METRICS, tag


@dataclass
class BlockReport:
    """Diagnostics of one residual block (SPEC §1–§5). ``None``: not measurable for this block.

    Attributes:
        name: qualified module name of the block.
        kappa_score: ``‖Q‖‖K‖/‖QKᵀ‖``, max over heads, reduced over examples.
        kappa_softmax: ``max_i ‖J(P_i)‖₂‖S_i‖/‖P_i‖`` reduced over heads (``head_reduction``) and examples.
        kappa_v: ``σmax(V)/(σmin(V)+λ)``, max over heads, reduced over examples.
        attention_entropy: mean attention-row entropy (nats).
        attn_logit_max: max ``|S|`` over heads, examples, query rows and attended keys, ``S`` the
            logits the softmax sees (``scale·q·kᵀ + bias``, soft-capped where the model caps).
        wo_norm: ``‖W_O‖₂`` of the attention output projection.
        kappa_eff: ``Σ κ(W)`` over the block's FFN linear maps.
        kappa_wkwq: max over heads of ``κ(W_Kᵀ W_Q)`` (SPEC §8).
        c_ln: ``Σ C_LN`` over the block's normalization layers.
        rho_ln: min ``ρ_LN`` over the block's normalization layers (< 1: ε-dominated).
        predictor: the combined predictor (SPEC §4).
        r_block: ``‖X̃−X‖/‖X‖`` at the block output over the whole sample (propagated error).
        r_block_median: median over tokens of the per-token relative error.
        r_block_mean_token: mean over tokens of the per-token relative error.
        r_local: the block's own error: the block in low precision on its exact FP32 input.
        r_attention_local: ``r_local`` of the block's attention sub-layer.
        r_ffn_local: ``r_local`` of the block's FFN sub-layer.
        theta: mean over query rows of the balanced-mass factor ``θ(p)`` (``balanced_mass=True``).
        rank_collapse: ``‖X − 1x̄ᵀ‖/‖X‖`` of the block's exact output (→ 0: rank collapse).
        token_similarity: mean pairwise cosine of the block's exact output tokens (→ 1: collapse).
        residual_gain: ``‖J_f‖₂`` of the residual branch (when estimated).
        amax: max ``|output|`` over every module inside the block (exact pass).
        per_head: per-head values of the ``head``-level metrics (with ``log_per_head``).
    """

    name: str
    kappa_score: float | None = None
    kappa_softmax: float | None = None
    kappa_v: float | None = None
    attention_entropy: float | None = None
    attn_logit_max: float | None = None
    wo_norm: float | None = None
    kappa_eff: float | None = None
    kappa_wkwq: float | None = None
    c_ln: float | None = None
    rho_ln: float | None = None
    predictor: float | None = None
    r_block: float | None = None
    r_block_median: float | None = None
    r_block_mean_token: float | None = None
    r_local: float | None = None
    r_attention_local: float | None = None
    r_ffn_local: float | None = None
    theta: float | None = None
    rank_collapse: float | None = None
    token_similarity: float | None = None
    residual_gain: float | None = None
    amax: float | None = None
    per_head: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class OperandReport:
    """FP8 statistics of one quantized operand of a layer's GEMM (``None``: not measured).

    Attributes:
        fp8_underflow: non-zero elements that became 0, over the non-zero elements.
        fp8_saturation: elements clipped at the format's max, over all elements.
        fp8_amax: max ``|x|``.
        fp8_scale_inv_min: smallest dequantization factor ``1/scale``.
        fp8_scale_inv_max: largest dequantization factor.
    """

    fp8_underflow: float | None = None
    fp8_saturation: float | None = None
    fp8_amax: float | None = None
    fp8_scale_inv_min: float | None = None
    fp8_scale_inv_max: float | None = None


@dataclass
class LayerReport:
    """One linear layer under the FP8 what-if (``precision="fp8"``; ``None``: not measured).

    Attributes:
        name: the layer's qualified module name.
        fp8_error: ``‖ỹ−y‖/‖y‖`` of its FP8 output against FP32 on the same input, whole sample.
        fp8_error_token: mean over output rows of the per-row relative error in FP8.
        bf16_error: the same layer call under BF16 autocast (the contrast).
        bf16_error_token: its mean over output rows.
        operands: per quantized operand (``input``, ``weight``…), its statistics.
    """

    name: str
    fp8_error: float | None = None
    fp8_error_token: float | None = None
    bf16_error: float | None = None
    bf16_error_token: float | None = None
    operands: dict[str, OperandReport] = field(default_factory=dict)


@dataclass
class StabilityReport:
    """One sampled step: model-level values and one :class:`BlockReport` per block, in model order.

    Attributes:
        step: the logged step of the measurement: Lightning's step of the batch it was taken on
            (``trainer.global_step − 1`` in ``on_train_batch_end``), so it joins ``training_step`` rows.
        dtype: low-precision dtype the low-precision pass really used (``"bfloat16"``…).
        eps_mach: the machine epsilon used (of ``dtype``, or the monitor's ``eps_mach`` override).
        blocks: per-block reports.
        predictor: max over blocks of the combined predictor.
        predictor_scaled: ``predictor · eps_mach``.
        r_block: mismatch at the last block's output.
        r_block_median: median per-token mismatch at the last block's output.
        r_block_mean_token: mean per-token mismatch at the last block's output.
        attn_logit_max: max over blocks of ``attn_logit_max``.
        kappa_softmax_max: max κ_softmax over rows, heads, examples and attention calls.
        bound: the unified bound, first-order ``(1+ρ)`` form (needs residual gains).
        bound_rigorous: the ``(1+ρ)/(1−ρ)`` form; ``inf`` when the small-gain condition fails.
        small_gain: whether every ``ρ_ℓ < 1`` (``None`` without residual gains).
        nonfinite: non-finite elements in the low-precision block outputs.
        worst_block: name of the block with the largest ``r_local``.
        worst_block_index: its index (logged as ``stability/worst_block``).
        fp16_headroom: ``log2(65504 / max |output|)`` over every module of the model (exact pass).
        amax_module: the module holding that maximum (``"(model output)"`` for the root module).
        alarm: whether the monitor's early warning (its ``alarm.rule``) fired at this step; ``None``
            when its signals were not measured.
        alarm_rule: when the alarm fired, the name of the rule that fired (``"attn_logit_max"``; the rule
            table, ``docs/RULES.md``), else ``None``.
        alarm_block: when the alarm fired, the index of the block that rule names (``None`` for a
            model-level value no block holds).
        alarm_reason: when it fired, the same in words: ``"attn_logit_max>100 in block 0
            ('blocks.0') (value 172)"`` (not logged; ``None`` when it did not fire).
        first_nonfinite: the first module whose low-precision output went non-finite.
        norm_dtypes: dtype each normalization layer computed in during the low-precision pass.
        batch_idx: index in its epoch of the batch the examples were sampled from (not logged);
            with gradient accumulation the last micro-batch of the accumulation window, the one
            after which the optimizer stepped.
        layers: per linear layer, its FP8 what-if statistics (``precision="fp8"`` only), in model order.
    """

    step: int
    dtype: str
    eps_mach: float
    blocks: list[BlockReport]
    predictor: float | None = None
    predictor_scaled: float | None = None
    r_block: float | None = None
    r_block_median: float | None = None
    r_block_mean_token: float | None = None
    attn_logit_max: float | None = None
    kappa_softmax_max: float | None = None
    bound: float | None = None
    bound_rigorous: float | None = None
    small_gain: bool | None = None
    nonfinite: int = 0
    worst_block: str | None = None
    worst_block_index: int | None = None
    fp16_headroom: float | None = None
    amax_module: str | None = None
    alarm: bool | None = None
    alarm_rule: str | None = None
    alarm_block: int | None = None
    alarm_reason: str | None = None
    first_nonfinite: str | None = None
    norm_dtypes: dict[str, str] = field(default_factory=dict)
    batch_idx: int | None = None
    layers: list[LayerReport] = field(default_factory=list)

    def metrics(self, prefix: str = "stability") -> dict[str, float]:
        """Flat ``{tag: value}`` for the loggers, from the metric table; values not measured are left out."""
        out: dict[str, float] = {}
        for metric in METRICS:
            if metric.level == "model" or metric.blocks:
                value = getattr(self, metric.attr or metric.name)
                if value is not None:
                    out[tag(metric, prefix=prefix)] = float(value)
        for i, block in enumerate(self.blocks):
            for metric in METRICS:
                if metric.level not in ("block", "head"):
                    continue
                value = getattr(block, metric.attr or metric.name)
                if value is not None:
                    out[tag(metric, i, prefix=prefix)] = float(value)
                for h, v in enumerate(block.per_head.get(metric.name, ())):
                    out[tag(metric, i, h, prefix=prefix)] = float(v)
        for layer in self.layers:
            out.update(_layer_tags(layer, prefix))
        return out


def _layer_tags(layer: LayerReport, prefix: str) -> dict[str, float]:
    """``stability/layer/<name>/…`` tags of one layer's measured values."""
    out: dict[str, float] = {}
    for name in LAYER_METRICS:
        value = getattr(layer, name)
        if value is not None:
            out[tag(BY_NAME[name], prefix=prefix, layer=layer.name)] = float(value)
    for operand, stats in layer.operands.items():
        for name in OPERAND_METRICS:
            value = getattr(stats, name)
            if value is not None:
                out[tag(BY_NAME[name], prefix=prefix, layer=layer.name, operand=operand)] = float(value)
    return out

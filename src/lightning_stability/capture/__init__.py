"""Capture layer: observe a model's forward pass (no Lightning imports here)."""

from lightning_stability.capture.attention import (
    MASK_GAP,
    AttentionCall,
    AttentionCapture,
    MaskParts,
    additive_floor,
    call_diagnostics,
    call_probabilities,
    causal_keep,
    fold_mask,
    keep_mask,
    observe_attention,
)
from lightning_stability.capture.blocks import BlockTap
from lightning_stability.capture.norms import NormCapture, NormLayer, find_norms
from lightning_stability.capture.probe import RawMeasurement, StabilityProbe, compose_report
from lightning_stability.capture.stacks import Stack, find_blocks, find_stacks, unmatched_patterns
from lightning_stability.capture.structure import (
    Block,
    QKProjection,
    model_blocks,
    moe_kappa_eff,
    structure_notes,
    structure_warnings,
    unattended_blocks,
)

__all__ = [
    "MASK_GAP",
    "AttentionCall",
    "AttentionCapture",
    "Block",
    "BlockTap",
    "MaskParts",
    "NormCapture",
    "NormLayer",
    "QKProjection",
    "RawMeasurement",
    "StabilityProbe",
    "Stack",
    "additive_floor",
    "call_diagnostics",
    "call_probabilities",
    "causal_keep",
    "compose_report",
    "find_blocks",
    "find_norms",
    "find_stacks",
    "fold_mask",
    "keep_mask",
    "model_blocks",
    "moe_kappa_eff",
    "observe_attention",
    "structure_notes",
    "structure_warnings",
    "unattended_blocks",
    "unmatched_patterns",
]

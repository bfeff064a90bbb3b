"""Capture layer: observe a model's forward pass (no Lightning imports here)."""

from lightning_stability.capture.attention import (
    MASK_GAP,
    AttentionCall,
    AttentionCapture,
    MaskParts,
    additive_floor,
    call_diagnostics,
    causal_keep,
    fold_mask,
    keep_mask,
    observe_attention,
)
from lightning_stability.capture.blocks import BlockTap
from lightning_stability.capture.norms import NormCapture, NormLayer, find_norms
from lightning_stability.capture.probe import RawMeasurement, StabilityProbe, compose_report
from lightning_stability.capture.structure import Block, find_blocks, model_blocks

__all__ = [
    "MASK_GAP",
    "AttentionCall",
    "AttentionCapture",
    "Block",
    "BlockTap",
    "MaskParts",
    "NormCapture",
    "NormLayer",
    "RawMeasurement",
    "StabilityProbe",
    "additive_floor",
    "call_diagnostics",
    "causal_keep",
    "compose_report",
    "find_blocks",
    "find_norms",
    "fold_mask",
    "keep_mask",
    "model_blocks",
    "observe_attention",
]

"""Mitigations: changes to a model as plain objects with apply / restore / state_dict.

- :class:`FP32Override` (:mod:`.fp32`): run a block, or its attention, outside autocast in FP32.
- :class:`QKClip` (:mod:`.qk_clip`): bound a block's attention logits by τ (changes weights).
- :class:`EpsilonBump` (:mod:`.eps_bump`): raise the ε of ε-dominated norms by Algorithm 1.

Used by :class:`~lightning_stability.StabilityGuard` and :class:`~lightning_stability.LNEpsilonBump`.
No Lightning: torch and the capture layer only.
"""

from lightning_stability.mitigations.eps_bump import EpsilonBump, find_changeable_norms
from lightning_stability.mitigations.fp32 import FP32Override, attention_module
from lightning_stability.mitigations.qk_clip import (
    QKClip,
    QKParams,
    clip_block_qk,
    qk_clip_,
    qk_clip_factors,
    qk_norm,
    qk_params,
)

__all__ = [
    "EpsilonBump",
    "FP32Override",
    "QKClip",
    "QKParams",
    "attention_module",
    "clip_block_qk",
    "find_changeable_norms",
    "qk_clip_",
    "qk_clip_factors",
    "qk_norm",
    "qk_params",
]

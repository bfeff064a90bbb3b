"""Mask folding: an SDPA-style mask and a causal flag as a keep-mask and a finite additive bias.

Which keys a query attends decides the attention diagnostics (SPEC §1): a masked key is not
part of its row. Boolean masks, additive ``-inf``/``finfo.min``/``-1e4`` entries, causal flags
(either alignment) and ``CausalBias`` objects all fold into one boolean ``keep``; what remains
of a float mask is a genuine ``bias`` that enters the scores (see :func:`fold_mask`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MASK_GAP",
    "CausalAlignment",
    "MaskParts",
    "additive_floor",
    "causal_keep",
    "fold_mask",
    "keep_mask",
]

#: An additive mask entry ``m`` counts as "masked" (not attended) when
#: ``m <= max(0, max_row m) - MASK_GAP``; see :func:`fold_mask`. ``MASK_GAP = -ln(2**-126)``:
#: ``exp(-MASK_GAP)`` is float32's smallest normal number, so such an entry's softmax factor
#: relative to its row's best key (at equal scores) is below float32's normal range (exactly 0
#: where subnormals are flushed, as in GPU softmax kernels).
MASK_GAP: float = -math.log(torch.finfo(torch.float32).tiny)

CausalAlignment = Literal["top_left", "bottom_right"]


class MaskParts(NamedTuple):
    """A mask split into what is attended (``keep``) and a finite additive ``bias``."""

    keep: Tensor | None
    bias: Tensor | None


def causal_keep(
    n_q: int,
    n_k: int,
    alignment: CausalAlignment = "top_left",
    device: torch.device | str | None = None,
) -> Tensor:
    """Causal ``(n_q, n_k)`` boolean keep-mask.

    Args:
        n_q: Number of queries.
        n_k: Number of keys.
        alignment: ``"top_left"`` is what ``F.scaled_dot_product_attention(is_causal=True)``
            uses (query ``i`` sees keys ``j <= i``); ``"bottom_right"`` is
            ``torch.nn.attention.bias.causal_lower_right`` (the last query sees every key:
            ``j <= i + n_k - n_q``), the usual choice for decoding with a cache.
        device: Device of the result.

    Returns:
        Boolean tensor, ``True`` where the key is attended.
    """
    offset = 0 if alignment == "top_left" else n_k - n_q
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=offset)


def _causal_bias_alignment(mask: Any) -> CausalAlignment | None:
    """Alignment of a ``torch.nn.attention.bias.CausalBias`` mask, ``None`` for anything else."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - old torch
        return None
    if not isinstance(mask, CausalBias):
        return None
    return "bottom_right" if mask.variant == CausalVariant.LOWER_RIGHT else "top_left"


def fold_mask(
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    n_q: int | None = None,
    n_k: int | None = None,
    *,
    causal_alignment: CausalAlignment = "top_left",
) -> MaskParts:
    """Fold an SDPA-style mask and a causal flag into a keep-mask and a finite bias.

    Conventions are those of ``F.scaled_dot_product_attention``: a boolean mask is ``True`` where
    attended; a float mask is added to the scores. A ``CausalBias`` mask is understood as causal
    with its own alignment.

    **Which finite additive entries are masks.** An entry ``m`` of a float mask is "not attended"
    iff ``m <= max(0, max_j m_j) - MASK_GAP`` (row max over the keys; ``MASK_GAP = -ln 2⁻¹²⁶ ≈
    87.34``); every other entry is a genuine bias and enters the scores. The rule depends on the
    mask alone (not on the scores), so both passes and every batch classify alike. Its meaning: at
    equal scores the entry's softmax factor ``exp(m - max m)`` relative to the row's most
    favoured key is below float32's smallest normal number — exactly 0 with subnormals flushed,
    and at most ``e^{Δs}·2⁻¹²⁶`` for a score advantage ``Δs`` otherwise, so it cannot move a
    float32 output. ``-inf``, ``finfo(dtype).min`` of any dtype, the fp16-safe padding ``-1e4`` of
    older transformers models and Swin's shifted-window ``-100`` (also with its relative position
    bias added, up to ±12) are masked; ALiBi, T5 relative position and Swin's relative position
    table (|bias| ≪ 87) stay bias. ``max(0, ·)`` makes a row whose every entry is that negative
    (a fully padded query) fully masked instead of a uniform row with a huge bias. Why not "weight
    exactly 0 in float32": ``exp(-100) ≈ 3.7e-44`` is a float32 subnormal, so Swin's mask would
    keep non-zero weights, and a rule on ``score - rowmax`` would classify by the scores. Limits:
    an ALiBi key further than ``87.3/slope`` tokens counts as masked (its weight is below 2⁻¹²⁶
    there anyway); a "mask" shallower than 87 (e.g. ``-50``) is kept as bias.

    Args:
        attn_mask: Boolean or float mask broadcastable to ``(..., n_q, n_k)``, or ``None``.
        is_causal: Apply a causal mask as SDPA does.
        n_q: Number of queries (needed when causal).
        n_k: Number of keys (needed when causal).
        causal_alignment: Alignment of the causal mask when ``n_q != n_k`` (SDPA:
            ``"top_left"``).

    Returns:
        ``MaskParts(keep, bias)``: ``keep`` boolean (``None`` = all attended), ``bias`` the finite
        additive part with masked entries zeroed (``None`` when there is none).
    """
    alignment = _causal_bias_alignment(attn_mask)
    if alignment is not None:
        assert attn_mask is not None
        is_causal, causal_alignment = True, alignment
        n_q = int(attn_mask.seq_len_q)  # type: ignore[attr-defined]
        n_k = int(attn_mask.seq_len_kv)  # type: ignore[attr-defined]
        device: torch.device | None = attn_mask.device
        attn_mask = None
    else:
        device = attn_mask.device if attn_mask is not None else None

    keep: Tensor | None = None
    bias: Tensor | None = None
    if attn_mask is not None:
        mask = attn_mask.detach()
        if mask.dtype == torch.bool:
            keep = mask
        else:
            kept = ~(mask <= additive_floor(mask))  # NaN stays "attended": flagged, not hidden
            if not bool(kept.all()):
                keep = kept
            finite = torch.where(kept, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
            if bool((finite != 0).any()):
                bias = finite
    if is_causal:
        if n_q is None or n_k is None:
            raise ValueError("fold_mask: n_q and n_k are required when is_causal=True")
        causal = causal_keep(n_q, n_k, causal_alignment, device=device)
        keep = causal if keep is None else keep & causal
    return MaskParts(keep, bias)


def additive_floor(mask: Tensor) -> Tensor:
    """Row-wise level at or below which an additive mask entry means "not attended".

    ``max(0, max_row mask) - MASK_GAP`` over the last axis (keepdim), the rule of
    :func:`fold_mask`; rows without a finite entry give ``-MASK_GAP``.
    """
    top = mask.detach().amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).clamp_min(0.0)
    return top - MASK_GAP


def keep_mask(
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    n_q: int | None = None,
    n_k: int | None = None,
    *,
    causal_alignment: CausalAlignment = "top_left",
) -> Tensor | None:
    """Boolean keep-mask (``True`` = attended, ``None`` = all) of an SDPA-style mask.

    Shortcut for ``fold_mask(...).keep``; see :func:`fold_mask`.
    """
    return fold_mask(attn_mask, is_causal, n_q, n_k, causal_alignment=causal_alignment).keep

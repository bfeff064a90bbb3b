"""Intercept every attention evaluation of a model's forward pass, as a neutral observer.

The stability diagnostics (SPEC §1) need, per attention call, the query/key/value tensors
exactly as the kernel saw them, which keys each query attended to, any additive bias, and the
softmax scale. Models compute attention in several ways; this module turns all of them into one
record, :class:`AttentionCall`:

1. ``F.scaled_dot_product_attention`` (hand-written models, timm-style blocks, transformers'
   ``sdpa`` attention) is seen by a :class:`torch.overrides.TorchFunctionMode`.
2. ``nn.MultiheadAttention`` / ``nn.Transformer{Encoder,Decoder}Layer`` call
   ``F.multi_head_attention_forward``; the same mode sees that call and recomputes Q/K/V from its
   arguments with torch's own in-projection helpers (bit-identical to what the kernel receives).
   The fused eval fast paths are switched off while a capture is active
   (``torch.backends.mha.set_fastpath_enabled(False)``), so the Python path really runs.
3. transformers ``eager`` attention never calls SDPA; while active, the lookup
   ``AttentionInterface.get_interface("eager", default)`` returns a wrapper that records the call
   and delegates to exactly the function the model would have used (``default``, the model
   file's ``eager_attention_forward``), so outputs stay bitwise identical. The registry's
   contents are never changed (no name is registered). Only done if ``transformers`` is already
   imported; it is never imported here.
   T5's ``position_bias`` keyword (added to the scores) and Gemma-2's ``softcap`` (tanh
   soft-capping) enter the record; the eager function's own softmax/matmuls are not recorded
   again.
4. Attention written out by hand (timm's non-fused path, Swin, nanoGPT's manual path,
   research code: ``softmax(q @ kᵀ · scale + mask) @ v``) is seen by the same mode without an
   adapter: a softmax over the last axis of a 4-D tensor, and the matmul (``@``,
   ``torch.matmul``, ``bmm``) consuming its output (also through dropout, views and casts),
   give a record whose ``scores`` are the softmax input (masks included) and whose ``v`` is the
   matmul's other operand. ``q``/``k`` are the operands of the 4-D matmul that produced the
   scores, followed by tensor identity through ``* scale``, ``/ scale``, ``+ mask``/``+ bias``,
   ``masked_fill``, views and casts (in place too); ``None`` when the chain is broken (e.g. a
   ``tanh``), then ``kappa_score`` is unknown. The bookkeeping keeps references, never copies,
   keyed by tensor identity; an entry vanishes with its tensor (weak reference).
5. Attention the above cannot see calls :func:`observe_attention` (a cheap no-op unless a
   capture is active); the explicit softmax that follows it is then not recorded twice.

The innermost module of ``model`` running at the time of the call is tracked with forward
pre-hooks and ``always_call=True`` forward hooks that push/pop its qualified name.

Everything installed is removed on exit, even when the forward raises: hooks, the function
mode, the ``get_interface`` wrapper and the MHA fast-path flag (restored to its previous value).
Captures may nest; the global machinery (mode, eager lookup, fast-path flag) is
installed by the first active capture and removed with the last, and every active capture is
told about every call. Not thread-safe: use one capture at a time per process.

Known limitations:
    * Calls made while a capture is active but outside ``model`` are recorded too (name ``''``).
    * ``q``/``k``/``v`` (and ``scores``) are detached views sharing storage with the model's
      tensors: read them inside ``on_call`` (or clone them) — a static KV cache may be updated
      in place later, and hand-written code may reuse the score buffer.
    * Not seen: flash/flex/paged transformers backends, GPT-2 ``eager`` with
      ``reorder_and_upcast_attn=True`` (bypasses the attention interface), models that fetch
      attention with ``getattr(ALL_ATTENTION_FUNCTIONS, impl, default)`` (kosmos2_5), fused
      kernels called directly (``torch._native_multi_head_attention``), compiled graphs.
    * Dropout inside the attention call (SDPA ``dropout_p``, ``F.dropout`` on the probabilities)
      is ignored: the record describes the attention before dropout.
    * Hand-written attention: only a softmax over the last axis of a 4-D ``(B, H, n_q, n_k)``
      tensor consumed by a matmul is recorded (not 3-D ``(B·H, n, n)`` layouts, ``einsum``,
      ``baddbmm``, or a softmax whose output reaches the matmul through other ops). Without
      traced Q/K its keep-mask comes from the scores themselves (``s <= max_row s - MASK_GAP``),
      so a row that is entirely masked by a finite value is then taken as attended.
    * A finite additive "mask" shallower than ``MASK_GAP`` ≈ 87.3 below its row (e.g. ``-50``)
      is kept as bias; an ALiBi key further than ``87.3/slope`` tokens counts as masked (see
      :func:`fold_mask`).
    * MHA's ``need_weights=True`` path scales q by ``sqrt(1/d)``; the record reports ``1/sqrt(d)``
      (equal up to one ulp).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_stability.diagnostics.attention import AttentionDiagnostics, attention_diagnostics

__all__ = [
    "MASK_GAP",
    "AttentionCall",
    "AttentionCapture",
    "MaskParts",
    "additive_floor",
    "call_diagnostics",
    "causal_keep",
    "fold_mask",
    "keep_mask",
    "observe_attention",
]

#: An additive mask entry ``m`` counts as "masked" (not attended) when
#: ``m <= max(0, max_row m) - MASK_GAP``; see :func:`fold_mask`. ``MASK_GAP = -ln(2**-126)``:
#: ``exp(-MASK_GAP)`` is float32's smallest normal number, so such an entry's softmax factor
#: relative to its row's best key (at equal scores) is below float32's normal range (exactly 0
#: where subnormals are flushed, as in GPU softmax kernels).
MASK_GAP: float = -math.log(torch.finfo(torch.float32).tiny)

CausalAlignment = Literal["top_left", "bottom_right"]


@dataclass(frozen=True)
class AttentionCall:
    """One attention evaluation, normalised to ``(B, H, n, d)``.

    The attention it describes is ``softmax(scale · q kᵀ + bias, restricted to keep) @ v``.

    Attributes:
        name: Qualified name (as in ``model.named_modules()``) of the innermost module of the
            captured model running when the call happened, e.g. ``'h.0.attn'``; ``''`` for the
            root module or when no module of the model is running.
        q: Queries ``(B, H, n_q, d)``, detached, dtype as it arrived at the kernel.
        k: Keys ``(B, H, n_k, d)``, detached; grouped-query K/V heads are already mapped to the
            K/V head each query head really uses, so head ``h`` of ``q`` pairs with head ``h``.
        v: Values ``(B, H, n_k, d_v)``, detached, mapped like ``k``.
        keep: Boolean, broadcastable to ``(B, H, n_q, n_k)``; ``True`` = the key is attended.
            Folds causal masking, boolean masks, additive ``-inf``/``finfo.min`` entries and key
            padding masks. ``None`` when every key is attended. A row may be all ``False``
            (e.g. a left-padded query position).
        bias: The finite additive part of a float mask (masked entries zeroed), broadcastable to
            the scores; ``None`` when the mask is purely 0/masked.
        scale: Softmax scale actually used (SDPA's default is ``1/sqrt(d)``).
        softcap: Soft-capping constant ``c`` when the logits ``L = scale·q kᵀ + bias`` pass
            through ``c·tanh(L/c)`` before the softmax (Gemma-2 ``attn_logit_softcapping``).
        scores: The softmax input itself ``(B, H, n_q, n_k)`` (masks included, detached), for
            attention written out by hand (``softmax(q @ kᵀ · scale + mask) @ v``). When set it is
            authoritative: ``q``/``k`` are the matmul operands traced back from it (``None`` when
            they could not be traced: ``kappa_score`` is then unknown); with them, ``scale`` (the
            traced scalar factor, else 1) and ``bias`` (``scores − scale·q kᵀ`` on attended
            entries, ``None`` when that is only rounding) reproduce ``scores`` to rounding, so
            a consumer of the SDPA-form fields still sees the same attention.
    """

    name: str
    q: Tensor | None
    k: Tensor | None
    v: Tensor
    keep: Tensor | None
    bias: Tensor | None
    scale: float
    softcap: float | None = None
    scores: Tensor | None = None


class MaskParts(NamedTuple):
    """A mask split into what is attended (``keep``) and a finite additive ``bias``."""

    keep: Tensor | None
    bias: Tensor | None


# --------------------------------------------------------------------------------------------
# Mask folding
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Normalising the calls
# --------------------------------------------------------------------------------------------


def _expand_heads(t: Tensor, n_heads: int) -> Tensor:
    """Map ``t``'s heads (dim 1) to ``n_heads`` query heads as SDPA's ``enable_gqa`` does."""
    h = t.shape[1]
    if h == n_heads:
        return t
    if h == 1:
        return t.expand(t.shape[0], n_heads, *t.shape[2:])
    if n_heads % h:
        raise ValueError(f"cannot map {h} key/value heads onto {n_heads} query heads")
    return t.repeat_interleave(n_heads // h, dim=1)


def _module_heads(module: nn.Module | None) -> tuple[int, int | None]:
    """(num_key_value_groups, num_attention_heads) of a transformers-style attention module."""
    if module is None:
        return 1, None
    groups = getattr(module, "num_key_value_groups", 1)
    heads = getattr(module, "num_heads", None)
    if heads is None:
        heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return (groups if isinstance(groups, int) else 1), (heads if isinstance(heads, int) else None)


def _normalize(
    name: str,
    module: nn.Module | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    softcap: float | None = None,
) -> AttentionCall:
    """Build an :class:`AttentionCall` from SDPA-convention arguments.

    Handles 3-D inputs (no head axis), extra leading batch axes, batch broadcasting, GQA
    (unrepeated K/V, with or without ``enable_gqa``) and transformers' packed decode queries
    ``(B, H_kv, n_rep, d)``.
    """
    q, k, v = q.detach(), k.detach(), v.detach()
    n_q, n_k = q.shape[-2], k.shape[-2]
    parts = fold_mask(attn_mask, is_causal, n_q, n_k)
    keep, bias = parts.keep, parts.bias
    scale_f = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    if q.dim() == 3:  # (N, L, E): a single head
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        keep = keep.unsqueeze(-3) if keep is not None and keep.dim() >= 3 else keep
        bias = bias.unsqueeze(-3) if bias is not None and bias.dim() >= 3 else bias
    elif q.dim() > 4:  # (N, ..., H, L, E): flatten the leading axes into B
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])

        def flat(t: Tensor) -> Tensor:
            full = torch.broadcast_shapes(t.shape, (*lead, 1, 1, 1))
            return t.expand(full).reshape(-1, *full[len(lead) :])

        q, k, v = flat(q), flat(k), flat(v)
        keep = None if keep is None else flat(keep)
        bias = None if bias is None else flat(bias)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"unsupported attention ranks q{tuple(q.shape)} k{tuple(k.shape)}")

    # transformers packs one decode token's query heads as (B, H_kv, n_rep, d) against K/V heads.
    groups, heads = _module_heads(module)
    if (
        groups > 1
        and heads is not None
        and q.shape[1] == k.shape[1]
        and q.shape[2] == groups
        and q.shape[1] * groups == heads
    ):
        b_, h_kv = q.shape[0], q.shape[1]
        q = q.reshape(b_, h_kv * groups, 1, q.shape[-1])

        def unpack(t: Tensor | None) -> Tensor | None:
            if t is None or (t.dim() >= 3 and t.shape[-3] == 1 and t.shape[-2] == 1) or t.dim() < 3:
                return t
            t4 = t if t.dim() == 4 else t.unsqueeze(0)
            b_t = t4.shape[0]
            return t4.expand(b_t, h_kv, groups, t4.shape[-1]).reshape(b_t, h_kv * groups, 1, t4.shape[-1])

        keep, bias = unpack(keep), unpack(bias)

    batch = max(q.shape[0], k.shape[0], v.shape[0])
    if q.shape[0] != batch:
        q = q.expand(batch, *q.shape[1:])
    if k.shape[0] != batch:
        k = k.expand(batch, *k.shape[1:])
    if v.shape[0] != batch:
        v = v.expand(batch, *v.shape[1:])
    n_heads = q.shape[1]
    k, v = _expand_heads(k, n_heads), _expand_heads(v, n_heads)
    cap = None if softcap is None else float(softcap)
    return AttentionCall(name=name, q=q, k=k, v=v, keep=keep, bias=bias, scale=scale_f, softcap=cap)


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind SDPA's positional/keyword arguments to names."""
    bound: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
    bound.update(zip(_SDPA_PARAMS, args, strict=False))
    bound.update(kwargs)
    return bound


def _mha_signature() -> inspect.Signature:
    return inspect.signature(F.multi_head_attention_forward)


def _to_additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MHA mask convention → additive float (bool ``True`` = NOT allowed → ``-inf``)."""
    if mask is None:
        return None
    mask = mask.detach()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


def _mha_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AttentionCall:
    """Recompute what ``F.multi_head_attention_forward`` hands to its attention kernel.

    Mirrors the function's prologue (in-projection, ``bias_k``/``bias_v``, ``static_k``/``static_v``,
    ``add_zero_attn``, mask merging, the ``is_causal`` hint) with torch's own helpers, so the
    recomputed Q/K/V are bit-identical to the kernel's inputs.
    """
    p = _mha_signature().bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    query, key, value = a["query"], a["key"], a["value"]
    num_heads: int = int(a["num_heads"])
    kpm: Tensor | None = a["key_padding_mask"]
    attn_mask: Tensor | None = a["attn_mask"]
    if query.dim() == 2:  # unbatched
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if kpm is not None:
            kpm = kpm.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads

    with torch.no_grad():
        if not a["use_separate_proj_weight"]:
            q, k, v = F._in_projection_packed(  # type: ignore[attr-defined]
                query, key, value, a["in_proj_weight"], a["in_proj_bias"]
            )
        else:
            b = a["in_proj_bias"]
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            q, k, v = F._in_projection(  # type: ignore[attr-defined]
                query, key, value, a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"], b_q, b_k, b_v
            )
        causal_hint = bool(a["is_causal"]) and kpm is None and not a["need_weights"]
        mask = None if causal_hint else _to_additive(attn_mask, query.dtype)
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
        kpm_f = _to_additive(kpm, query.dtype)
        bias_k, bias_v = a["bias_k"], a["bias_v"]
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm_f = None if kpm_f is None else F.pad(kpm_f, (0, 1))
        q4 = q.reshape(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
        static_k, static_v = a["static_k"], a["static_v"]
        if static_k is None:
            k4 = k.reshape(k.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3)
        else:
            k4 = static_k.reshape(bsz, num_heads, static_k.shape[1], head_dim)
        if static_v is None:
            v4 = v.reshape(v.shape[0], bsz, num_heads, -1).permute(1, 2, 0, 3)
        else:
            v4 = static_v.reshape(bsz, num_heads, static_v.shape[1], -1)
        if a["add_zero_attn"]:
            k4 = torch.cat([k4, k4.new_zeros(bsz, num_heads, 1, k4.shape[-1])], dim=2)
            v4 = torch.cat([v4, v4.new_zeros(bsz, num_heads, 1, v4.shape[-1])], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm_f = None if kpm_f is None else F.pad(kpm_f, (0, 1))
        src_len = k4.shape[2]
        if mask is not None:  # (1, L, S) or (B·H, L, S) → 4-D
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.reshape(bsz, num_heads, tgt_len, src_len)
        if kpm_f is not None:
            kpm4 = kpm_f.reshape(bsz, 1, 1, src_len)
            mask = kpm4 if mask is None else mask + kpm4
        keep, bias = fold_mask(mask, causal_hint, tgt_len, src_len)
    return AttentionCall(name=name, q=q4, k=k4, v=v4, keep=keep, bias=bias, scale=1.0 / math.sqrt(head_dim))


# --------------------------------------------------------------------------------------------
# Attention written out by hand: softmax(q @ kᵀ · scale + mask) @ v
# --------------------------------------------------------------------------------------------


def _methods(*names: str) -> frozenset[Any]:
    """The function objects a ``TorchFunctionMode`` receives for these ``Tensor`` methods."""
    found = {getattr(cls, n, None) for cls in (Tensor, torch._C.TensorBase) for n in names}
    found.discard(None)
    return frozenset(found)


_MATMUL = _methods("matmul", "__matmul__", "bmm") | {torch.matmul, torch.bmm}
_SOFTMAX = _methods("softmax") | {F.softmax, torch.softmax}
#: ops whose output is the traced input times a factor (the factor is tracked)
_SCALE = _methods("mul", "__mul__", "__rmul__", "div", "__truediv__", "true_divide") | {
    torch.mul,
    torch.div,
    torch.true_divide,
}
_SCALE_INPLACE = _methods("mul_", "__imul__", "div_", "__itruediv__", "true_divide_")
#: ops that add to / overwrite entries of the traced input (masks, biases): the trace carries on
_SHIFT = _methods("add", "__add__", "__radd__", "sub", "__sub__", "masked_fill") | {
    torch.add,
    torch.sub,
    torch.masked_fill,
}
_SHIFT_INPLACE = _methods("add_", "__iadd__", "sub_", "__isub__", "masked_fill_")
#: ops that keep the values (views, copies, casts) and, for probabilities, dropout
_SAME = _methods("view", "reshape", "contiguous", "float", "to", "type_as", "clone") | {
    torch.reshape,
    F.dropout,
    torch.dropout,
}
_ADDS = _methods("add", "__add__", "__radd__") | {torch.add}
_DIVIDES = _methods("div", "__truediv__", "true_divide", "div_", "__itruediv__", "true_divide_") | {
    torch.div,
    torch.true_divide,
}


@dataclass
class _Trace:
    """A tensor computed as ``factor · (q @ kT)`` plus additive/overwritten entries."""

    ref: weakref.ref[Tensor]
    q: Tensor
    k_t: Tensor
    factor: float | Tensor


@dataclass
class _Probs:
    """A softmax output (``ref``) of ``scores``; ``trace`` is the scores' trace, if any."""

    ref: weakref.ref[Tensor]
    scores: Tensor
    trace: _Trace | None


def _remember(table: dict[int, Any], out: Tensor, make: Callable[[weakref.ref[Tensor]], Any]) -> None:
    """``table[id(out)] = make(ref)``; the entry is dropped when ``out`` is freed."""
    key = id(out)

    def drop(_: object, key: int = key) -> None:
        entry = table.get(key)
        if entry is not None and entry.ref() is None:
            del table[key]

    table[key] = make(weakref.ref(out, drop))


def _lookup(table: dict[int, Any], t: object) -> Any:
    if not isinstance(t, Tensor):
        return None
    entry = table.get(id(t))
    return entry if entry is not None and entry.ref() is t else None


def _factor(x: object) -> float | Tensor | None:
    """A multiplier that keeps ``q @ kT``'s rows and columns (a number, or a tensor whose last two
    dims are 1, e.g. a per-head logit scale); ``None`` for anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Tensor) and x.is_floating_point() and (x.dim() < 2 or x.shape[-2:] == (1, 1)):
        return x.detach() if x.numel() > 1 else float(x.detach().reshape(()))
    return None


def _track(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> tuple[_Probs, Tensor] | None:
    """Bookkeeping by tensor identity after ``out = func(*args, **kwargs)``; no copies are made.

    Returns ``(probabilities, V)`` when ``func`` is the matmul consuming a softmax output.
    """
    st = _STATE
    if func in _MATMUL:
        a, b = (*args, None, None)[:2]
        probs = _lookup(st.probs, a)
        if probs is not None:
            del st.probs[id(a)]
            return (probs, b) if isinstance(b, Tensor) else None
        operands = isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 2 and b.dim() >= 2
        if operands and isinstance(out, Tensor) and out.dim() == 4 and out.is_floating_point():
            _remember(st.traces, out, lambda r: _Trace(r, a, b, 1.0))
        return None
    if func in _SOFTMAX:
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if isinstance(x, Tensor) and isinstance(out, Tensor) and x.dim() == 4 and dim in (-1, 3):
            scores: Tensor = x.detach()
            trace = _lookup(st.traces, x)
            _remember(st.probs, out, lambda r: _Probs(r, scores, trace))
        return None
    if not (st.traces or st.probs) or not args or not isinstance(out, Tensor):
        return None
    if func in _SAME:
        probs = _lookup(st.probs, args[0])
        if probs is not None and out is not args[0]:
            _remember(st.probs, out, lambda r: _Probs(r, probs.scores, probs.trace))
            return None
        trace = _lookup(st.traces, args[0])
        if trace is not None and out is not args[0]:
            _remember(st.traces, out, lambda r: _Trace(r, trace.q, trace.k_t, trace.factor))
        return None
    if func in _SCALE or func in _SCALE_INPLACE:
        x, y = (*args, kwargs.get("other"))[:2]
        trace = _lookup(st.traces, x)
        if trace is None and func not in _DIVIDES:
            x, y = y, x
            trace = _lookup(st.traces, x)
        f = _factor(y)
        if trace is None or f is None:
            return None
        new = trace.factor * (1.0 / f if func in _DIVIDES else f)
        if out is x:
            trace.factor = new
        else:
            _remember(st.traces, out, lambda r: _Trace(r, trace.q, trace.k_t, new))
        return None
    if func in _SHIFT or func in _SHIFT_INPLACE:
        trace = _lookup(st.traces, args[0])
        if trace is None and func in _ADDS and len(args) > 1:
            trace = _lookup(st.traces, args[1])
        if trace is not None and out is not trace.ref():
            _remember(st.traces, out, lambda r: _Trace(r, trace.q, trace.k_t, trace.factor))
    return None


def _observed(*tensors: Tensor) -> bool:
    return any(r() is t for r in _STATE.observed for t in tensors)


def _dispatch_manual(probs: _Probs, v: Tensor) -> None:
    """Record ``softmax(scores) @ v`` unless :func:`observe_attention` already reported it."""
    trace = probs.trace
    if _observed(v) or (trace is not None and _observed(trace.q)):
        return
    _dispatch(lambda name, _m: _manual_call(name, probs.scores, trace, v))


def _manual_call(name: str, scores: Tensor, trace: _Trace | None, v: Tensor) -> AttentionCall:
    """An :class:`AttentionCall` from a softmax input, its traced Q/K (if any) and V.

    The keep-mask is the :func:`fold_mask` rule applied to the additive part of the scores,
    ``A = scores - factor·(q @ kT)`` (masks and biases added, ``masked_fill``-ed entries), when
    Q and K are traced; otherwise to the scores themselves shifted by their row maximum
    (``s <= max_row s - MASK_GAP``). ``-inf`` entries are always masked.
    """
    s = scores.detach()
    b, h, n_q, n_k = s.shape
    v4 = torch.broadcast_to(v.detach(), (b, h, n_k, v.shape[-1]))
    q4 = k4 = None
    factor = 1.0
    if trace is not None:
        qk = trace.q.detach().double() @ trace.k_t.detach().double()
        f = trace.factor
        if tuple(torch.broadcast_shapes(qk.shape, s.shape)) == tuple(s.shape) and trace.k_t.shape[-1] == n_k:
            additive = s.double() - (f.double() if isinstance(f, Tensor) else f) * qk
            additive = torch.where(torch.isneginf(s), float("-inf"), additive)
            keep = ~(additive <= additive_floor(additive))
            d = trace.q.shape[-1]
            q4 = torch.broadcast_to(trace.q.detach(), (b, h, n_q, d))
            k4 = torch.broadcast_to(trace.k_t.detach().mT, (b, h, n_k, d))
            factor = f if isinstance(f, float) else 1.0
            bias = _reproducing_bias(s, factor * qk, keep)
        else:
            trace = None
    if trace is None:
        top = s.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        keep = ~(s <= top - MASK_GAP)
        bias = None
    keep_or_none = None if bool(keep.all()) else keep
    return AttentionCall(
        name=name, q=q4, k=k4, v=v4, keep=keep_or_none, bias=bias, scale=factor, scores=s
    )


def _reproducing_bias(s: Tensor, scaled_qk: Tensor, keep: Tensor) -> Tensor | None:
    """``s − scale·q kᵀ`` on attended entries (0 elsewhere), in ``s``'s float dtype, so that the
    SDPA-form fields of the record reproduce ``s`` too; ``None`` when that is rounding noise."""
    diff = torch.where(keep, s.double() - scaled_qk, 0.0)
    size = torch.where(keep, s.double().abs(), 0.0).amax() + 1.0
    if bool(diff.abs().amax() <= 64 * torch.finfo(s.dtype).eps * size):
        return None
    return diff.to(s.dtype if s.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------------------------
# Global machinery shared by active captures
# --------------------------------------------------------------------------------------------


class _State:
    """Process-wide state: active captures, the installed machinery, a re-entrancy guard."""

    def __init__(self) -> None:
        self.captures: list[AttentionCapture] = []
        self.machinery: contextlib.ExitStack | None = None
        self.busy = False
        #: > 0 while a call already recorded as a whole runs (transformers eager): its own
        #: softmax and matmuls are not traced again.
        self.recorded = 0
        #: id(tensor) → trace of a score tensor made by a matmul (see :class:`_Trace`).
        self.traces: dict[int, _Trace] = {}
        #: id(tensor) → a softmax output waiting for the matmul that consumes it.
        self.probs: dict[int, _Probs] = {}
        #: weak references to tensors handed to :func:`observe_attention` (no double count).
        self.observed: list[weakref.ref[Tensor]] = []

    def reset_tracing(self) -> None:
        self.traces.clear()
        self.probs.clear()
        self.observed.clear()


_STATE = _State()


def _dispatch(build: Callable[[str, nn.Module | None], AttentionCall]) -> None:
    """Build the call (per capture, for its own module name) and hand it to every active capture.

    Errors while *building* the record are turned into a warning (an observer must not break the
    model's forward); errors raised by ``on_call`` propagate.
    """
    if _STATE.busy or not _STATE.captures:
        return
    _STATE.busy = True
    try:
        for cap in list(_STATE.captures):
            name, module = cap._current()
            try:
                call = build(name, module)
            except Exception as err:
                warnings.warn(
                    f"AttentionCapture: could not record an attention call in {name!r}: {err!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            cap.calls += 1
            cap._on_call(call)
    finally:
        _STATE.busy = False


class _AttentionMode(TorchFunctionMode):
    """Sees SDPA and ``F.multi_head_attention_forward`` calls; passes every call through unchanged."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        st = _STATE
        if st.busy or not st.captures:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
            self._record(func, args, kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if st.recorded:
            return out
        try:
            found = _track(func, args, kwargs, out)
        except Exception as err:  # bookkeeping must never break the model's forward
            warnings.warn(f"AttentionCapture: tracing {func!r} failed: {err!r}", RuntimeWarning, stacklevel=2)
            found = None
        if found is not None:
            _dispatch_manual(*found)
        return out

    @staticmethod
    def _record(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record an SDPA or ``F.multi_head_attention_forward`` call."""
        if func is F.scaled_dot_product_attention:
            b = _sdpa_args(args, kwargs)
            _dispatch(
                lambda name, module: _normalize(
                    name,
                    module,
                    b["query"],
                    b["key"],
                    b["value"],
                    b["attn_mask"],
                    bool(b["is_causal"]),
                    b["scale"],
                )
            )
        else:
            _dispatch(lambda name, module: _mha_call(name, args, kwargs))


def _attention_interface_class() -> Any:
    """transformers' ``AttentionInterface`` class if transformers is already imported, else None."""
    mu = sys.modules.get("transformers.modeling_utils")
    return getattr(mu, "AttentionInterface", None) if mu is not None else None


def _eager_mask(mask: Tensor | None, position_bias: Tensor | None) -> Tensor | None:
    """The additive mask an eager function applies: T5 adds ``position_bias`` before the mask."""
    if position_bias is None or not isinstance(position_bias, Tensor):
        return mask
    bias = position_bias.detach().float()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.detach().float()


def _eager_recorder(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap transformers' eager attention ``fn``: record the call, then run ``fn`` unchanged."""

    def eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if _STATE.captures and not _STATE.busy:
            mask = _eager_mask(args[0] if args else kwargs.get("attention_mask"), kwargs.get("position_bias"))
            scaling, softcap = kwargs.get("scaling"), kwargs.get("softcap")
            _dispatch(
                lambda name, _m: _normalize(name, module, query, key, value, mask, False, scaling, softcap)
            )
        _STATE.recorded += 1  # the eager function's own softmax/matmuls are this same call
        try:
            return fn(module, query, key, value, *args, **kwargs)
        finally:
            _STATE.recorded -= 1

    eager.__wrapped__ = fn  # type: ignore[attr-defined]
    return eager


def _patch_eager_lookup(stack: contextlib.ExitStack) -> None:
    """Make ``AttentionInterface.get_interface("eager", default)`` return a recording wrapper.

    transformers 5.x models look their attention up with
    ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``;
    ``"eager"`` is not a registered name, so the lookup returns the model file's own ``default``.
    Wrapping the lookup (rather than registering ``"eager"`` in the registry) delegates to exactly
    that function, whatever the model file calls it (``simple_eager_attention_forward``, …), and
    leaves the registry's contents untouched. Only done when transformers is already imported.
    """
    iface = _attention_interface_class()
    original = getattr(iface, "get_interface", None) if iface is not None else None
    if iface is None or original is None:
        return
    own = "get_interface" in vars(iface)

    def get_interface(self: Any, attn_implementation: Any, default: Callable[..., Any]) -> Any:
        fn = original(self, attn_implementation, default)
        if attn_implementation == "eager" and callable(fn):
            return _eager_recorder(fn)
        return fn

    def restore() -> None:
        if own:
            iface.get_interface = original
        else:
            delattr(iface, "get_interface")

    iface.get_interface = get_interface
    stack.callback(restore)


def _install_machinery() -> contextlib.ExitStack:
    """Install the process-wide pieces; the returned stack removes them again."""
    stack = contextlib.ExitStack()
    try:
        prev_fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        stack.callback(torch.backends.mha.set_fastpath_enabled, prev_fastpath)
        _patch_eager_lookup(stack)
        stack.enter_context(_AttentionMode())
    except BaseException:
        stack.close()
        raise
    return stack


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class AttentionCapture:
    """Context manager calling ``on_call`` once per attention evaluation, in model order.

    While active, every attention evaluation (SDPA, ``nn.MultiheadAttention`` and the
    ``nn.Transformer*`` layers, transformers ``eager``/``sdpa`` attention, hand-written
    ``softmax(q @ kᵀ·scale + mask) @ v``, and :func:`observe_attention`) calls
    ``on_call(AttentionCall(...))`` synchronously. Turn a record into numbers with
    :func:`call_diagnostics` (it honours ``scores`` and ``softcap``). The model's
    outputs are bit-identical with and without a capture (at the same MHA fast-path setting: the
    capture turns the fused eval fast paths off while active, and they compute differently).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> class Attn(nn.Module):
        ...     def forward(self, x):
        ...         return F.scaled_dot_product_attention(x, x, x, is_causal=True)
        >>> model = nn.Sequential(Attn())
        >>> seen = []
        >>> with AttentionCapture(model, seen.append) as cap:
        ...     _ = model(torch.randn(1, 2, 4, 8))
        >>> cap.calls, seen[0].name, tuple(seen[0].q.shape), seen[0].keep.shape
        (1, '0', (1, 2, 4, 8), torch.Size([4, 4]))

    Args:
        model: The model whose forward is observed; its submodules give the call names.
        on_call: Callback receiving each :class:`AttentionCall`; runs with the capture
            suspended (attention it computes itself is not recorded).
    """

    def __init__(self, model: nn.Module, on_call: Callable[[AttentionCall], None]) -> None:
        self.model = model
        self._on_call = on_call
        self.calls: int = 0
        self._stack: contextlib.ExitStack | None = None
        self._names: list[tuple[str, nn.Module]] = []

    # -- module-name tracking ---------------------------------------------------------------
    def _current(self) -> tuple[str, nn.Module | None]:
        return self._names[-1] if self._names else ("", None)

    def _push_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def pre(module: nn.Module, args: Any) -> None:
            self._names.append((name, module))

        return pre

    def _pop_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        for i in range(len(self._names) - 1, -1, -1):
            if self._names[i][1] is module:
                del self._names[i:]
                return

    def _install_hooks(self, stack: contextlib.ExitStack) -> None:
        for name, mod in self.model.named_modules():
            h_pre = mod.register_forward_pre_hook(self._push_hook(name))
            stack.callback(h_pre.remove)
            h_post = mod.register_forward_hook(self._pop_hook, always_call=True)
            stack.callback(h_post.remove)

    # -- context protocol ---------------------------------------------------------------------
    def __enter__(self) -> AttentionCapture:
        if self._stack is not None:
            raise RuntimeError("AttentionCapture is not re-entrant")
        stack = contextlib.ExitStack()
        try:
            self._names.clear()
            stack.callback(self._names.clear)
            self._install_hooks(stack)
            if not _STATE.captures:
                _STATE.machinery = _install_machinery()
            _STATE.captures.append(self)
            stack.callback(self._leave)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _leave(self) -> None:
        if self in _STATE.captures:
            _STATE.captures.remove(self)
        if not _STATE.captures:
            _STATE.reset_tracing()
        if not _STATE.captures and _STATE.machinery is not None:
            machinery, _STATE.machinery = _STATE.machinery, None
            machinery.close()

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def observe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> None:
    """Report an attention evaluation written with an explicit softmax.

    Call it with the arguments ``F.scaled_dot_product_attention`` would take for the same
    attention (bool mask ``True`` = attend, float mask additive). It is a cheap no-op unless an
    :class:`AttentionCapture` is active.

    Args:
        q: Queries ``(B, H, n_q, d)`` (or ``(B, n_q, d)``).
        k: Keys ``(B, H_kv, n_k, d)``; ``H_kv`` may divide ``H`` (grouped-query attention).
        v: Values ``(B, H_kv, n_k, d_v)``.
        attn_mask: Optional boolean or additive float mask.
        is_causal: Causal (top-left aligned, as SDPA).
        scale: Softmax scale; default ``1/sqrt(d)``.
        enable_gqa: Accepted for signature parity with SDPA; K/V heads are mapped regardless.
    """
    if not _STATE.captures or _STATE.busy:
        return
    del enable_gqa
    # the explicit softmax that follows is this same call: do not record it a second time
    _STATE.observed.extend(weakref.ref(t) for t in (q, k, v) if isinstance(t, Tensor))
    _dispatch(lambda name, module: _normalize(name, module, q, k, v, attn_mask, is_causal, scale))


def call_probabilities(call: AttentionCall) -> Tensor:
    """The attention probabilities of a recorded call, float64 ``(B, H, n_q, n_k)``.

    ``softmax`` of the recorded ``scores``, else of ``softcap(scale·q kᵀ + bias)``, over the attended
    keys; a row with no attended key is all zeros.
    """
    if call.scores is not None:
        s = call.scores.double()
    else:
        if call.q is None or call.k is None:
            raise ValueError("call_probabilities: the call has neither scores nor q/k")
        s = call.scale * (call.q.double() @ call.k.double().transpose(-1, -2))
        if call.bias is not None:
            s = s + call.bias.double()
        if call.softcap is not None:
            s = call.softcap * torch.tanh(s / call.softcap)
    if call.keep is not None:
        s = s.masked_fill(~call.keep, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def call_diagnostics(call: AttentionCall, *, chunk_size: int | None = None) -> AttentionDiagnostics:
    """The per-head diagnostics of one recorded call, whatever form it was recorded in.

    Passes every field the record has (``scores`` of hand-written attention, ``softcap``, the
    bias) to :func:`~lightning_stability.diagnostics.attention_diagnostics` in float32
    (float64 stays float64), with contiguous Q/K/V (they are usually permuted views).

    Args:
        call: A record handed to an :class:`AttentionCapture` callback.
        chunk_size: Passed on (number of (b, h) pairs per chunk).

    Returns:
        ``(B, H)`` float64 diagnostics; ``kappa_score`` is NaN for a call recorded from its scores
        without traceable Q/K.
    """

    def work(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return (t if t.dtype == torch.float64 else t.float()).contiguous()

    v = work(call.v)
    assert v is not None
    return attention_diagnostics(
        work(call.q),
        work(call.k),
        v,
        mask=call.keep,
        scale=call.scale,
        bias=work(call.bias),
        softcap=call.softcap,
        scores=work(call.scores),
        chunk_size=chunk_size,
    )

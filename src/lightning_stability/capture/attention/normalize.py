"""SDPA-convention and ``F.multi_head_attention_forward`` arguments as an :class:`~.call.AttentionCall`.

SDPA arguments (also transformers' eager attention and :func:`~.context.observe_attention`)
are normalised to ``(B, H, n, d)``: 3-D inputs, extra leading batch axes, batch broadcasting,
grouped-query K/V and transformers' packed decode queries. An MHA call is recomputed from its
arguments with torch's own in-projection helpers, bit-identical to what its kernel receives.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .call import AttentionCall
from .masks import fold_mask


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
    scale_f = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v, keep, bias = _four_dims(q, k, v, parts.keep, parts.bias)
    q, keep, bias = _unpack_decode_queries(module, q, k, keep, bias)
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


_Four = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


def _four_dims(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, bias: Tensor | None) -> _Four:
    """``q, k, v`` (and the mask parts alike) as ``(B, H, n, d)``: a head axis added to 3-D
    inputs, extra leading batch axes flattened into ``B``."""
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
    return q, k, v, keep, bias


def _unpack_decode_queries(
    module: nn.Module | None, q: Tensor, k: Tensor, keep: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """transformers packs one decode token's query heads as ``(B, H_kv, n_rep, d)`` against the
    K/V heads: unpacked to ``(B, H, 1, d)`` (and the mask parts alike); anything else unchanged."""
    groups, heads = _module_heads(module)
    if not (
        groups > 1
        and heads is not None
        and q.shape[1] == k.shape[1]
        and q.shape[2] == groups
        and q.shape[1] * groups == heads
    ):
        return q, keep, bias
    b_, h_kv = q.shape[0], q.shape[1]
    q = q.reshape(b_, h_kv * groups, 1, q.shape[-1])

    def unpack(t: Tensor | None) -> Tensor | None:
        if t is None or (t.dim() >= 3 and t.shape[-3] == 1 and t.shape[-2] == 1) or t.dim() < 3:
            return t
        t4 = t if t.dim() == 4 else t.unsqueeze(0)
        b_t = t4.shape[0]
        return t4.expand(b_t, h_kv, groups, t4.shape[-1]).reshape(b_t, h_kv * groups, 1, t4.shape[-1])

    return q, unpack(keep), unpack(bias)


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
        q, k, v = _mha_in_projection(a, query, key, value)
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


def _mha_in_projection(a: dict[str, Any], query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
    """Q, K, V ``(L, B, E)`` as ``F.multi_head_attention_forward`` projects them (packed or separate
    weights), with torch's own helpers; ``a``: its bound arguments."""
    if not a["use_separate_proj_weight"]:
        return F._in_projection_packed(  # type: ignore[attr-defined]
            query, key, value, a["in_proj_weight"], a["in_proj_bias"]
        )
    b = a["in_proj_bias"]
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F._in_projection(  # type: ignore[attr-defined]
        query, key, value, a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"], b_q, b_k, b_v
    )

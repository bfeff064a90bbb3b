"""Chunked processing over flattened leading dimensions, and reused scratch buffers.

Shared by the attention diagnostics: a batch of score matrices ``(..., n_q, n_k)`` is processed
in chunks of flattened leading elements, so temporaries stay near one float32 copy of the
scores, and the large per-call temporaries are written into per-thread buffers reused between
calls (:func:`workspace`).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ._checks import check_mask

_WORKSPACE = threading.local()
_WORKSPACE_MAX_BYTES = 16 << 20


def expand_rank(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def take_lead(t: Tensor, lead: tuple[int, ...], g0: int, g1: int) -> Tensor:
    """Rows ``g0:g1`` of ``t`` (leading dims broadcastable to ``lead``, flattened) as ``(c|1, a, b)``."""
    tl = tuple(t.shape[:-2])
    if all(s == 1 for s in tl):
        return t.reshape((1, *t.shape[-2:]))
    if tl == tuple(lead) and t.is_contiguous():
        return t.reshape((-1, *t.shape[-2:]))[g0:g1]
    g = torch.arange(g0, g1, device=t.device)
    idx = torch.unravel_index(g, lead)
    sel = tuple(i if s != 1 else torch.zeros_like(i) for i, s in zip(idx, tl, strict=True))
    return t[sel]


def chunk_len(g: int, per_item: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    # Keep the per-chunk temporaries (about four working copies) near one full float32 score
    # tensor, but do not split small problems.
    budget = max(g * per_item // 4, 1 << 20)
    return max(1, min(g, budget // max(per_item, 1)))


def prep_mask(mask: Tensor | None, shape: tuple[int, ...], fn: str) -> Tensor | None:
    if mask is None:
        return None
    check_mask(mask, shape, fn)
    return expand_rank(mask, len(shape))


def workspace(numel: int, like: Tensor, slot: str, dtype: torch.dtype | None = None) -> Tensor:
    """A flat scratch buffer of ``numel`` elements (``like``'s dtype), reused between calls (CPU).

    ``slot`` names the user: buffers of different slots never alias, so a caller may hold one
    slot's buffer (the scores) while a callee fills another (the row statistics pass).

    A fresh buffer of a megabyte is served by fresh pages (glibc maps blocks of this size
    afresh and returns them when freed): measured at n = 64, the two page-faulting buffers of
    the row statistics pass cost 0.4 ms of its 0.65 ms, more than the softmax inside it. The
    buffer is per thread and never escapes the diagnostics (every caller writes it before reading
    and returns fresh tensors), so reusing it changes no result. Other devices allocate a fresh
    buffer (their caching allocators already reuse memory), and so do buffers above
    ``_WORKSPACE_MAX_BYTES`` (kept per thread for the process's life, the cache stays small).
    """
    dtype = like.dtype if dtype is None else dtype
    if like.device.type != "cpu" or numel * dtype.itemsize > _WORKSPACE_MAX_BYTES:
        return like.new_empty(numel, dtype=dtype)
    cache: dict[tuple[str, torch.dtype, bool], Tensor] = getattr(_WORKSPACE, "bufs", None) or {}
    _WORKSPACE.bufs = cache
    # A buffer made under inference mode is an inference tensor, which cannot be written outside
    # it (and the reverse holds for views): one buffer per mode.
    key = (slot, dtype, torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = like.new_empty(numel, dtype=dtype)  # like's device (CPU), not the default device
        cache[key] = buf
    return buf[:numel]

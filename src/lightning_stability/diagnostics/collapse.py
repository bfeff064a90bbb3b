"""Rank collapse of token representations, per block and example (SPEC §8).

Rank collapse (Dong et al. 2021; Giorlandino & Goldt 2025, "Two failure modes of deep
transformers", arXiv 2505.24333): all tokens of a sequence collapse to (nearly) the same
representation, so deep blocks can no longer tell positions apart and gradients to the
early layers vanish. It is the second failure mode of self-attention next to entropy
collapse (:func:`~.attention.attention_entropy`). Two views of the same thing, both on the
token matrix ``X`` of one example (``n`` tokens × ``d`` features, a block's output):

* :func:`token_similarity` — mean pairwise cosine similarity of the tokens (→ 1 on collapse).
* :func:`rank_collapse` — ``‖X − 1x̄ᵀ‖_F/‖X‖_F``, the relative distance of ``X`` from its
  rank-1 token-mean approximation (→ 0 on collapse; ≤ 1 always).

Both return one float64 value per example (leading dims are batch dims). An optional
``mask`` ``(..., n)`` (True = real token) drops padding tokens. To reduce over examples (and
ranks) take the mean: the values are per-sequence statistics of equal weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_mask, check_tensor

__all__ = ["collapse_statistics", "rank_collapse", "token_similarity"]

_F64 = torch.float64
_INF = float("inf")


def _prepare(x: Tensor, mask: Tensor | None, fn: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(x64 with masked tokens zeroed, keep (..., n) bool or None = all, finite (...) bool)``.

    Without a mask, a float16/bfloat16/float32 input takes a path with no full-size ``isfinite``
    mask and no host sync: a float64 sum of such values cannot overflow (≤ 3.4e38 per entry),
    so an example's sum is finite exactly when all its entries are, and a non-finite entry only
    reaches its own example's statistics, which are then reported as ``inf``.
    """
    check_tensor("x", x, 2, fn)
    x64 = x.to(_F64)
    if mask is None and x.dtype != _F64:
        return x64, None, torch.isfinite(x64.sum((-2, -1)))
    keep = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if mask is not None:
        check_mask(mask, tuple(x.shape[:-1]), fn)
        keep = keep & mask
    fin = (torch.isfinite(x64) | ~keep.unsqueeze(-1)).flatten(-2).all(-1)
    x64 = torch.where(keep.unsqueeze(-1) & torch.isfinite(x64), x64, 0.0)
    return x64, keep, fin


def _similarity(x64: Tensor, keep: Tensor | None, fin: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(x64, dim=-1, keepdim=True)
    has_dir = norm.squeeze(-1) > 0
    if keep is not None:
        has_dir = has_dir & keep
    u = x64 / torch.where(norm > 0, norm, 1.0)
    k = has_dir.sum(-1).to(_F64)
    s = torch.linalg.vector_norm(u.sum(-2), dim=-1).square()
    out = (s - k) / (k * (k - 1.0)).clamp_min(1.0)
    out = torch.where(k >= 2, out.clamp(-1.0, 1.0), 1.0)
    return torch.where(fin, out, _INF)


def _collapse(x64: Tensor, keep: Tensor | None, fin: Tensor) -> Tensor:
    if keep is None:
        centred = x64 - x64.mean(-2, keepdim=True)
    else:
        kf = keep.to(_F64).unsqueeze(-1)
        count = kf.sum(-2, keepdim=True).clamp_min(1.0)
        centred = (x64 - x64.sum(-2, keepdim=True) / count) * kf
    resid = torch.linalg.vector_norm(centred, dim=(-2, -1))
    total = torch.linalg.vector_norm(x64, dim=(-2, -1))
    out = resid / torch.where(total > 0, total, 1.0)
    out = torch.where(total > 0, out.clamp(0.0, 1.0), 0.0)
    return torch.where(fin, out, _INF)


def token_similarity(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean pairwise cosine similarity ``mean_{i≠j} cos(x_i, x_j)`` of the tokens, per example.

    Uses ``Σ_{i≠j} u_i·u_j = ‖Σ u_i‖² − n`` for the unit tokens ``u_i = x_i/‖x_i‖`` (O(n·d), no
    n×n matrix). Tokens of norm 0 have no direction and are left out, like masked ones.

    Args:
        x: Token representations ``(..., n, d)``, e.g. a block output ``(B, n, d)``.
        mask: Optional boolean ``(..., n)`` keep-mask (True = real token), broadcastable.

    Returns:
        ``(...)`` float64 in ``[−1/(n−1), 1]``; 1 = all tokens parallel (collapsed). Fewer than
        two tokens with a direction → 1.0 (nothing to tell apart); a non-finite kept entry →
        ``inf``.

    Raises:
        ValueError: On < 2 dims or a bad mask.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
        >>> round(token_similarity(x).item(), 6)  # (0 + 2·(1/√2)) / 3 pairs
        0.471405
    """
    return _similarity(*_prepare(x, mask, "token_similarity"))


def rank_collapse(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``‖X − 1x̄ᵀ‖_F / ‖X‖_F`` per example: distance from the rank-1 token mean (rank collapse).

    ``x̄`` is the mean token (over kept tokens). Since ``‖X‖² = ‖X − 1x̄ᵀ‖² + n‖x̄‖²`` the value
    lies in ``[0, 1]``: 0 = every token equals the mean (collapsed), 1 = the tokens average
    to zero. Computed from the centred tokens directly (no cancellation).

    Args:
        x: Token representations ``(..., n, d)``, e.g. a block output ``(B, n, d)``.
        mask: Optional boolean ``(..., n)`` keep-mask (True = real token), broadcastable.

    Returns:
        ``(...)`` float64 in ``[0, 1]``; ``X = 0`` or no kept token → 0 (nothing but the mean);
        a non-finite kept entry → ``inf``.

    Raises:
        ValueError: On < 2 dims or a bad mask.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [-1.0, 0.0]]])
        >>> rank_collapse(x).tolist()  # identical tokens → 0; opposite tokens → 1
        [0.0, 1.0]
    """
    return _collapse(*_prepare(x, mask, "rank_collapse"))


def collapse_statistics(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(rank_collapse(x, mask), token_similarity(x, mask))`` from one float64 copy of ``x``.

    For a caller that wants both (the probe, for every block output): the float64 conversion and
    the finiteness check are done once. Values equal the two functions' exactly.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
        >>> [t.tolist() for t in collapse_statistics(x)]
        [[0.0], [1.0]]
    """
    prepared = _prepare(x, mask, "collapse_statistics")
    return _collapse(*prepared), _similarity(*prepared)

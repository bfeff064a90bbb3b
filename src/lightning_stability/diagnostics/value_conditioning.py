"""Value conditioning ``κ_V = σmax(V)/(σmin(V) + ridge)`` per attention head (SPEC §1).

V is restricted to the rows of the keys some query attends (a padded key is not part of V);
:func:`kappa_v_many` solves many layers' V in few calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import all_finite, check_mask, check_tensor, safe_ratio
from ._chunks import expand_rank
from .linear import extreme_singular_values

__all__ = ["kappa_v", "kappa_v_many"]

_F64 = torch.float64
_INF = float("inf")


def _extreme_sv_rows(v64: Tensor, keys: Tensor, gram_max_cond: float = 1e3) -> tuple[Tensor, Tensor]:
    """``(σmax, σmin)`` of ``V`` restricted to its attended rows, without gathering them.

    Masked rows are zeroed: ``V₀ᵀV₀ = V_keptᵀV_kept``, so the zeroed matrix has the same non-zero
    singular values as the matrix with those rows dropped; it only gains exact zeros when the
    number of kept rows ``r`` is below ``d``. Of the ``m = min(n, d)`` eigenvalues (ascending) of
    the smaller Gram matrix, the top ``min(r, d)`` are those of ``V_kept``, so ``σmin`` is the
    one at index ``m − min(r, d)`` (not the trailing zeros). Ill-conditioned heads
    (``κ > gram_max_cond``) are redone with ``svdvals`` (descending: index ``min(r, d) − 1``).
    """
    x = v64 * keys.unsqueeze(-1).to(v64.dtype)
    n, d = x.shape[-2], x.shape[-1]
    m = min(n, d)
    r = keys.sum(-1).clamp_max(d)  # (...) number of singular values of V_kept
    gram = x.mT @ x if n >= d else x @ x.mT
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    hi = lam[..., -1]
    pos = (m - r).clamp(0, m - 1).unsqueeze(-1)
    lo = lam.gather(-1, pos).squeeze(-1)
    lo = torch.where(r > 0, lo, 0.0)
    smax, smin = hi.sqrt(), lo.sqrt()
    redo = (lo < hi / (gram_max_cond * gram_max_cond)) & (r > 0)
    if bool(redo.any()):
        sv = torch.linalg.svdvals(x[redo])
        smax[redo] = sv[..., 0]
        smin[redo] = sv.gather(-1, (r[redo] - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return smax, smin


def kappa_v(v: Tensor, ridge: float = 1e-6, key_mask: Tensor | None = None) -> Tensor:
    """Value conditioning ``σmax(V)/(σmin(V) + ridge)`` per head (SPEC §1).

    σ runs over the ``min(n, d)`` singular values (float64, via ``extreme_singular_values``).
    The result is clamped at 1 (a condition number is ≥ 1; the ridge would otherwise push a
    tiny, well-conditioned V below 1). With ``key_mask``, V is the matrix of the attended keys'
    rows only (a padded key that no query attends is not part of V): its ``min(r, d)`` singular
    values, ``r`` the number of attended keys.

    Args:
        v: Values ``(..., n, d)``.
        ridge: The ridge λ ≥ 0 (SPEC default 1e-6).
        key_mask: Optional boolean broadcastable to ``(..., n)``, ``True`` = the key is attended
            by at least one query. No attended key → 1.0.

    Returns:
        ``(...)`` float64 ≥ 1. Rank-deficient V → large but finite ``σmax/ridge``; all-zero V → 1.0;
        ``ridge = 0`` and σmin = 0 → ``inf``; non-finite V → ``inf``. A σmin at or below
        ``√r·u·σmax`` (``u`` the unit roundoff of ``v``'s dtype, ``r`` the number of singular
        values) is below the rounding level of V itself and counts as 0.

    Raises:
        ValueError: On a tensor with < 2 dims or a negative ridge.

    Example:
        >>> round(kappa_v(torch.diag(torch.tensor([4.0, 2.0]))).item(), 4)
        2.0
    """
    fn = "kappa_v"
    check_tensor("v", v, 2, fn)
    if not ridge >= 0.0:
        raise ValueError(f"{fn}: ridge must be >= 0, got {ridge}")
    v = v.detach()  # a diagnostic: no graph (eigvalsh under autograd also takes another route)
    v64 = v.to(_F64)
    lead = tuple(v.shape[:-2])
    clean = all_finite(v64)
    fin = torch.ones(lead, dtype=torch.bool, device=v.device)
    if not clean:
        fin = torch.isfinite(v64).flatten(-2).all(-1)
        v64 = torch.where(torch.isfinite(v64), v64, 0.0)
    if key_mask is not None:
        check_mask(key_mask, tuple(v.shape[:-1]), fn, "key_mask")
        keys = expand_rank(key_mask, v.dim() - 1).expand(v.shape[:-1])
        if not clean:
            fin = (torch.isfinite(v.to(_F64)) | ~keys.unsqueeze(-1)).flatten(-2).all(-1)
    if v.shape[-1] == 0 or v.shape[-2] == 0:
        return torch.ones(lead, dtype=_F64, device=v.device)
    if key_mask is not None:
        smax, smin = _extreme_sv_rows(v64, keys)
        rank = keys.sum(-1).clamp_max(v.shape[-1]).to(_F64)
    else:
        smax, smin = extreme_singular_values(v64)
        rank = torch.full_like(smax, float(min(v.shape[-2:])))
    # Rounding V's entries to its dtype moves every σ by up to ‖E‖₂ ≤ √r·u·σmax (Weyl): a σmin
    # below that is indistinguishable from 0 and counts as 0 (else it is rounding noise, which
    # κ ≈ σmax/ridge would amplify into kernel-dependent values).
    unit = torch.finfo(v.dtype).eps / 2
    smin = torch.where(smin <= rank.sqrt() * unit * smax, 0.0, smin)
    kap = safe_ratio(smax, smin + ridge).clamp_min(1.0)
    return torch.where(fin, kap, _INF)


def kappa_v_many(
    vs: Sequence[Tensor], ridge: float = 1e-6, key_masks: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """:func:`kappa_v` of many V tensors (e.g. every layer's, after the pass) in few solver calls.

    Tensors with the same ``(n, d)``, dtype and presence of a key mask are concatenated along
    their flattened leading dims and go through one :func:`kappa_v` call (one Gram
    ``eigvalsh``), so the per-call overhead is paid once per distinct shape, not once per
    layer. Each result equals ``kappa_v(v, ridge, key_mask)`` exactly (the solver works matrix
    by matrix; a non-finite V only routes its group through the entry-wise path, which leaves
    the finite heads' numbers unchanged).

    Args:
        vs: Value tensors ``(..., n, d)``.
        ridge: As in :func:`kappa_v`.
        key_masks: ``None`` or one entry per tensor: ``None`` or a boolean mask broadcastable
            to ``v.shape[:-1]`` (as ``kappa_v``'s ``key_mask``).

    Returns:
        One float64 tensor of each input's leading shape, in input order.

    Raises:
        ValueError: If ``key_masks`` has a different length than ``vs``, or as :func:`kappa_v`.

    Example:
        >>> out = kappa_v_many([torch.diag(torch.tensor([4.0, 2.0])), torch.eye(3).expand(2, 3, 3)])
        >>> [round(out[0].item(), 4), out[1].tolist()]  # σmax/(σmin + 1e-6)
        [2.0, [1.0, 1.0]]
    """
    fn = "kappa_v_many"
    if key_masks is not None and len(key_masks) != len(vs):
        raise ValueError(f"{fn}: key_masks has {len(key_masks)} entries for {len(vs)} tensors")
    masks: list[Tensor | None] = list(key_masks) if key_masks is not None else [None] * len(vs)
    groups: dict[tuple[int, int, torch.dtype, bool], list[int]] = {}
    for i, v in enumerate(vs):
        check_tensor(f"vs[{i}]", v, 2, fn)
        groups.setdefault((v.shape[-2], v.shape[-1], v.dtype, masks[i] is None), []).append(i)
    out: list[Tensor] = [torch.empty(0)] * len(vs)
    for (n, d, _, no_mask), idx in groups.items():
        flat = [vs[i].reshape(-1, n, d) for i in idx]
        keys = None
        if not no_mask:
            parts = []
            for i in idx:
                km = masks[i]
                assert km is not None
                check_mask(km, tuple(vs[i].shape[:-1]), fn, f"key_masks[{i}]")
                parts.append(expand_rank(km, vs[i].dim() - 1).expand(vs[i].shape[:-1]).reshape(-1, n))
            keys = torch.cat(parts)
        kap = kappa_v(torch.cat(flat), ridge, key_mask=keys)
        start = 0
        for i, f in zip(idx, flat, strict=True):
            out[i] = kap[start : start + f.shape[0]].reshape(vs[i].shape[:-2])
            start += f.shape[0]
    return out

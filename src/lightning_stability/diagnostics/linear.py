"""Linear-map conditioning (SPEC §3) and per-head ``W_Qᵀ W_K`` conditioning (SPEC §8)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import extremal
from ._checks import all_finite, check_tensor, safe_ratio

__all__ = [
    "condition_from_singular_values",
    "condition_number",
    "extreme_singular_values",
    "kappa_wkwq",
    "kappa_wkwq_many",
    "singular_value_extremes_many",
    "spectral_norm",
    "weight_extremes_many",
    "wkwq_norm",
]


#: Float64 bytes of matrices one batched spectra call may stack. Batching pays the per-call
#: overhead once for a small model's many small weights; the bound keeps a large model's
#: float64 copies to this size (a single matrix above it is solved alone): stacking every
#: FFN weight of a 7B model would be an 11 GiB float64 copy.
BATCH_BYTES = 32 << 20


def batches(sizes: Sequence[int], budget: int | None = None) -> Iterator[list[int]]:
    """Consecutive runs of indices of ``sizes`` summing to at most ``budget`` bytes (default
    :data:`BATCH_BYTES`); an item larger than ``budget`` forms a run of its own.

    Example:
        >>> list(batches([4, 4, 4, 9, 1], budget=8))
        [[0, 1], [2], [3], [4]]
    """
    budget = BATCH_BYTES if budget is None else budget
    run: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if run and total + size > budget:
            yield run
            run, total = [], 0
        run.append(i)
        total += size
    if run:
        yield run


def float64_stack(mats: Sequence[Tensor]) -> Tensor:
    """``torch.stack`` of equally shaped matrices as ONE float64 copy (no per-matrix temporaries)."""
    out = mats[0].new_empty((len(mats), *mats[0].shape), dtype=torch.float64)
    for k, m in enumerate(mats):
        out[k].copy_(m.detach())
    return out


def _svdvals(w: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    """Descending singular values (float64 for float64 input, else float32) and a finiteness flag."""
    check_tensor("w", w, 2, fn)
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    x = w.detach().to(work)
    fin = torch.isfinite(x).flatten(-2).all(-1)
    x = torch.where(torch.isfinite(x), x, 0.0)
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        return torch.zeros((*x.shape[:-2], 1), dtype=work, device=x.device), fin
    return torch.linalg.svdvals(x), fin


def extreme_singular_values(w: Tensor, gram_max_cond: float = 1e3) -> tuple[Tensor, Tensor]:
    """``(σmax, σmin)`` of each matrix of ``(..., m, n)``, in float64, over the ``min(m, n)`` values.

    Faster than a full SVD and as exact where it matters: the eigenvalues of the float64 Gram
    matrix (``min(m, n)`` square) carry an absolute error of about ``min(m,n)·ε₆₄·σmax²``, so
    for ``κ ≤ gram_max_cond`` (default 10³) σmin is right to ~1e-9 relative; matrices worse
    conditioned than that are recomputed with ``svdvals``. Non-finite entries count as 0 (callers
    flag them).

    Args:
        w: ``(..., m, n)``, at least one row and one column.
        gram_max_cond: largest κ trusted to the Gram route.

    Returns:
        Two ``(...)`` float64 tensors.

    Example:
        >>> hi, lo = extreme_singular_values(torch.diag(torch.tensor([4.0, 2.0, 0.5])))
        >>> hi.item(), round(lo.item(), 12)
        (4.0, 0.5)
    """
    x = w.detach().to(torch.float64)
    if not all_finite(x):
        x = torch.where(torch.isfinite(x), x, 0.0)
    gram = x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT
    lam = torch.linalg.eigvalsh(gram)
    hi, lo = lam[..., -1].clamp_min(0.0), lam[..., 0].clamp_min(0.0)
    redo = lo < hi / (gram_max_cond * gram_max_cond)
    smax, smin = hi.sqrt(), lo.sqrt()
    if bool(redo.any()):
        sv = torch.linalg.svdvals(x[redo])
        smax[redo], smin[redo] = sv[..., 0], sv[..., -1]
    return smax, smin


def singular_value_extremes_many(
    mats: Sequence[Tensor], gram_max_cond: float = 1e3
) -> list[tuple[Tensor, Tensor]]:
    """:func:`extreme_singular_values` of many matrices of mixed shapes, one solver call per shape.

    For a caller holding every layer's small problems after the pass (weights of several
    shapes, V of every layer): matrices of equal trailing shape are stacked (in float64) and
    solved together, so the per-call overhead (~20 small ops and a LAPACK dispatch) is paid once
    per distinct shape instead of once per matrix (once per :data:`BATCH_BYTES` of float64
    copies, for large matrices). Every value equals the one-by-one result
    (same Gram-eigenvalue route, same SVD fallback, solved matrix by matrix inside LAPACK).

    Args:
        mats: Tensors ``(..., m, n)`` (each at least one row and column); leading dims allowed.
        gram_max_cond: As in :func:`extreme_singular_values`.

    Returns:
        One ``(σmax, σmin)`` pair of float64 tensors of each input's leading shape, in input order.

    Example:
        >>> out = singular_value_extremes_many([torch.eye(3) * 2, torch.ones(4, 2)])
        >>> [(round(a.item(), 6), round(b.item(), 6)) for a, b in out]
        [(2.0, 2.0), (2.828427, 0.0)]
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mats):
        check_tensor(f"mats[{i}]", m, 2, "singular_value_extremes_many")
        groups.setdefault((m.shape[-2], m.shape[-1]), []).append(i)
    out: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * len(mats)
    for (rows, cols), idx in groups.items():
        for run in batches([mats[i].numel() * 8 for i in idx]):
            part = [idx[k] for k in run]
            flat = [mats[i].detach().reshape(-1, rows, cols) for i in part]
            every = [x for f in flat for x in f]
            if every:
                hi, lo = extreme_singular_values(float64_stack(every), gram_max_cond)
            else:  # only empty leading shapes
                hi = lo = torch.empty(0, dtype=torch.float64, device=mats[part[0]].device)
            start = 0
            for i, f in zip(part, flat, strict=True):
                lead = mats[i].shape[:-2]
                stop = start + f.shape[0]
                out[i] = (hi[start:stop].reshape(lead), lo[start:stop].reshape(lead))
                start = stop
    return out


def weight_extremes_many(
    mats: Sequence[Tensor], smallest: Sequence[bool], rtol: float = extremal.RTOL
) -> list[tuple[Tensor, Tensor]]:
    """``(σmax, σmin)`` of each 2-D weight, each certified within ``rtol`` relative
    (:mod:`~lightning_stability.diagnostics.extremal`); ``σmin`` only where ``smallest`` asks.

    The weights terms of the probe: ``κ(W)`` needs both ends, ``‖W_O‖₂`` only ``σmax``, which
    costs far less for a large matrix (block Krylov instead of a Gram eigen-solve). Weights of
    equal shape, device and need are stacked in their tall orientation as one float64 copy (up
    to :data:`BATCH_BYTES` at a time) and solved together.

    Args:
        mats: ``(m, n)`` weights, any floating dtype.
        smallest: per weight, whether ``σmin`` is needed.
        rtol: relative tolerance of each value (κ = σmax/σmin is then within ``2·rtol``).

    Returns:
        Per weight, 0-d float64 ``σmax`` and ``σmin`` (NaN where not asked); a weight with a
        non-finite entry gets ``(inf, 0)``.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 0.5]))
        >>> both, top = weight_extremes_many([w, w], [True, False])
        >>> [round(v.item(), 9) for v in both], round(top[0].item(), 9), top[1].isnan().item()
        ([3.0, 0.5], 3.0, True)
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(mats):
        check_tensor(f"mats[{i}]", m, 2, "weight_extremes_many")
        rows, cols = m.shape[-2], m.shape[-1]
        groups.setdefault((max(rows, cols), min(rows, cols), m.device, bool(smallest[i])), []).append(i)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    out: list[tuple[Tensor, Tensor]] = [(nan, nan)] * len(mats)
    for (_, _, _, need_min), idx in groups.items():
        for run in batches([mats[i].numel() * 8 for i in idx]):
            part = [idx[k] for k in run]
            tall = [mats[i] if mats[i].shape[-2] >= mats[i].shape[-1] else mats[i].mT for i in part]
            stack = float64_stack(tall)
            wide = any(mats[i].dtype == torch.float64 for i in part)
            if wide:
                finite = torch.isfinite(stack).flatten(-2).all(-1)
            else:  # a float64 sum of narrower values cannot overflow: finite iff every entry is
                finite = torch.isfinite(stack.sum((-2, -1)))
            if not bool(finite.all()):
                stack.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            if need_min:
                hi, lo, _, _ = extremal.singular_value_bounds(stack, rtol)
            else:
                hi = extremal.largest_singular_value(stack, rtol)[0]
                lo = torch.full_like(hi, float("nan"))
            hi, lo = hi.masked_fill(~finite, float("inf")), lo.masked_fill(~finite, 0.0)
            del stack
            for k, i in enumerate(part):
                out[i] = (hi[k], lo[k])
    return out


def condition_from_singular_values(s: Tensor) -> Tensor:
    """``κ = σmax/σmin`` from singular values sorted in descending order (last axis).

    Lets callers that already batched one ``svdvals`` call reuse the package's κ convention.

    Args:
        s: ``(..., k)`` descending singular values.

    Returns:
        ``(...)`` tensor (same dtype). σmin = 0 < σmax → ``inf``; all zero → 1.0; non-finite → ``inf``.

    Example:
        >>> condition_from_singular_values(torch.tensor([4.0, 2.0, 0.5])).item()
        8.0
    """
    check_tensor("s", s, 1, "condition_from_singular_values")
    if s.shape[-1] == 0:
        return torch.ones(s.shape[:-1], dtype=s.dtype, device=s.device)
    return safe_ratio(s[..., 0], s[..., -1])


def spectral_norm(w: Tensor) -> Tensor:
    """Spectral norm ``‖W‖₂ = σmax`` of a weight or a batch ``(..., m, n)`` of weights (SPEC §1, §3).

    Batch same-shape weights to pay for one ``svdvals`` call. Computed in float32 (float64 for
    float64 input).

    Args:
        w: ``(m, n)`` or ``(..., m, n)``.

    Returns:
        0-d / ``(...)`` tensor; non-finite weights → ``inf``; an empty matrix → 0.

    Example:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, -5.0]))).item()
        5.0
    """
    s, fin = _svdvals(w, "spectral_norm")
    return torch.where(fin, s[..., 0], float("inf"))


def condition_number(w: Tensor) -> Tensor:
    """Condition number ``κ(W) = σmax/σmin`` over the ``min(m, n)`` singular values (SPEC §3).

    Args:
        w: ``(m, n)`` or a batch ``(..., m, n)`` of same-shape weights (one ``svdvals`` call).

    Returns:
        0-d / ``(...)`` tensor: rank-deficient → ``inf``; zero matrix → 1.0; non-finite → ``inf``.

    Example:
        >>> condition_number(torch.diag(torch.tensor([3.0, -6.0]))).item()
        2.0
    """
    s, fin = _svdvals(w, "condition_number")
    return torch.where(fin, condition_from_singular_values(s), float("inf"))


def _check_wkwq(w_q: Tensor, w_k: Tensor, n_heads: int, fn: str) -> None:
    check_tensor("w_q", w_q, 2, fn)
    check_tensor("w_k", w_k, 2, fn)
    if w_q.dim() != 2 or w_q.shape != w_k.shape:
        raise ValueError(
            f"{fn}: w_q and w_k must be 2-D of equal shape (d_out, d_in), got {tuple(w_q.shape)} "
            f"and {tuple(w_k.shape)}"
        )
    if not isinstance(n_heads, int) or n_heads < 1 or w_q.shape[0] % n_heads != 0:
        raise ValueError(f"{fn}: n_heads={n_heads!r} must be a positive divisor of d_out={w_q.shape[0]}")


def _wkwq_sigma_both(both: Tensor, n_heads: int) -> Tensor:
    """Per matrix and head, the leading singular values of ``W_Q^hᵀ W_K^h``: ``(G, H, r)`` float64.

    ``both`` is ``[W_Q stack, W_K stack]`` (``2G`` checked ``(d_out, d_in)`` weights), a float64
    copy this function may overwrite. With ``(W^h)ᵀ = Q R`` (reduced QR), ``W_Q^hᵀ W_K^h =
    Q_q R_q R_kᵀ Q_kᵀ`` has the singular values of ``R_q R_kᵀ`` (``d_head`` square): one QR call
    factors every query and key head of the stack, one ``svdvals`` call solves every head.
    Heads with a non-finite entry get ``inf``.
    """
    g, d_out, d_in = both.shape[0] // 2, both.shape[1], both.shape[2]
    dh = d_out // n_heads
    both = both.reshape(2 * g, n_heads, dh, d_in).transpose(-1, -2)  # (2G, H, d_in, d_head)
    fin = torch.isfinite(both).flatten(-2).all(-1)
    fin = fin[:g] & fin[g:]
    both = both.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    r = torch.linalg.qr(both, mode="r")[1]
    s = torch.linalg.svdvals(r[:g] @ r[g:].transpose(-1, -2))
    return torch.where(fin.unsqueeze(-1), s, float("inf"))


def _wkwq_sigma(w_q: Tensor, w_k: Tensor, n_heads: int, fn: str) -> Tensor:
    """Per head, the ``r = min(d_head, d_in)`` leading singular values of ``W_Q^hᵀ W_K^h`` (float64)."""
    _check_wkwq(w_q, w_k, n_heads, fn)
    return _wkwq_sigma_both(float64_stack([w_q, w_k]), n_heads)[0]


def _kappa_from_sigma(s: Tensor) -> Tensor:
    return torch.where(torch.isfinite(s).all(-1), condition_from_singular_values(s), float("inf"))


def kappa_wkwq(w_q: Tensor, w_k: Tensor, n_heads: int) -> Tensor:
    """Per-head ``κ(W_Q^hᵀ W_K^h)`` over its ``d_head`` leading singular values (SPEC §8).

    Weight-only (needs no data). Heads are the ``n_heads`` consecutive row blocks of the
    ``nn.Linear``-style weights. The companion :func:`wkwq_norm` gives ``‖W_Q^hᵀ W_K^h‖₂``.

    Args:
        w_q: ``(d_out, d_in)`` query projection weight.
        w_k: ``(d_out, d_in)`` key projection weight (K heads already mapped to query heads).
        n_heads: Number of heads; must divide ``d_out``.

    Returns:
        ``(n_heads,)`` float64: rank-deficient head → ``inf``; zero head → 1.0; non-finite → ``inf``.

    Raises:
        ValueError: On mismatched shapes or a bad ``n_heads``.

    Example:
        >>> w = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> kappa_wkwq(w, w, n_heads=2).tolist()
        [4.0, 1.7777777777777777]
    """
    return _kappa_from_sigma(_wkwq_sigma(w_q, w_k, n_heads, "kappa_wkwq"))


def kappa_wkwq_many(pairs: Sequence[tuple[Tensor, Tensor, int]]) -> list[Tensor]:
    """:func:`kappa_wkwq` of many ``(w_q, w_k, n_heads)`` triples (every block's, after the pass).

    Triples of equal weight shape, ``n_heads`` and device are stacked (up to :data:`BATCH_BYTES`
    of float64 copies at a time): one QR call factors all their query and key heads and one
    ``svdvals`` call solves all their heads, instead of two QR and one ``svdvals`` call per block.
    Each result equals ``kappa_wkwq(w_q, w_k, n_heads)`` (LAPACK still works head by head; the
    same float64 arithmetic).

    Args:
        pairs: ``(w_q, w_k, n_heads)`` as :func:`kappa_wkwq` takes them.

    Returns:
        One ``(n_heads,)`` float64 tensor per triple, in input order.

    Raises:
        ValueError: As :func:`kappa_wkwq`, for any triple.

    Example:
        >>> w = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> [t.tolist() for t in kappa_wkwq_many([(w, w, 2), (w, w, 1)])]
        [[4.0, 1.7777777777777777], [16.0]]
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, (w_q, w_k, n_heads) in enumerate(pairs):
        _check_wkwq(w_q, w_k, n_heads, "kappa_wkwq_many")
        groups.setdefault((tuple(w_q.shape), n_heads, w_q.device), []).append(j)
    out: list[Tensor] = [torch.empty(0)] * len(pairs)
    for (_, n_heads, _), idx in groups.items():
        for run in batches([2 * pairs[j][0].numel() * 8 for j in idx]):  # ≤ BATCH_BYTES of float64
            part = [idx[k] for k in run]
            both = float64_stack([pairs[j][0] for j in part] + [pairs[j][1] for j in part])
            kappa = _kappa_from_sigma(_wkwq_sigma_both(both, n_heads))
            for row, j in zip(kappa, part, strict=True):
                out[j] = row
    return out


def wkwq_norm(w_q: Tensor, w_k: Tensor, n_heads: int) -> Tensor:
    """Per-head spectral norm ``‖W_Q^hᵀ W_K^h‖₂`` (SPEC §8); arguments as :func:`kappa_wkwq`.

    Returns:
        ``(n_heads,)`` float64; non-finite weights → ``inf``.

    Example:
        >>> w = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> wkwq_norm(w, w, n_heads=2).tolist()
        [4.0, 16.0]
    """
    s = _wkwq_sigma(w_q, w_k, n_heads, "wkwq_norm")
    return torch.where(torch.isfinite(s).all(-1), s[..., 0], float("inf"))

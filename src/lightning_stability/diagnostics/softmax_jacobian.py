"""The exact spectral norm of the softmax Jacobian ``‖Diag(p) − ppᵀ‖₂`` (SPEC §1).

The largest eigenvalue of ``J(p) = Diag(p) − ppᵀ`` is the root of a secular equation on
``(p₂, p₁]``, found by Newton's method in float64 at O(n) per row: no eigen-solver, no power
iteration. Shared by :func:`softmax_jacobian_norm` (probabilities given) and the exact stage of
the κ_softmax solver (:mod:`.softmax_solver`, scores given).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor

__all__ = ["softmax_jacobian_norm"]

_F64 = torch.float64
_INF = float("inf")
_NEWTON_FIXED = 4
_NEWTON_MAX = 40
# Newton steps inside the compiled exact solve; attention rows converge in 5–6 (the eager test).
_FUSED_NEWTON = 6


def _secular_lambda(rest: Tensor, p1: Tensor, p2: Tensor, r: Tensor) -> Tensor:
    """Largest eigenvalue of ``Diag(p) − ppᵀ`` (float64, rows of ``rest``).

    ``rest`` is the row with its arg-max entry (value ``p1``) set to zero, ``p2 = max(rest)``,
    ``r = Σ rest`` (the tail mass, used for ``1 − p1``). Solves the pole-removed secular equation
    ``F(λ) = (p1−λ)·Σ p_i²/(λ−p_i) + p1·r − λ = 0`` on ``(p2, p1]`` by Newton from a lower bound
    (see :func:`_lambda_bounds`); F is convex and decreasing there, so the iterates increase
    monotonically to the root.
    """
    lam, lo, hi, tie, one_hot = _secular_start(p1, p2, r)
    if rest.numel() > 0:
        lam = _newton_until_converged(rest, p1, p1 * r, lam, lo, hi, _NEWTON_FIXED, 0)
    return _secular_finish(lam, p1, tie, one_hot)


def _secular_start(p1: Tensor, p2: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Newton's start ``λ₀`` (a lower bound), its clamp interval ``[lo, hi]`` and the special rows.

    ``λ₀`` is the top-2 block's eigenvalue (interlacing: a lower bound; the ``s2`` root, the
    other lower bound of :func:`_lambda_bounds`, saved no iteration on attention rows). Special
    rows (a top-2 tie, or a one-hot row) get a dummy ``p1 + 1`` away from the poles and are set
    by :func:`_secular_finish`.
    """
    lam0 = _block_top(p1 * r, p1 * p2, p2 * (1.0 - p2))
    lam0 = torch.minimum(torch.maximum(lam0, torch.nextafter(p2, p1)), p1)
    tie = (p1 - p2) <= 4.0 * torch.finfo(_F64).eps * p1
    one_hot = p2 <= 0.0
    lam = torch.where(tie | one_hot, p1 + 1.0, lam0)
    return lam, lam, torch.maximum(lam, p1), tie, one_hot


def _secular_finish(lam: Tensor, p1: Tensor, tie: Tensor, one_hot: Tensor) -> Tensor:
    return torch.where(tie, p1, torch.where(one_hot, 0.0, lam))


def _newton_step(rest: Tensor, p1: Tensor, a: Tensor, lam: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """One Newton step on ``F`` (fused to ~11 small ops: the cost at small n is per op):
    ``λ ← λ + F(λ)/(−F'(λ))`` with ``F = (p1−λ)·s1 + a − λ``, ``−F' = 1 + s1 + (p1−λ)·s1'``."""
    t = rest / (lam.unsqueeze(-1) - rest)  # p_i/(λ−p_i): avoids underflow of p_i²
    s1 = torch.linalg.vecdot(rest, t)
    s1p = torch.linalg.vecdot(t, t)
    gap = p1 - lam
    num = torch.addcmul(a - lam, gap, s1)
    den = torch.addcmul(s1 + 1.0, gap, s1p)
    return torch.addcdiv(lam, num, den).clamp_(min=lo, max=hi)


def _newton_until_converged(
    rest: Tensor, p1: Tensor, a: Tensor, lam: Tensor, lo: Tensor, hi: Tensor, fixed: int, done: int
) -> Tensor:
    """Newton steps from ``lam`` (``done`` already taken): the first ``fixed − done`` without a
    test, then until :func:`_converged` (at most ``_NEWTON_MAX`` in all)."""
    for it in range(done + 1, _NEWTON_MAX + 1):
        new = _newton_step(rest, p1, a, lam, lo, hi)
        stop = it >= fixed and _converged(new, lam)
        lam = new
        if stop:
            break
    return lam


def _converged(new: Tensor, old: Tensor) -> bool:
    """Every ``new − old ≤ 4e-16·new`` (two ulps; a host sync, so three cheap ops). One-sided:
    F is convex and decreasing, so Newton from a lower bound only moves up (a step down is
    rounding at the root)."""
    return bool((new * (1.0 - 4e-16)).le_(old).all())


def softmax_jacobian_norm(p: Tensor) -> Tensor:
    """Exact spectral norm ``‖Diag(p) − ppᵀ‖₂`` of the softmax Jacobian, row-wise (SPEC §1).

    Solves the secular equation exactly in float64 (O(n) per row, no eigen-solver, no power
    iteration). ``p`` is a probability vector along the last axis (non-negative). For a row
    summing to 1 within float64 rounding, ``1 − p₁`` is taken as the tail mass ``Σ_{i≠argmax} p_i``
    so near-one-hot rows stay exact; otherwise (e.g. probabilities rounded to half precision)
    the exact norm of the given matrix ``Diag(p) − ppᵀ`` is returned.

    Args:
        p: Probabilities, shape ``(..., n)``, any floating dtype. Zeros (e.g. masked keys) are
            allowed.

    Returns:
        ``(...)`` float64 tensor in ``[0, ½]``. One-hot → 0; a top-2 tie → ``p₁`` (two halves →
        ½, uniform → 1/n); n = 1 → 0; a row containing NaN/Inf → ``inf``.

    Raises:
        ValueError: If ``p`` is not a floating tensor with at least one dimension and n ≥ 1.

    Example:
        >>> p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]], dtype=torch.float64)
        >>> [round(x, 12) for x in softmax_jacobian_norm(p).tolist()]  # 2·p₁p₂ for n = 2
        [0.5, 0.0, 0.42]
    """
    check_tensor("p", p, 1, "softmax_jacobian_norm")
    if p.shape[-1] == 0:
        raise ValueError(f"softmax_jacobian_norm: p must have n >= 1 entries, got shape {tuple(p.shape)}")
    p64 = p.to(_F64)
    bad = ~torch.isfinite(p64).all(-1)
    p64 = torch.where(torch.isfinite(p64), p64, 0.0)
    p1, idx = p64.max(-1, keepdim=True)
    p1 = p1.squeeze(-1)
    rest = p64.scatter(-1, idx, 0.0)
    tail = rest.sum(-1)
    # A normalised row uses the tail mass for 1 − p1 (exact even when p1 rounds to 1); a row that
    # does not sum to 1 (e.g. rounded to half precision) uses 1 − p1 itself: the exact matrix.
    normalised = (p1 + tail - 1.0).abs() <= 4.0 * p.shape[-1] * torch.finfo(_F64).eps
    r = torch.where(normalised, tail, (1.0 - p1).clamp_min(0.0))
    lam = _secular_lambda(rest, p1, rest.amax(-1), r)
    return torch.where(bad, _INF, lam)


def _row_stats(s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exact softmax statistics of the rows of ``s`` (masked entries = -inf, others finite).

    Returns ``(e, p1, p2, r, p_norm, z)``: ``e = exp(s − max)`` with the arg-max entry zeroed,
    ``Z = 1 + Σ e``, ``p1 = 1/Z``, ``p2 = max(e)/Z``, ``r = Σ e/Z`` (the tail mass, exact even when
    ``p1`` rounds to 1), ``p_norm = ‖softmax(s)‖ = √(1 + Σ e²)/Z`` and ``z = Z``.
    """
    mx, idx = s.max(-1, keepdim=True)  # finite: every row has an attended, finite entry
    e = s - mx
    e.exp_()
    e.scatter_(-1, idx, 0.0)
    t = e.sum(-1)
    e2 = e.amax(-1)
    en = torch.linalg.vector_norm(e, dim=-1)
    z = 1.0 + t
    return e, 1.0 / z, e2 / z, t / z, torch.hypot(en, en.new_ones(())) / z, z


def _exact_rows(s_rows: Tensor, masked: bool = True) -> Tensor:
    """Exact ``‖J(P_i)‖₂·‖S_i‖/‖P_i‖`` in float64 for finite rows (masked entries = -inf, only
    when ``masked``)."""
    s64 = s_rows.to(_F64)
    ns = torch.linalg.vector_norm(s64.nan_to_num(neginf=0.0) if masked else s64, dim=-1)
    e, p1, p2, r, pn, z = _row_stats(s64)
    e.div_(z.unsqueeze(-1))
    lam = _secular_lambda(e, p1, p2, r)
    return lam * ns / pn


def _block_top(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Largest eigenvalue of the symmetric 2×2 matrix ``[[a, b], [b, c]]``."""
    return 0.5 * (a + c) + torch.hypot(0.5 * (a - c), b)


def _exact_rows_fused(s_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_exact_rows` as one fixed-shape chain (compiled by :mod:`._compiled`).

    ``s_rows``: rows (converted to float64 here), masked entries -inf, every row with a finite
    maximum. Takes
    ``_FUSED_NEWTON`` Newton steps with no test in between and returns ``(value, λ, converged)``:
    ``converged`` says whether the last step moved every ``λ`` by at most two ulps (the test of
    :func:`_converged`); where it did not, the caller continues with
    :func:`_exact_rows_continue` (data-dependent, so outside the compiled chain).
    """
    s_rows = s_rows.to(_F64)
    ns = torch.linalg.vector_norm(torch.where(s_rows == -_INF, 0.0, s_rows), dim=-1)
    e, p1, p2, r, pn, z = _row_stats(s_rows)
    rest = e / z.unsqueeze(-1)
    lam, lo, hi, tie, one_hot = _secular_start(p1, p2, r)
    a = p1 * r
    prev = lam
    for _ in range(_FUSED_NEWTON):
        prev, lam = lam, _newton_step(rest, p1, a, lam, lo, hi)
    converged = (lam * (1.0 - 4e-16)).le(prev).all()
    return _secular_finish(lam, p1, tie, one_hot) * ns / pn, lam, converged


def _exact_rows_continue(s_rows: Tensor, lam: Tensor) -> Tensor:
    """Eager Newton steps from ``lam`` (after :func:`_exact_rows_fused`) until converged."""
    ns = torch.linalg.vector_norm(s_rows.nan_to_num(neginf=0.0), dim=-1)
    e, p1, p2, r, pn, z = _row_stats(s_rows)
    rest = e.div_(z.unsqueeze(-1))
    _, lo, hi, tie, one_hot = _secular_start(p1, p2, r)
    lam = _newton_until_converged(rest, p1, p1 * r, lam.clamp(lo, hi), lo, hi, 0, _FUSED_NEWTON)
    return _secular_finish(lam, p1, tie, one_hot) * ns / pn

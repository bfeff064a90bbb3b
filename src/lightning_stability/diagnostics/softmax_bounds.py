"""Rigorous bounds ``lo ≤ ‖J(p)‖₂ ≤ hi`` on the softmax Jacobian's spectral norm (SPEC §1).

From a few statistics of a probability row (its largest entry ``p₁``, the tail mass
``r = 1 − p₁``, the second largest ``p₂``, ``s₂ = Σ_{i≠argmax} p_i²``), each known up to an
interval: the κ_softmax solver (:mod:`.softmax_solver`) prunes every row whose upper bound
cannot reach its matrix's best lower bound before solving the survivors exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .softmax_jacobian import _block_top

# A margin given as a number, or as a 0-d tensor (inside a compiled kernel, so that no value is
# baked into its graph).
Margin = float | Tensor


def _lambda_bounds(
    p1_lo: Tensor, p1_hi: Tensor, r_lo: Tensor, r_hi: Tensor,
    p2_lo: Tensor, p2_hi: Tensor, s2_lo: Tensor, s2_hi: Tensor,
) -> tuple[Tensor, Tensor]:
    """Rigorous bounds ``lo ≤ ‖J(p)‖₂ ≤ hi`` from intervals on ``p1 = max p``, the tail mass
    ``r = 1 − p1``, the second largest ``p2`` and ``s2 = Σ_{i≠argmax} p_i²`` (float64).

    Below: the top eigenvalue of the top-2 principal block (interlacing; monotone in p1, r, p2)
    and the root of ``F`` with ``Σ p_i²/(λ−p_i) ≥ s2/λ``. Above: ``p1``, ½, Gershgorin
    ``max_i 2p_i(1−p_i)``, the root of ``F`` with ``Σ p_i²/(λ−p_i) ≤ s2/(λ−p2)``, and the 2×2
    compression ``[[λ_top2, ‖p_top2‖·‖p_tail‖], [·, p2]]`` of the block form of ``J``.
    """
    lo = _block_top(p1_lo * r_lo, p1_lo * p2_lo, p2_lo * (1.0 - p2_lo))
    bh = p1_lo * r_lo - s2_lo
    lo = torch.maximum(lo, 0.5 * (bh + torch.sqrt(bh * bh + 4.0 * p1_lo * s2_lo)))
    bg = p1_hi * r_hi + p2_hi - s2_hi
    cg = p1_hi * (s2_hi - r_hi * p2_hi)
    hi = torch.maximum(0.5 * (bg + torch.sqrt((bg * bg + 4.0 * cg).clamp_min(0.0))), p2_hi)
    top2_hi = _block_top(p1_hi * r_hi, p1_hi * p2_hi, p2_hi * (1.0 - p2_hi))
    # β² = (p1² + x)(s2 − x), x = p2² ∈ [p2_lo², p2_hi²]: maximise the concave quadratic.
    x = ((s2_hi - p1_hi * p1_hi) * 0.5).clamp(min=p2_lo * p2_lo)
    x = torch.minimum(x, torch.minimum(p2_hi * p2_hi, s2_hi))
    beta = ((p1_hi * p1_hi + x) * (s2_hi - x).clamp_min(0.0)).sqrt()
    hi = torch.minimum(hi, _block_top(top2_hi, beta, p2_hi))
    gersh = 2.0 * torch.maximum(p1_hi * r_hi, p2_hi * (1.0 - p2_hi))
    hi = torch.minimum(hi, gersh)
    hi = torch.minimum(hi, p1_hi).clamp_max(0.5)
    return lo, hi


def _widen(
    p1: Tensor, r: Tensor, p2_lo: Tensor, p2_hi: Tensor, s2: Tensor, rel: Margin, eta: Margin
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Intervals around working-precision estimates (relative ``rel``, absolute ``eta`` on r)."""
    up, dn = 1.0 + rel, 1.0 - rel
    return (
        p1 * dn, (p1 * up).clamp_max(1.0),
        (r * dn - eta).clamp_min(0.0), (r * up + eta).clamp(0.0, 1.0),
        p2_lo * dn, (p2_hi * up).clamp_max(0.5),
        s2 * dn, s2 * up,
    )


def _cheap_bounds(
    p1: Tensor, q: Tensor, s2_abs: Tensor, rel: Margin, eta: Margin
) -> tuple[Tensor, Tensor, Tensor]:
    """Rigorous ``lo ≤ ‖J(p)‖₂ ≤ hi`` from working-precision ``p1 = max p`` and ``q = ‖p‖²``.

    ``p1`` is within relative ``rel`` (the tail ``r = 1 − p1`` within ``r·rel + eta``), ``q`` within
    ``s2_abs`` of ``p1² + s2`` (``s2 = Σ_{i≠argmax} p_i²``). Above: ``p1``, ½ and the root of
    ``F`` with ``Σ p_i²/(λ−p_i) ≤ s2/(λ−p2)``, ``p2 ≤ min(p1, r, √s2)`` (Gershgorin's ``2·p1·r``
    pruned no further row on the benchmark's scores). Below: the root of ``F`` with
    ``Σ p_i²/(λ−p_i) ≥ s2/λ``. Both roots as in :func:`_lambda_bounds`, which is monotone in each
    interval end used; ~40 ops, on every row. Also returns the lower end of ``s2`` (for
    :func:`_block_lower_bound`).
    """
    dn, up = 1.0 - rel, 1.0 + rel
    r = 1.0 - p1
    p1l, p1h = p1 * dn, p1 * up
    rl = (r * dn - eta).clamp_min_(0.0)
    rh = r * up + eta
    s2 = (q - p1 * p1).clamp_min_(0.0)
    s2l = (s2 * dn).sub_(s2_abs).clamp_min_(0.0)
    s2h = (s2 * up).add_(s2_abs)
    bh = p1l * rl - s2l
    lo = (bh * bh).addcmul_(p1l, s2l, value=4.0).sqrt_().add_(bh).mul_(0.5)
    p2h = torch.minimum(torch.minimum(p1h, rh), s2h.sqrt()).clamp_max_(0.5)
    bg = torch.addcmul(p2h - s2h, p1h, rh)
    cg = (s2h - rh * p2h).mul_(p1h)
    root = (bg * bg).add_(cg, alpha=4.0).clamp_min_(0.0).sqrt_().add_(bg).mul_(0.5)
    hi = torch.minimum(torch.maximum(root, p2h), p1h).clamp_max_(0.5)
    return lo, hi, s2l


def _block_lower_bound(p1: Tensor, q: Tensor, s2l: Tensor, rel: Margin, eta: Margin, acc: Margin) -> Tensor:
    """Lower bound of ``‖J(p)‖₂``: the top eigenvalue of the top-2 block (interlacing) with
    ``p2 ≥ s2/r`` (as :func:`_lambda_bounds`; inputs as :func:`_cheap_bounds`). On peaked rows it
    is far above the ``s2`` root, and a matrix's best lower bound decides its pruning."""
    dn = 1.0 - rel
    r = 1.0 - p1
    p1l = p1 * dn
    rl = (r * dn - eta).clamp_min_(0.0)
    p2l = s2l / (r + 1e-6 + acc).clamp_max_(1.0)
    p2l = torch.minimum(p2l, torch.minimum(p1, r)).mul_(dn)
    return _block_top(p1l * rl, p1l * p2l, p2l * (1.0 - p2l))

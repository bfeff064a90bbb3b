"""Combined predictor, residual gain and the unified bound (SPEC §4, Theorem 3)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["UnifiedBound", "combined_predictor", "residual_gain", "unified_bound"]

_T = TypeVar("_T", float, Tensor)


def combined_predictor(
    kappa_softmax: _T, kappa_score: _T, kappa_v: _T, wo_norm: _T, kappa_eff: _T, c_ln: _T
) -> _T:
    """Per-block predictor ``κ_softmax·(1+κ_score)·κ_V·‖W_O‖₂ + κ_eff + C_LN`` (SPEC §4, Exp-1 form).

    Elementwise on floats or broadcastable tensors; multiply by ``ε_mach`` for the scaled form.

    Example:
        >>> combined_predictor(0.5, 1.0, 2.0, 3.0, 4.0, 1.0)
        11.0
    """
    return kappa_softmax * (1 + kappa_score) * kappa_v * wo_norm + kappa_eff + c_ln


def residual_gain(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    iters: int = 3,
    generator: torch.Generator | None = None,
) -> float:
    """Power-iteration estimate of ``ρ = ‖J_f(x)‖₂`` of a residual branch (SPEC §4).

    Uses ``torch.func.jvp``/``torch.func.vjp`` (no dense Jacobian); ``iters`` applications of
    ``JᵀJ``, then ``‖J v‖`` for the final unit ``v`` (a lower bound converging to ``σmax``). The
    start vector is drawn from ``generator`` (a fresh generator seeded 0 if ``None``), never from
    the global RNG. Works inside ``torch.no_grad()`` (the transforms ignore the outer no-grad).

    Args:
        f: Function of one tensor, e.g. ``x ↦ block(x) − x``.
        x: The sampled input.
        iters: Number of power iterations (≥ 1).
        generator: RNG for the start vector, on ``x``'s device.

    Returns:
        The estimate as a float (``inf`` if it is not finite; 0 for a zero Jacobian).

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> round(residual_gain(lambda x: x @ a.T, torch.ones(3), iters=30), 4)
        3.0
    """
    if iters < 1:
        raise ValueError(f"residual_gain: iters must be >= 1, got {iters}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"residual_gain: x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    x = x.detach()
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(x.dtype).tiny)
    # torch.func transforms differentiate through the outer no_grad; it only stops a graph
    # being recorded for the parameters of ``f``.
    with warnings.catch_warnings(), torch.no_grad():
        # torch's first forward-AD use loads decompositions via the deprecated torch.jit.script
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        vjp_fn = torch.func.vjp(f, x)[1]
        for _ in range(iters):
            jv = torch.func.jvp(f, (x,), (v,))[1].detach()
            w = vjp_fn(jv)[0].detach()
            nw = torch.linalg.vector_norm(w)
            if not bool(nw > 0):
                return 0.0 if bool(torch.isfinite(nw)) else math.inf
            v = w / nw
        est = float(torch.linalg.vector_norm(torch.func.jvp(f, (x,), (v,))[1].detach()))
    return est if math.isfinite(est) else math.inf


@dataclass(frozen=True)
class UnifiedBound:
    """Theorem 3 of SPEC §4.

    Attributes:
        first_order: ``ε_mach·Σ_ℓ term_ℓ·Π_{k>ℓ}(1+ρ_k)`` (the paper's relaxation).
        rigorous: Same with ``(1+ρ_k)/(1−ρ_k)``; ``inf`` when some ``ρ_k ≥ 1`` enters a product
            (any layer but the first).
        small_gain: ``True`` iff every ``ρ_ℓ < 1`` (otherwise the bound is vacuous).
        per_layer: ``(L,)`` float64 bracket terms ``κ_eff + κ(W_O) + κ_softmax·(1+c·κ_score)·κ_V + C_LN``
            (not yet scaled by ``ε_mach`` nor propagated).
    """

    first_order: float
    rigorous: float
    small_gain: bool
    per_layer: Tensor


def _vec(name: str, x: Sequence[float] | Tensor, n: int | None) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu().reshape(-1)
    if n is not None and t.numel() != n:
        raise ValueError(f"unified_bound: {name} has {t.numel()} layers, expected {n}")
    return t


def unified_bound(
    kappa_eff: Sequence[float] | Tensor,
    kappa_wo: Sequence[float] | Tensor,
    kappa_softmax: Sequence[float] | Tensor,
    kappa_score: Sequence[float] | Tensor,
    kappa_v: Sequence[float] | Tensor,
    c_ln: Sequence[float] | Tensor,
    residual_gain: Sequence[float] | Tensor,
    eps_mach: float,
    c: float = 1.0,
) -> UnifiedBound:
    """Unified forward-error bound of Theorem 3 (SPEC §4) over L layers.

    ``ε_mach·Σ_ℓ [κ_eff,ℓ + κ(W_O,ℓ) + κ_softmax,ℓ·(1 + c·κ_score,ℓ)·κ_V,ℓ + C_LN,ℓ]·Π_{k>ℓ} f(ρ_k)``
    with ``f(ρ) = 1+ρ`` (first order) and ``(1+ρ)/(1−ρ)`` (rigorous).

    Args:
        kappa_eff: Per-layer ``κ_eff`` (length L); the others likewise.
        kappa_wo: Per-layer ``κ(W_O)``.
        kappa_softmax: Per-layer ``κ_softmax``.
        kappa_score: Per-layer ``κ_score``.
        kappa_v: Per-layer ``κ_V``.
        c_ln: Per-layer ``C_LN``.
        residual_gain: Per-layer ``ρ``.
        eps_mach: Unit roundoff.
        c: Absolute constant of the score term.

    Returns:
        :class:`UnifiedBound`. NaN inputs make the affected sums ``inf`` (never NaN); L = 0 → zeros.

    Raises:
        ValueError: If the sequences differ in length.

    Example:
        >>> b = unified_bound([1, 1], [1, 1], [0, 0], [1, 1], [1, 1], [0, 0], [0.5, 0.5], 0.1)
        >>> round(b.first_order, 4), round(b.rigorous, 4), b.small_gain
        (0.5, 0.8, True)
    """
    ke = _vec("kappa_eff", kappa_eff, None)
    n = ke.numel()
    wo = _vec("kappa_wo", kappa_wo, n)
    ks = _vec("kappa_softmax", kappa_softmax, n)
    sc = _vec("kappa_score", kappa_score, n)
    kv = _vec("kappa_v", kappa_v, n)
    cl = _vec("c_ln", c_ln, n)
    rho = _vec("residual_gain", residual_gain, n)
    terms = ke + wo + ks * (1.0 + c * sc) * kv + cl
    terms = torch.where(torch.isnan(terms), math.inf, terms)
    rho_clean = torch.where(torch.isnan(rho), math.inf, rho)
    small_gain = bool((rho_clean < 1.0).all())

    def total(factor: Tensor) -> float:
        # suffix[ℓ] = Π_{k>ℓ} factor_k
        shifted = torch.cat([factor[1:], factor.new_ones(1)]) if n else factor
        suffix = torch.flip(torch.cumprod(torch.flip(shifted, [0]), 0), [0])
        contrib = terms * suffix
        contrib = torch.where(torch.isnan(contrib), math.inf, contrib)
        val = float(eps_mach * contrib.sum())
        return math.inf if math.isnan(val) else val

    first = total(1.0 + rho_clean)
    if n > 1 and bool((rho_clean[1:] >= 1.0).any()):
        rig = math.inf
    else:
        rig = total((1.0 + rho_clean) / (1.0 - rho_clean)) if n > 1 else total(torch.ones_like(rho_clean))
    return UnifiedBound(first_order=first, rigorous=rig, small_gain=small_gain, per_layer=terms)

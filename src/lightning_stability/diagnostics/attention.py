"""Attention diagnostics of SPEC §1 (and the entropy of SPEC §8).

All functions are pure tensor maps: leading dimensions are batch dimensions, the result has
the leading shape and dtype ``float64`` unless stated otherwise. Conventions shared by every
function here:

* ``mask`` is boolean, ``True`` = attended, broadcastable to ``(..., n_q, n_k)``. A masked key
  is not part of its row; a row without any attended key contributes nothing.
* A non-finite value (NaN/±Inf) on an attended position yields ``inf`` for the affected
  element — never an exception and never a NaN that would poison a ``max``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import all_finite, check_mask, check_tensor, safe_ratio
from .linear import extreme_singular_values

__all__ = [
    "AttentionDiagnostics",
    "attention_diagnostics",
    "attention_entropy",
    "attention_logit_max",
    "kappa_score",
    "kappa_softmax",
    "kappa_v",
    "kappa_v_many",
    "softmax_jacobian_norm",
]

_F64 = torch.float64
_INF = float("inf")
# Extra relative safety margin on the (already widened) float32 row bounds used for pruning.
_BOUND_MARGIN = 1e-4
_NEWTON_FIXED = 4
_PHASE15_MIN_ELEMS = 1 << 15
# Candidates per matrix above which the p2-interval bounds (1b) / the candidates' own softmax
# (1.5) run: below, the exact solve of the few candidates is cheaper than ~60 more small ops.
_PHASE1B_MIN_ROWS = 2
_PHASE15_MIN_ROWS = 4
# Elements per gather of candidate rows (phases 1.5 and 2): bounds their float64 temporaries.
_EXACT_ELEMS = 1 << 18
_NEWTON_MAX = 40


# ----------------------------------------------------------------------------------------------
# exact ‖Diag(p) − ppᵀ‖₂ via the secular equation
# ----------------------------------------------------------------------------------------------
def _secular_lambda(rest: Tensor, p1: Tensor, p2: Tensor, r: Tensor) -> Tensor:
    """Largest eigenvalue of ``Diag(p) − ppᵀ`` (float64, rows of ``rest``).

    ``rest`` is the row with its arg-max entry (value ``p1``) set to zero, ``p2 = max(rest)``,
    ``r = Σ rest`` (the tail mass, used for ``1 − p1``). Solves the pole-removed secular equation
    ``F(λ) = (p1−λ)·Σ p_i²/(λ−p_i) + p1·r − λ = 0`` on ``(p2, p1]`` by Newton from a lower bound
    (see :func:`_lambda_bounds`); F is convex and decreasing there, so the iterates increase
    monotonically to the root.
    """
    a = p1 * r
    # Start at the top-2 block's eigenvalue (interlacing: a lower bound). The s2 root, the
    # other lower bound of _lambda_bounds, saved no iteration on attention rows: 8 ops dropped.
    lam0 = _block_top(a, p1 * p2, p2 * (1.0 - p2))
    lam0 = torch.minimum(torch.maximum(lam0, torch.nextafter(p2, p1)), p1)
    tie = (p1 - p2) <= 4.0 * torch.finfo(_F64).eps * p1
    one_hot = p2 <= 0.0
    special = tie | one_hot
    lam = torch.where(special, p1 + 1.0, lam0)  # dummy away from the poles for special rows
    lo = lam  # the lower bound (the dummy for special rows: the clamp keeps them there)
    if rest.numel() > 0:
        hi = torch.maximum(lam, p1)  # p1, or the dummy
        # Newton, fused to ~11 small ops per iteration (the cost at small n is per op):
        # λ ← λ + (F(λ)) / (−F'(λ)) with F = (p1−λ)·s1 + a − λ, −F' = 1 + s1 + (p1−λ)·s1'.
        for it in range(1, _NEWTON_MAX + 1):
            t = rest / (lam.unsqueeze(-1) - rest)  # p_i/(λ−p_i): avoids underflow of p_i²
            s1 = torch.linalg.vecdot(rest, t)
            s1p = torch.linalg.vecdot(t, t)
            gap = p1 - lam
            num = torch.addcmul(a - lam, gap, s1)
            den = torch.addcmul(s1 + 1.0, gap, s1p)
            new = torch.addcdiv(lam, num, den).clamp_(min=lo, max=hi)
            done = it >= _NEWTON_FIXED and _converged(new, lam)
            lam = new
            if done:
                break
    return torch.where(tie, p1, torch.where(one_hot, 0.0, lam))


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


# ----------------------------------------------------------------------------------------------
# helpers for chunked processing over flattened leading dims
# ----------------------------------------------------------------------------------------------
def _expand_rank(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def _take_lead(t: Tensor, lead: tuple[int, ...], g0: int, g1: int) -> Tensor:
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


def _chunk_len(g: int, per_item: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    # Keep the per-chunk temporaries (about four working copies) near one full float32 score
    # tensor, but do not split small problems.
    budget = max(g * per_item // 4, 1 << 20)
    return max(1, min(g, budget // max(per_item, 1)))


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
    p1: Tensor, r: Tensor, p2_lo: Tensor, p2_hi: Tensor, s2: Tensor, rel: float, eta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Intervals around working-precision estimates (relative ``rel``, absolute ``eta`` on r)."""
    up, dn = 1.0 + rel, 1.0 - rel
    return (
        p1 * dn, (p1 * up).clamp_max(1.0),
        (r * dn - eta).clamp_min(0.0), (r * up + eta).clamp(0.0, 1.0),
        p2_lo * dn, (p2_hi * up).clamp_max(0.5),
        s2 * dn, s2 * up,
    )


# Sub-chunk of the row statistics pass (elements): two float32 buffers of 1 MiB stay in cache.
_BUF_ELEMS = 1 << 18
_WORKSPACE = threading.local()
_WORKSPACE_MAX_BYTES = 16 << 20


def _workspace(numel: int, like: Tensor, slot: str, dtype: torch.dtype | None = None) -> Tensor:
    """A flat scratch buffer of ``numel`` elements (``like``'s dtype), reused between calls (CPU).

    ``slot`` names the user: buffers of different slots never alias, so a caller may hold one
    slot's buffer (the scores) while a callee fills another (the row statistics pass).

    A fresh buffer of a megabyte is served by fresh pages (glibc maps blocks of this size
    afresh and returns them when freed): measured at n = 64, the two page-faulting buffers of
    the row statistics pass cost 0.4 ms of its 0.65 ms, more than the softmax inside it. The
    buffer is per thread and never escapes this module (every caller writes it before reading
    and returns fresh tensors), so reusing it changes no result. Other devices allocate as
    before (their caching allocators already reuse memory), and so do buffers above
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


def _row_stats_pass(
    s: Tensor, mask: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One cache-blocked pass over the scores ``s: (G, n_q, n_k)`` (working precision).

    Per row, over the attended keys, with ``P = softmax(S)``: ``‖S_i‖`` (masked entries as 0),
    ``p1 = max P_i``, ``‖P_i‖`` and, with ``want_entropy``, the row entropy (see
    :func:`_row_entropy_terms`). Nothing of the size of ``s`` is allocated: the softmax is
    written into two (three with the entropy) reused buffers of at most ``_BUF_ELEMS`` elements
    (whole matrices, or row blocks of a matrix larger than that), so every reduction reads
    cache-resident data. (The former version wrote a fresh full-size probability tensor and
    took an arg-max over it: ~10× a softmax at n ≥ 256, mostly page faults and the
    index-returning ``max``.)
    """
    s = s.detach()  # the buffers are written with out=, which autograd refuses
    g, nq, nk = s.shape
    per = max(1, min(g, _BUF_ELEMS // max(nq * nk, 1)))  # matrices per block
    rows = nq if per > 1 else max(1, min(nq, _BUF_ELEMS // max(nk, 1)))  # rows of a big matrix
    ns, p1, pn = s.new_empty(g, nq), s.new_empty(g, nq), s.new_empty(g, nq)
    ent = s.new_empty(g, nq) if want_entropy else None
    work = _workspace((3 if want_entropy else 2) * per * rows * nk, s, "pass").view(-1, per, rows, nk)
    off_all = None if mask is None or mask.shape[0] != 1 or rows < nq else ~mask
    for a in range(0, g, per):
        b = min(g, a + per)
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            sc, d, p = s[a:b, r0:r1], work[0, : b - a, : r1 - r0], work[1, : b - a, : r1 - r0]
            if mask is None:
                sm = sc
                torch.linalg.vector_norm(sc, dim=-1, out=ns[a:b, r0:r1])
            else:
                off = off_all
                if off is None:
                    mk = mask if mask.shape[0] == 1 else mask[a:b]
                    off = ~(mk if mk.shape[1] == 1 else mk[:, r0:r1])
                sm = d.copy_(sc).masked_fill_(off, 0.0)
                torch.linalg.vector_norm(sm, dim=-1, out=ns[a:b, r0:r1])
                sm.masked_fill_(off, -_INF)
            torch.ops.aten._softmax.out(sm, -1, False, out=p)
            p1b = p1[a:b, r0:r1]
            torch.amax(p, -1, out=p1b)
            torch.linalg.vector_norm(p, dim=-1, out=pn[a:b, r0:r1])
            if ent is not None:
                w = work[2, : b - a, : r1 - r0]
                ent[a:b, r0:r1] = _row_entropy_terms(sm, d, p, p1b, w, masked=mask is not None)
    return ns, p1, pn, ent


def _row_entropy_terms(
    sm: Tensor, d: Tensor, p: Tensor, p1: Tensor, w: Tensor, masked: bool
) -> Tensor:
    """Row entropies ``−Σ p log p`` from the scores ``sm`` (masked = -inf) and ``p = softmax``.

    Written as ``H = log1p(r/p₁) + Σ p_i·g_i`` with ``g_i = max − s_i ≥ 0`` and the tail mass
    ``r = Σ_{i≠argmax} p_i``: every term is non-negative, so nothing cancels, unlike
    ``LSE − Σ p s`` (which read a true 6.5e-7 nats as 0). For ``p₁ > ½`` the arg-max is unique
    and ``r = Σ_{p<p₁} p`` keeps a tiny tail's relative precision; otherwise ``r = 1 − p₁ ≥ ½``
    is accurate as it stands. The terms come from the working-precision probabilities and
    scores (a few ulps each), so each row's entropy carries a relative error of ~``log₂(n)·u``
    (≈ 1e-6 in float32) however small it is. ``d`` (a buffer, may alias ``sm``) and ``w`` (a
    buffer shaped like ``p``) are overwritten; nothing of ``p``'s size is allocated (seven
    passes over cache-resident data, eight with a mask).
    """
    top = sm.amax(-1, keepdim=True).clamp_(min=torch.finfo(sm.dtype).min)
    torch.sub(top, sm, out=d)  # g ≥ 0, exactly 0 only at the maximal scores
    if masked:
        d.clamp_(max=torch.finfo(sm.dtype).max)  # masked: p = 0, g finite (no 0·inf)
    # Σ_{g>0} p: with p₁ > ½ the maximum is unique, so these are exactly the non-arg-max
    # entries (a float sign() instead of a bool mask: bool kernels are ~5× dearer here).
    tail = torch.mul(torch.sign(d, out=w), p, out=w).sum(-1)
    r = torch.where(p1 > 0.5, tail, 1.0 - p1)
    return torch.log1p(r / p1) + torch.mul(d, p, out=d).sum(-1)


def _gather_rows(s: Tensor, mask: Tensor | None, rows: Tensor) -> Tensor:
    """Rows ``rows`` of ``s: (G, n_q, n_k)`` flattened to ``(G·n_q, n_k)``, masked entries -inf."""
    g, nq, nk = s.shape
    sr = s.reshape(g * nq, nk).index_select(0, rows)
    if mask is None:
        return sr
    gi = rows // nq if mask.shape[0] > 1 else torch.zeros_like(rows)
    qi = rows % nq if mask.shape[1] > 1 else torch.zeros_like(rows)
    return sr.masked_fill(~mask[gi, qi], -_INF)


def _refine_rows(
    s: Tensor, mask: Tensor | None, rows: Tensor, lb: Tensor, ub: Tensor, ratio: Tensor,
    acc: float, margin: float,
) -> tuple[Tensor, Tensor]:
    """Tighter bounds ``(lb, ub)`` for ``rows`` from their own softmax (p2 and the tail mass)."""
    pc = torch.softmax(_gather_rows(s, mask, rows), -1)
    p1c, idx = pc.max(-1, keepdim=True)
    pc.scatter_(-1, idx, 0.0)
    p2c = pc.amax(-1).to(_F64)
    rc = pc.sum(-1).to(_F64)
    s2c = torch.linalg.vecdot(pc, pc).to(_F64)
    del pc
    lo_c, hi_c = _lambda_bounds(*_widen(p1c.squeeze(-1).to(_F64), rc, p2c, p2c, s2c, 1e-4 + 2.0 * acc, 0.0))
    rat_c = ratio[rows]
    lb_c = torch.maximum(lb[rows], lo_c * rat_c * (1.0 - margin))
    return lb_c, torch.minimum(ub[rows], hi_c * rat_c * (1.0 + margin))


def _cheap_bounds(
    p1: Tensor, q: Tensor, s2_abs: Tensor, rel: float, eta: float
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


def _block_lower_bound(p1: Tensor, q: Tensor, s2l: Tensor, rel: float, eta: float, acc: float) -> Tensor:
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


def _candidates(lb: Tensor, ub: Tensor, g: int, nq: int, rows: Tensor | None) -> Tensor:
    """Indices (into ``lb``/``ub``) of rows whose upper bound reaches their matrix's best lower
    bound; ``rows`` gives each entry's flat row (None: entry ``i`` is row ``i`` of ``(g, nq)``).
    Where some lower bound is > 0 this drops every row with ``ub = 0`` (e.g. ``‖S_i‖ = 0``);
    where all are 0 (all-zero scores, or ``‖S_i‖²`` underflowing) every valid row stays.
    """
    if rows is None:
        return (ub.view(g, nq) >= lb.view(g, nq).amax(-1, keepdim=True)).view(-1).nonzero().squeeze(-1)
    grp = rows // nq
    best = torch.zeros(g, dtype=lb.dtype, device=lb.device).scatter_reduce_(0, grp, lb, "amax")
    return (ub >= best[grp]).nonzero().squeeze(-1)


def _softmax_chunk(
    s: Tensor, mask: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """kappa_softmax (and mean row entropy) for ``s: (G, n_q, n_k)``; ``mask: (G|1, n_q|1, n_k)``.

    Phase 1a (all rows, from one cache-blocked pass in working precision): rigorous cheap bounds
    on each row's ``λ·‖S_i‖/‖P_i‖``; 1b (candidates, when many): the top-2 block lower bound;
    1.5 (candidates, when still many and long): bounds from their own softmax (p2 and the tail);
    2 (float64, exact, in bounded batches): only rows whose upper bound reaches the largest
    lower bound of their matrix.
    """
    g, nq, nk = s.shape
    ns, p1, pn, h_rows = _row_stats_pass(s, mask, want_entropy)
    fin = ns < _INF  # ‖S_i‖ ≥ 0: False exactly for inf and NaN (a compare, not isfinite's 3 ops)
    valid = None if mask is None else mask.any(-1).expand(g, nq)
    ok = fin if valid is None else valid & fin
    entropy: Tensor | None = None
    if h_rows is not None:
        h_row = torch.where(ok & torch.isfinite(h_rows), h_rows.clamp_min(0.0), 0.0).to(_F64)
        entropy = h_row.sum(-1) / (nq if valid is None else valid.sum(-1).clamp_min(1))
    # Working-precision sums over n terms (the softmax's normaliser, both norms) are within
    # n·u of exact whatever the summation order: widen every relative bound by twice that.
    acc = 2.0 * nk * torch.finfo(s.dtype).eps / 2
    margin = _BOUND_MARGIN + 2.0 * acc
    # Phase 1a (all rows, ~40 ops): bounds from p1 and ‖P‖ (see _cheap_bounds).
    p1d, pnd = p1.to(_F64), pn.to(_F64)
    qd, ratio = pnd.square(), ns.to(_F64).div_(pnd)
    s2_abs = (4e-6 + 2.0 * acc) * qd  # cancellation in q − p1²
    rel, eta = 1e-5 + acc, 2e-6 + acc
    lb, ub, s2l = _cheap_bounds(p1d, qd, s2_abs, rel, eta)
    lb, ub = lb.mul_(ratio).mul_(1.0 - margin), ub.mul_(ratio).mul_(1.0 + margin)
    every = valid is None and bool(fin.all())  # every row attended and finite (one sync)
    if not every:
        lb, ub = torch.where(ok, lb, 0.0), torch.where(ok, ub, -1.0)
    lb, ub = lb.reshape(-1), ub.reshape(-1)
    rows = _candidates(lb, ub, g, nq, None)
    # Phase 1b (candidates only): the top-2 block lower bound raises each matrix's best.
    if rows.numel() > _PHASE1B_MIN_ROWS * g and rows.numel() * nk > _PHASE15_MIN_ELEMS:
        p1c, qc, s2c = p1d.reshape(-1)[rows], qd.reshape(-1)[rows], s2l.reshape(-1)[rows]
        lo_c = _block_lower_bound(p1c, qc, s2c, rel, eta, acc)
        lb_c = torch.maximum(lb[rows], lo_c.mul_(ratio.reshape(-1)[rows]).mul_(1.0 - margin))
        lb[rows] = lb_c
        rows = rows[_candidates(lb_c, ub[rows], g, nq, rows)]
    batch = max(1, _EXACT_ELEMS // nk)  # rows per gather: temporaries stay O(_EXACT_ELEMS)
    # Phase 1.5: on those rows, p2 and the tail mass from P itself (float32, one gather).
    # Worth its ~50 small ops only once the exact solve's element work would dominate.
    if rows.numel() > _PHASE15_MIN_ROWS * g and rows.numel() * nk > _PHASE15_MIN_ELEMS:
        ratio_f = ratio.reshape(-1)
        parts = [
            _refine_rows(s, mask, rows[a : a + batch], lb, ub, ratio_f, acc, margin)
            for a in range(0, rows.numel(), batch)
        ]
        lb_c, ub_c = torch.cat([b[0] for b in parts]), torch.cat([b[1] for b in parts])
        rows = rows[_candidates(lb_c, ub_c, g, nq, rows)]
    # Phase 2: exact float64 solve on the surviving rows.
    out = torch.zeros(g, dtype=_F64, device=s.device)
    for a in range(0, rows.numel(), batch):
        rb = rows[a : a + batch]
        vals = _exact_rows(_gather_rows(s, mask, rb), masked=mask is not None)
        out.scatter_reduce_(0, rb // nq, vals, reduce="amax")
    if not every:
        bad = ~fin.all(-1)
        out = torch.where(bad, _INF, out)
        if entropy is not None:
            entropy = torch.where(bad, _INF, entropy)
    return out, entropy


def _prep_mask(mask: Tensor | None, shape: tuple[int, ...], fn: str) -> Tensor | None:
    if mask is None:
        return None
    check_mask(mask, shape, fn)
    return _expand_rank(mask, len(shape))


def kappa_softmax(scores: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
    """Softmax amplification ``max_i ‖J(P_i)‖₂·‖S_i‖/‖P_i‖`` per score matrix (SPEC §1).

    ``P = softmax(S)`` row-wise over the attended keys; ``‖J(P_i)‖₂`` is exact (secular equation,
    probabilities in float64). Rows whose cheap bounds cannot reach the running maximum are
    pruned, so the result is the exact maximum at a fraction of an eigen-solver's cost.

    Args:
        scores: Scores ``S``, shape ``(..., n_q, n_k)``, any floating dtype.
        mask: Optional boolean keep-mask broadcastable to ``scores``.
        chunk_size: Number of flattened leading elements processed at once (default: bounded so
            temporaries stay near the size of one float32 copy of ``scores``).

    Returns:
        ``(...)`` float64. Fully masked matrix → 0; a row with a NaN/Inf attended score, or with
        an attended score whose square overflows the working precision (float32, or float64 for
        float64 input), → ``inf``.

    Raises:
        ValueError: On a non-boolean or non-broadcastable ``mask`` or a scores tensor with < 2 dims.

    Example:
        >>> kappa_softmax(torch.zeros(3, 3)).item()  # ‖S_i‖ = 0
        0.0
        >>> s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # row 2: 2·p₁p₂·‖S₂‖/‖P₂‖
        >>> round(kappa_softmax(s).item(), 4)
        0.5048
    """
    fn = "kappa_softmax"
    check_tensor("scores", scores, 2, fn)
    shape = tuple(scores.shape)
    m = _prep_mask(mask, shape, fn)
    lead, (nq, nk) = shape[:-2], shape[-2:]
    g = math.prod(lead)
    work = _F64 if scores.dtype == _F64 else torch.float32
    out = torch.zeros(g, dtype=_F64, device=scores.device)
    if nq == 0 or nk == 0 or g == 0:
        return out.reshape(lead)
    # The blocked pass allocates nothing of the scores' size, so scores that need no conversion
    # (working dtype, contiguous: each chunk is a view) are processed in one chunk; splitting
    # them only repeats the per-chunk op overhead (4 chunks at n = 256 cost 2 ms of 5.5 ms).
    if chunk_size is None and scores.dtype == work and scores.is_contiguous():
        step = g
    else:
        step = _chunk_len(g, nq * nk, chunk_size)
    for g0 in range(0, g, step):
        g1 = min(g, g0 + step)
        s = _take_lead(scores, lead, g0, g1).to(work)
        mc = None if m is None else _take_lead(m, lead, g0, g1)
        out[g0:g1] = _softmax_chunk(s, mc, want_entropy=False)[0]
    return out.reshape(lead)


# ----------------------------------------------------------------------------------------------
# kappa_score, kappa_v, entropy
# ----------------------------------------------------------------------------------------------
def _masked_norms(
    q: Tensor, k: Tensor, qk: Tensor, mask: Tensor | None, rows2: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``‖Q_act‖, ‖K_act‖, ‖(QKᵀ)_attended‖`` in float64 (q, k already in float64 or work dtype).

    ``rows2``: the squared row norms of q and k in float64, if the caller has them already.
    """
    qn2, kn2 = rows2 if rows2 is not None else (q.to(_F64).square().sum(-1), k.to(_F64).square().sum(-1))
    if mask is None:
        sn = torch.linalg.vector_norm(qk, dim=(-2, -1)).to(_F64)
    else:
        qn2 = qn2 * mask.any(-1)
        kn2 = kn2 * mask.any(-2)
        sn = torch.linalg.vector_norm(torch.where(mask, qk, 0.0), dim=(-2, -1)).to(_F64)
    return qn2.sum(-1).sqrt(), kn2.sum(-1).sqrt(), sn


def kappa_score(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """Score conditioning ``‖Q‖·‖K‖/‖QKᵀ‖`` (Frobenius) per head (SPEC §1); ≥ 1, scale-free.

    With a mask, ``‖QKᵀ‖`` is taken over attended entries only and query rows with no attended
    key (and keys attended by no query) drop out of ``‖Q‖`` (``‖K‖``); the ratio stays ≥ 1.

    Args:
        q: Queries ``(..., n_q, d)``.
        k: Keys ``(..., n_k, d)`` with leading dims broadcast-compatible with ``q``.
        mask: Optional boolean keep-mask broadcastable to ``(..., n_q, n_k)``.

    Returns:
        ``(...)`` float64. ``‖QKᵀ‖ = 0`` with ``‖Q‖‖K‖ > 0`` (orthogonal Q, K) → ``inf``; 0/0 (zero
        Q or K, or nothing attended) → 1.0; non-finite input → ``inf``.

    Raises:
        ValueError: On mismatched shapes or a bad mask.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(kappa_score(q, q).item(), 4)  # ‖I‖·‖I‖/‖I‖ = √2
        1.4142
    """
    fn = "kappa_score"
    check_tensor("q", q, 2, fn)
    check_tensor("k", k, 2, fn)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in the last dim")
    try:
        lead = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    except RuntimeError as err:
        raise ValueError(
            f"{fn}: leading dims of q {tuple(q.shape)} and k {tuple(k.shape)} do not broadcast"
        ) from err
    target = (*lead, q.shape[-2], k.shape[-2])
    m = _prep_mask(mask, target, fn)
    q64, k64 = q.to(_F64), k.to(_F64)
    fin = torch.isfinite(q64).flatten(-2).all(-1) & torch.isfinite(k64).flatten(-2).all(-1)
    q64 = torch.where(torch.isfinite(q64), q64, 0.0)
    k64 = torch.where(torch.isfinite(k64), k64, 0.0)
    qn, kn, sn = _masked_norms(q64, k64, q64 @ k64.transpose(-1, -2), m)
    return torch.where(fin, safe_ratio(qn * kn, sn), _INF)


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
        keys = _expand_rank(key_mask, v.dim() - 1).expand(v.shape[:-1])
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
                parts.append(_expand_rank(km, vs[i].dim() - 1).expand(vs[i].shape[:-1]).reshape(-1, n))
            keys = torch.cat(parts)
        kap = kappa_v(torch.cat(flat), ridge, key_mask=keys)
        start = 0
        for i, f in zip(idx, flat, strict=True):
            out[i] = kap[start : start + f.shape[0]].reshape(vs[i].shape[:-2])
            start += f.shape[0]
    return out


def attention_entropy(p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean row entropy ``−Σ p log p`` of attention probabilities (entropy collapse, SPEC §8).

    Args:
        p: Probabilities ``(..., n_q, n_k)``.
        mask: Optional boolean keep-mask; masked entries are ignored.

    Returns:
        ``(...)`` float64, natural log, ``0·log 0 = 0``; mean over rows with ≥ 1 attended key
        (no such row → 0); a NaN/Inf attended probability → ``inf``.

    Raises:
        ValueError: On < 2 dims or a bad mask.

    Example:
        >>> round(attention_entropy(torch.full((2, 4), 0.25)).item(), 4)  # log 4
        1.3863
    """
    fn = "attention_entropy"
    check_tensor("p", p, 2, fn)
    shape = tuple(p.shape)
    m = _prep_mask(mask, shape, fn)
    p64 = p.to(_F64)
    if m is not None:
        p64 = torch.where(m, p64, 0.0)
        valid = m.any(-1).expand(shape[:-1])
    else:
        valid = torch.ones(shape[:-1], dtype=torch.bool, device=p.device)
    fin = torch.isfinite(p64).flatten(-2).all(-1)
    h = -torch.special.xlogy(p64, p64).sum(-1)
    h = torch.where(valid, h, 0.0)
    out = h.sum(-1) / valid.sum(-1).clamp_min(1)
    return torch.where(fin, out, _INF)


# ----------------------------------------------------------------------------------------------
# one entry point for the monitor
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionDiagnostics:
    """Per-head attention diagnostics, each a ``(B, H)`` float64 tensor (SPEC §1, §8).

    Attributes:
        kappa_score: ``‖Q‖‖K‖/‖QKᵀ‖`` over attended entries; NaN where Q and K are not known
            (a call recorded from its scores only).
        kappa_softmax: ``max_i ‖J(P_i)‖₂·‖S_i‖/‖P_i‖``.
        kappa_v: ``σmax(V)/(σmin(V)+1e-6)`` over the rows of attended keys.
        entropy: Mean row entropy of ``P``, from a cancellation-free form (relative error
            ~1e-6 per row however small the entropy).
        logit_max: ``max |scale·q·kᵀ + bias|`` over query rows and attended keys, before any
            soft-capping (for a scores-only call: ``max |S|`` over attended entries), exact in
            float64 for the given inputs; 0 for a fully masked head.
    """

    kappa_score: Tensor
    kappa_softmax: Tensor
    kappa_v: Tensor
    entropy: Tensor
    logit_max: Tensor


def _check_bias(bias: Tensor | None, target: tuple[int, int, int, int], fn: str) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        raise ValueError(
            f"{fn}: bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias).__name__)}"
        )
    try:
        ok = bias.dim() <= 4 and tuple(torch.broadcast_shapes(tuple(bias.shape), target)) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: bias of shape {tuple(bias.shape)} is not broadcastable to {target}")
    return _expand_rank(bias, 4)


def _logit_max_exact(
    qc: Tensor, kc: Tensor, s: Tensor, mc: Tensor | None, sc: float, bc: Tensor | None,
    rows2: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``max |sc·q·kᵀ + b|`` over attended entries, per chunk element, exact in float64.

    ``s`` holds the same logits in working precision. Entries within a rigorous bound of the
    working-precision maximum (``(d+4)·u·(|sc|·max‖q‖·max‖k‖ + max|b|)``, doubled) are recomputed
    in float64; the maximum of those is the exact one.
    """
    c, nq, nk = s.shape
    a = None
    if mc is None:  # two reductions instead of a full-size |s|
        row_top = torch.maximum(s.amax(-1), s.amin(-1).neg_())
    else:
        a = torch.abs(s, out=_workspace(s.numel(), s, "abs").view_as(s)).masked_fill_(~mc, -1.0)
        row_top = a.amax(-1)  # (c, n_q); -1 for a row without attended keys
    top = row_top.amax(-1)
    out = torch.zeros(c, dtype=_F64, device=s.device)
    if a is not None and not bool((top >= 0).any()):  # unmasked: top ≥ 0 (or NaN → inf below)
        return torch.where(torch.isfinite(top), out, _INF)
    u = torch.finfo(s.dtype).eps
    if rows2 is None:
        rows2 = (qc.to(_F64).square().sum(-1), kc.to(_F64).square().sum(-1))
    qn, kn = rows2[0].amax(-1).sqrt(), rows2[1].amax(-1).sqrt()  # largest row norms
    bound = (qn * kn).mul_(abs(sc))
    if bc is not None:
        bound.add_(bc.abs().to(_F64).flatten(1).amax(-1).expand(c))
    tol = bound.mul_(2.0 * (qc.shape[-1] + 4) * u).add_(torch.finfo(_F64).tiny)
    thr = (top.to(_F64) - tol).clamp_min(0.0).view(c, 1)
    cand = row_top.to(_F64) >= thr
    if a is not None:
        cand &= row_top >= 0  # a row without attended keys reads -1
    g, i = cand.nonzero().unbind(1)  # candidate rows
    rows = (s[g, i].abs() if a is None else a[g, i]).to(_F64)  # (m, n_k)
    cand = rows >= thr[g]
    if a is not None:
        cand &= rows >= 0
    gg, jj = cand.nonzero().unbind(1)
    g, i = g[gg], i[gg]
    val = torch.linalg.vecdot(qc[g, i].to(_F64), kc[g, jj].to(_F64)) * sc
    if bc is not None:
        val = val + bc.expand(c, nq, nk)[g, i, jj].to(_F64)
    out.scatter_reduce_(0, g, val.abs(), reduce="amax")
    return torch.where(torch.isfinite(top), out, _INF)


def _check_qkv(
    q: Tensor | None, k: Tensor | None, v: Tensor, scores: Tensor | None, fn: str
) -> tuple[int, int, int, int]:
    """Validate shapes; return ``(B, H, n_q, n_k)``."""
    named = [(n, t) for n, t in (("q", q), ("k", k), ("v", v), ("scores", scores)) if t is not None]
    check_tensor("v", v, 0, fn)
    for name, t in named:
        check_tensor(name, t, 4, fn)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (B, H, n, ·), got shape {tuple(t.shape)}")
    if (q is None) != (k is None):
        raise ValueError(f"{fn}: give both q and k, or neither (with scores)")
    if q is None and scores is None:
        raise ValueError(f"{fn}: needs q and k, or scores")
    bsz, nh, nk = v.shape[0], v.shape[1], v.shape[2]
    nq = scores.shape[2] if scores is not None else q.shape[2]  # type: ignore[union-attr]
    ok = True
    if q is not None and k is not None:
        ok = q.shape[:2] == (bsz, nh) and k.shape[:3] == (bsz, nh, nk) and k.shape[3] == q.shape[3]
        ok = ok and q.shape[2] == nq
    if scores is not None:
        ok = ok and tuple(scores.shape) == (bsz, nh, nq, nk)
    if not ok:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)
        raise ValueError(
            f"{fn}: inconsistent shapes {shapes}; expected q (B,H,n_q,d), k (B,H,n_k,d), "
            "v (B,H,n_k,d_v), scores (B,H,n_q,n_k)"
        )
    return bsz, nh, nq, nk


def attention_diagnostics(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    bias: Tensor | None = None,
    *,
    softcap: float | None = None,
    scores: Tensor | None = None,
    chunk_size: int | None = None,
) -> AttentionDiagnostics:
    """All per-head attention diagnostics of one attention call (SPEC §1, §8).

    The softmax input is ``S = c·tanh(L/c)`` with ``L = scale·QKᵀ + bias`` when ``softcap = c``
    is given (Gemma-2 style soft-capping), else ``S = L``; or ``S = scores`` when the softmax
    input itself is given (attention written out by hand). ``S`` is formed once per chunk of
    (batch, head) pairs and reused for every diagnostic; temporaries stay near one float32 copy
    of the scores.

    Args:
        q: ``(B, H, n_q, d)``, or ``None`` with ``scores`` (then ``kappa_score`` is NaN: unknown).
        k: ``(B, H, n_k, d)`` (K/V heads already mapped to query heads), or ``None`` like ``q``.
        v: ``(B, H, n_k, d_v)``.
        mask: Optional boolean keep-mask broadcastable to ``(B, H, n_q, n_k)``. Pass masking here,
            not as a large negative ``bias`` (a huge finite bias overflows ``S²`` → ``inf``).
        scale: Score scale, default ``1/√d`` (ignored with ``scores``).
        bias: Optional finite additive float bias broadcastable to the scores, added before the
            soft-capping (ignored with ``scores``).
        softcap: Soft-capping constant ``c > 0`` (ignored with ``scores``).
        scores: The softmax input ``(B, H, n_q, n_k)``; when given it is used as ``S`` directly and
            ``q``/``k`` (if given) serve ``kappa_score`` only.
        chunk_size: Number of (b, h) pairs per chunk (default: automatic).

    Returns:
        :class:`AttentionDiagnostics` of ``(B, H)`` float64 tensors, with the degenerate values of
        :func:`kappa_score`, :func:`kappa_softmax`, :func:`kappa_v` and :func:`attention_entropy`
        (fully masked head: kappa_softmax 0, entropy 0, kappa_score 1, logit_max 0; non-finite
        scores → inf). ``kappa_v`` counts only the rows of keys some query attends.

    Raises:
        ValueError: On inconsistent shapes, a bad mask, a non-float bias or a non-positive softcap.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
        >>> d = attention_diagnostics(q, k, v)
        >>> tuple(d.kappa_softmax.shape), bool((d.kappa_score >= 1).all())
        ((2, 3), True)
    """
    fn = "attention_diagnostics"
    bsz, nh, nq, nk = _check_qkv(q, k, v, scores, fn)
    # A diagnostic builds no graph (and the blocked pass writes its buffers with out=).
    v = v.detach()
    q, k, scores = (None if t is None else t.detach() for t in (q, k, scores))
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{fn}: softcap must be a finite number > 0, got {softcap}")
    target = (bsz, nh, nq, nk)
    m = _prep_mask(mask, target, fn)
    bz = _check_bias(bias, target, fn) if scores is None else None
    bz = None if bz is None else bz.detach()
    sc = 1.0
    if scores is None:
        assert q is not None
        sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lead = (bsz, nh)
    g = bsz * nh
    dtypes = [t.dtype for t in (q, k, scores) if t is not None]
    work = _F64 if _F64 in dtypes else torch.float32
    ks = torch.full((g,), math.nan if q is None else 1.0, dtype=_F64, device=v.device)
    ksm = torch.zeros(g, dtype=_F64, device=v.device)
    ent = torch.zeros_like(ksm)
    lmax = torch.zeros_like(ksm)
    keys = None if m is None else m.any(-2)
    kv = kappa_v(v, key_mask=keys).expand(lead).reshape(g)
    step = _chunk_len(g, nq * nk, chunk_size) if g > 0 else 1
    for g0 in range(0, g if nq > 0 and nk > 0 else 0, step):
        g1 = min(g, g0 + step)
        mc = None if m is None else _take_lead(m, lead, g0, g1)
        if q is not None and k is not None:
            qc = _take_lead(q, lead, g0, g1).to(work)
            kc = _take_lead(k, lead, g0, g1).to(work)
            # Into a reused buffer: nothing returned aliases the scores.
            buf = _workspace((g1 - g0) * nq * nk, qc, "scores").view(g1 - g0, nq, nk)
            s = torch.matmul(qc, kc.transpose(-1, -2), out=buf)
            rows2 = (qc.to(_F64).square().sum(-1), kc.to(_F64).square().sum(-1))  # shared
            qn, kn, sn = _masked_norms(qc, kc, s, mc, rows2)
            # Common case in one host sync: finite q, k (their squared norms sum finite) and
            # 0 < ‖QKᵀ‖ < inf, where safe_ratio is a plain division. (‖QKᵀ‖ can overflow float32
            # with q, k finite: then safe_ratio gives inf, a division would give 0.)
            if bool(torch.isfinite(rows2[0].sum() + rows2[1].sum()) & ((sn > 0) & (sn < _INF)).all()):
                ks[g0:g1] = qn * kn / sn
            elif all_finite(qc, kc):
                ks[g0:g1] = safe_ratio(qn * kn, sn)
            else:
                fin = torch.isfinite(qc).flatten(1).all(-1) & torch.isfinite(kc).flatten(1).all(-1)
                ks[g0:g1] = torch.where(fin, safe_ratio(qn * kn, sn), _INF)
        if scores is None:
            s.mul_(sc)
            bc = None if bz is None else _take_lead(bz, lead, g0, g1).to(work)
            if bc is not None:
                s.add_(bc)
            lmax[g0:g1] = _logit_max_exact(qc, kc, s, mc, sc, bc, rows2)
            if softcap is not None:
                s.div_(softcap).tanh_().mul_(softcap)
        else:
            s = _take_lead(scores, lead, g0, g1).to(work)
            a = s.abs() if mc is None else s.abs().masked_fill(~mc, 0.0)
            top = a.flatten(1).amax(-1).to(_F64)
            lmax[g0:g1] = torch.where(torch.isfinite(top), top, _INF)
        kap, h = _softmax_chunk(s, mc, want_entropy=True)
        ksm[g0:g1] = kap
        assert h is not None
        ent[g0:g1] = h
    return AttentionDiagnostics(
        kappa_score=ks.reshape(lead),
        kappa_softmax=ksm.reshape(lead),
        kappa_v=kv.reshape(lead),
        entropy=ent.reshape(lead),
        logit_max=lmax.reshape(lead),
    )


def attention_logit_max(
    q: Tensor, k: Tensor, mask: Tensor | None = None, scale: float | None = None, bias: Tensor | None = None
) -> Tensor:
    """Per head ``max |scale·q·kᵀ + bias|`` over query rows and attended keys, ``(B, H)`` float64.

    The attention-logit size Megatron's QK-clip watches (τ = 100) and Wortsman et al. (2023)
    saw pass ~1e4 before divergence. The same value as :attr:`AttentionDiagnostics.logit_max`
    (exact in float64: the candidates of the working-precision maximum are recomputed in
    float64); 0 for a head with no attended entry.

    Args:
        q: ``(B, H, n_q, d)``.
        k: ``(B, H, n_k, d)``.
        mask: Optional boolean keep-mask broadcastable to ``(B, H, n_q, n_k)``.
        scale: Score scale, default ``1/√d``.
        bias: Optional additive float bias broadcastable to the scores.

    Example:
        >>> q = torch.tensor([[[[1.0, 0.0]]]]); k = torch.tensor([[[[-3.0, 0.0], [2.0, 0.0]]]])
        >>> attention_logit_max(q, k, scale=1.0).tolist()
        [[3.0]]
    """
    fn = "attention_logit_max"
    check_tensor("q", q, 4, fn)
    check_tensor("k", k, 4, fn)
    bsz, nh, nq, d = q.shape
    target = (bsz, nh, nq, k.shape[2])
    if k.dim() != 4 or k.shape[:2] != (bsz, nh) or k.shape[3] != d or q.dim() != 4:
        raise ValueError(f"{fn}: inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    m = _prep_mask(mask, target, fn)
    bz = _check_bias(bias, target, fn)
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = _F64 if _F64 in (q.dtype, k.dtype) else torch.float32
    lead, g = (bsz, nh), bsz * nh
    out = torch.zeros(g, dtype=_F64, device=q.device)
    if g == 0 or nq == 0 or k.shape[2] == 0:
        return out.reshape(lead)
    step = _chunk_len(g, nq * k.shape[2], None)
    for g0 in range(0, g, step):
        g1 = min(g, g0 + step)
        qc = _take_lead(q, lead, g0, g1).to(work)
        kc = _take_lead(k, lead, g0, g1).to(work)
        s = (qc @ kc.transpose(-1, -2)).mul_(sc)
        bc = None if bz is None else _take_lead(bz, lead, g0, g1).to(work)
        if bc is not None:
            s.add_(bc)
        mc = None if m is None else _take_lead(m, lead, g0, g1)
        out[g0:g1] = _logit_max_exact(qc, kc, s, mc, sc, bc)
    return out.reshape(lead)

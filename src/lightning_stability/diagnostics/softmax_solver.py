"""The κ_softmax solver: ``max_i ‖J(P_i)‖₂·‖S_i‖/‖P_i‖`` per score matrix, exact (SPEC §1).

One cache-blocked pass over the scores gives every row's softmax statistics in working
precision (and, for :func:`~.attention.attention_diagnostics`, the row entropies); rigorous
bounds (:mod:`.softmax_bounds`) then prune every row that cannot reach its matrix's maximum,
in stages of growing cost, and only the surviving rows are solved exactly in float64
(:mod:`.softmax_jacobian`). The result is the exact maximum at a fraction of an eigen-solver's
cost.

Where :mod:`._compiled` allows it, the same stages run as two compiled kernels: the row pass with
every bound on every row (:func:`_fused_rows`), and the exact solve of the survivors with a
fixed number of Newton steps; only the data-dependent steps (which rows survive, their gather)
run eagerly between them. Both paths give the exact maximum (docs/compiled.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_tensor
from ._chunks import chunk_len, prep_mask, take_lead, workspace
from ._compiled import Kernel, constant
from .softmax_bounds import _block_lower_bound, _cheap_bounds, _lambda_bounds, _widen
from .softmax_jacobian import _exact_rows, _exact_rows_continue, _exact_rows_fused

__all__ = ["kappa_softmax"]

_F64 = torch.float64
_INF = float("inf")
# Extra relative safety margin on the (already widened) float32 row bounds used for pruning.
_BOUND_MARGIN = 1e-4
_STAGED_MIN_ELEMS = 1 << 15
# Candidates per matrix above which the p2-interval bounds (1b) / the candidates' own softmax
# (1.5) run: below, the exact solve of the few candidates is cheaper than ~60 more small ops.
_BLOCK_BOUND_MIN_ROWS = 2
_REFINE_MIN_ROWS = 4
# Elements per gather of candidate rows (refining and exact stages): bounds their float64 temporaries.
_EXACT_ELEMS = 1 << 18
# Sub-chunk of the row statistics pass (elements): two float32 buffers of 1 MiB stay in cache.
_BUF_ELEMS = 1 << 18


def _row_stats_pass(
    s: Tensor, mask: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One cache-blocked pass over the scores ``s: (G, n_q, n_k)`` (working precision).

    Per row, over the attended keys, with ``P = softmax(S)``: ``‖S_i‖`` (masked entries as 0),
    ``p1 = max P_i``, ``‖P_i‖`` and, with ``want_entropy``, the row entropy (see
    :func:`_row_entropy_terms`). Nothing of the size of ``s`` is allocated: the softmax is
    written into two (three with the entropy) reused buffers of at most ``_BUF_ELEMS`` elements
    (whole matrices, or row blocks of a matrix larger than that), so every reduction reads
    cache-resident data. (A full-size probability tensor with an arg-max over it costs ~10× a
    softmax at n ≥ 256, mostly page faults and the index-returning ``max``.)
    """
    s = s.detach()  # the buffers are written with out=, which autograd refuses
    g, nq, nk = s.shape
    per = max(1, min(g, _BUF_ELEMS // max(nq * nk, 1)))  # matrices per block
    rows = nq if per > 1 else max(1, min(nq, _BUF_ELEMS // max(nk, 1)))  # rows of a big matrix
    ns, p1, pn = s.new_empty(g, nq), s.new_empty(g, nq), s.new_empty(g, nq)
    ent = s.new_empty(g, nq) if want_entropy else None
    work = workspace((3 if want_entropy else 2) * per * rows * nk, s, "pass").view(-1, per, rows, nk)
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
    s: Tensor, mask: Tensor | None, rows: Tensor, lb: Tensor | None, ub: Tensor | None,
    ratio: Tensor | None, acc: float, margin: float,
) -> tuple[Tensor, Tensor]:
    """Tighter bounds ``(lb, ub)`` for ``rows`` from their own softmax (p2 and the tail mass).

    ``lb``, ``ub``, ``ratio``: the rows' current bounds and ``‖S_i‖/‖P_i‖``; ``None``: no bounds
    yet, and the ratio is taken from the rows themselves."""
    sr = _gather_rows(s, mask, rows)
    pc = torch.softmax(sr, -1)
    if ratio is None:
        ns = torch.linalg.vector_norm(sr if mask is None else sr.nan_to_num(neginf=0.0), dim=-1)
        ratio = ns.to(_F64) / torch.linalg.vector_norm(pc, dim=-1).to(_F64)
    del sr
    p1c, idx = pc.max(-1, keepdim=True)
    pc.scatter_(-1, idx, 0.0)
    p2c = pc.amax(-1).to(_F64)
    rc = pc.sum(-1).to(_F64)
    s2c = torch.linalg.vecdot(pc, pc).to(_F64)
    del pc
    lo_c, hi_c = _lambda_bounds(*_widen(p1c.squeeze(-1).to(_F64), rc, p2c, p2c, s2c, 1e-4 + 2.0 * acc, 0.0))
    lo_c, hi_c = lo_c * ratio * (1.0 - margin), hi_c * ratio * (1.0 + margin)
    if lb is None or ub is None:
        return lo_c, hi_c
    return torch.maximum(lb, lo_c), torch.minimum(ub, hi_c)


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

    The compiled path (:func:`_softmax_chunk_compiled`) where :mod:`._compiled` allows it, else
    the eager one (:func:`_softmax_chunk_eager`); both give the exact maximum. Scores in float64
    (reference use) and dimensions of size 1 (e.g. a single query) take the eager path.
    """
    # Float32 only, and no dimension of size 1 (it would compile a graph of its own).
    if s.dtype == torch.float32 and min(s.shape) > 1 and _ROWS.wanted(s.device):
        out = _softmax_chunk_compiled(s.contiguous(), mask, want_entropy)
        if out is not None:
            return out
    with _ROWS.eager():
        return _softmax_chunk_eager(s, mask, want_entropy)


def _softmax_chunk_eager(
    s: Tensor, mask: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """kappa_softmax (and mean row entropy) for ``s: (G, n_q, n_k)``; ``mask: (G|1, n_q|1, n_k)``.

    In stages of growing cost per row: cheap bounds (all rows, from one cache-blocked pass in
    working precision): rigorous bounds on each row's ``λ·‖S_i‖/‖P_i‖``; block bound
    (candidates, when many): the top-2 block lower bound; refining (candidates, when still many
    and long): bounds from their own softmax (p2 and the tail); exact (float64, in bounded
    batches): only rows whose upper bound reaches the largest lower bound of their matrix.
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
    every = valid is None and bool(fin.all())  # every row attended and finite (one sync)
    rows = _surviving_rows(s, mask, ns, p1, pn, None if every else ok)
    # Exact stage: float64 solve on the surviving rows.
    out = torch.zeros(g, dtype=_F64, device=s.device)
    batch = max(1, _EXACT_ELEMS // nk)  # rows per gather: temporaries stay O(_EXACT_ELEMS)
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


def _surviving_rows(
    s: Tensor, mask: Tensor | None, ns: Tensor, p1: Tensor, pn: Tensor, ok: Tensor | None
) -> Tensor:
    """Flat indices of the rows of ``s: (G, n_q, n_k)`` whose bounds do not rule them out.

    ``ns``, ``p1``, ``pn``: each row's ``‖S_i‖``, ``max P_i`` and ``‖P_i‖`` (working precision);
    ``ok``: the rows that are attended and finite (``None``: all of them).
    """
    g, nq, nk = s.shape
    # Working-precision sums over n terms (the softmax's normaliser, both norms) are within
    # n·u of exact whatever the summation order: widen every relative bound by twice that.
    acc = 2.0 * nk * torch.finfo(s.dtype).eps / 2
    margin = _BOUND_MARGIN + 2.0 * acc
    # Cheap bounds (all rows, ~40 ops): from p1 and ‖P‖ (see _cheap_bounds).
    p1d, pnd = p1.to(_F64), pn.to(_F64)
    qd, ratio = pnd.square(), ns.to(_F64).div_(pnd)
    s2_abs = (4e-6 + 2.0 * acc) * qd  # cancellation in q − p1²
    rel, eta = 1e-5 + acc, 2e-6 + acc
    lb, ub, s2l = _cheap_bounds(p1d, qd, s2_abs, rel, eta)
    lb, ub = lb.mul_(ratio).mul_(1.0 - margin), ub.mul_(ratio).mul_(1.0 + margin)
    if ok is not None:
        lb, ub = torch.where(ok, lb, 0.0), torch.where(ok, ub, -1.0)
    lb, ub = lb.reshape(-1), ub.reshape(-1)
    rows = _candidates(lb, ub, g, nq, None)
    # Block bound (candidates only): the top-2 block lower bound raises each matrix's best.
    if rows.numel() > _BLOCK_BOUND_MIN_ROWS * g and rows.numel() * nk > _STAGED_MIN_ELEMS:
        p1c, qc, s2c = p1d.reshape(-1)[rows], qd.reshape(-1)[rows], s2l.reshape(-1)[rows]
        lo_c = _block_lower_bound(p1c, qc, s2c, rel, eta, acc)
        lb_c = torch.maximum(lb[rows], lo_c.mul_(ratio.reshape(-1)[rows]).mul_(1.0 - margin))
        lb[rows] = lb_c
        rows = rows[_candidates(lb_c, ub[rows], g, nq, rows)]
    batch = max(1, _EXACT_ELEMS // nk)  # rows per gather: temporaries stay O(_EXACT_ELEMS)
    # Refining: on those rows, p2 and the tail mass from P itself (float32, one gather).
    # Worth its ~50 small ops only once the exact solve's element work would dominate.
    if rows.numel() > _REFINE_MIN_ROWS * g and rows.numel() * nk > _STAGED_MIN_ELEMS:
        ratio_f = ratio.reshape(-1)
        parts = []
        for a in range(0, rows.numel(), batch):
            rb = rows[a : a + batch]
            parts.append(_refine_rows(s, mask, rb, lb[rb], ub[rb], ratio_f[rb], acc, margin))
        lb_c, ub_c = torch.cat([b[0] for b in parts]), torch.cat([b[1] for b in parts])
        rows = rows[_candidates(lb_c, ub_c, g, nq, rows)]
    return rows


def _fused_rows(
    s: Tensor, mask: Tensor | None, acc: Tensor, full: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The bound stages of :func:`_softmax_chunk_eager` for every row at once, as one fixed-shape chain.

    One pass over each row of ``s: (G, n_q, n_k)`` (working precision; compiled, it reads the
    scores once and allocates nothing of their size) gives, with ``g = max − s ≥ 0`` and
    ``e = exp(−g)``: ``‖S_i‖``, ``Z = Σe`` and ``Σe²``, so ``p₁ = 1/Z`` and ``‖P‖² = Σe²/Z²``;
    from these, on every row, the cheap bounds and the top-2 block bound of the eager
    stages, with their error margins (``acc``: the working precision's ``n_k·ε`` as a 0-d
    float64 tensor, so no size is baked into the graph). With ``full`` (the entropy is wanted,
    or short rows, where the exact solve of extra candidates costs more than the pass) also the
    tail ``T = Σ_{g>0} e``, ``Σ_{g>0} e²``, ``max_{g>0} e``, the number of maximal entries and
    ``Σ e·g``: the tail mass ``r``, ``p₂`` and ``s₂`` (exact ties counted), the interval bounds of the
    refining stage on every row, and the entropy.

    Returns ``(candidates, bad, entropy)``: the rows whose upper bound reaches their matrix's
    best lower bound ``(G, n_q)``, the matrices with a non-finite attended row ``(G,)``, and
    (with ``full``, else ``None``) the mean row entropy ``(G,)`` float64 in the cancellation-free
    form of :func:`_row_entropy_terms`: ``H = log1p(r/p₁) + Σ p·g`` with ``r/p₁ = T``
    (``p₁ > ½``) or ``Z − 1``. (One graph serves ``kappa_softmax`` and ``attention_diagnostics``.)
    """
    g_, nq = s.shape[0], s.shape[1]
    s0 = s if mask is None else torch.where(mask, s, 0.0)
    sm = s if mask is None else torch.where(mask, s, -_INF)
    ns = s0.square().sum(-1).sqrt()  # ‖S_i‖, masked entries as 0; inf when a square overflows
    gap = sm.amax(-1, keepdim=True) - sm  # masked: +inf (e = 0)
    e = torch.exp(-gap)
    z, e2 = e.sum(-1), e.square().sum(-1)
    z64 = z.to(_F64)
    p1, q = 1.0 / z64, e2.to(_F64) / (z64 * z64)
    rel, eta = 1e-5 + acc, 2e-6 + acc
    lb, ub, s2l = _cheap_bounds(p1, q, (4e-6 + 2.0 * acc) * q, rel, eta)
    lb = torch.maximum(lb, _block_lower_bound(p1, q, s2l, rel, eta, acc))
    if full:
        ep = torch.where(gap > 0, e, 0.0)
        tail = ep.sum(-1)
        ties = (gap == 0).sum(-1).to(_F64) - 1.0  # further maximal entries (exact float ties)
        r = (tail.to(_F64) + ties) / z64
        p2 = torch.where(ties > 0, p1, ep.amax(-1).to(_F64) / z64)
        s2 = (ep.square().sum(-1).to(_F64) + ties) / (z64 * z64)
        lo3, hi3 = _lambda_bounds(*_widen(p1, r, p2, p2, s2, 1e-4 + 2.0 * acc, 0.0))
        lb, ub = torch.maximum(lb, lo3), torch.minimum(ub, hi3)
    ratio = ns.to(_F64) / q.sqrt()
    margin = _BOUND_MARGIN + 2.0 * acc
    fin = ns < _INF
    valid = fin.new_ones(()) if mask is None else mask.any(-1).expand(g_, nq)
    ok = fin & valid
    lb = torch.where(ok, lb * ratio * (1.0 - margin), 0.0)
    ub = torch.where(ok, ub * ratio * (1.0 + margin), -1.0)
    cand = ub >= lb.amax(-1, keepdim=True)
    bad = ~fin.all(-1)
    entropy = None
    if full:
        eg = torch.where(e > 0, e * gap, 0.0).sum(-1)
        h = torch.log1p(torch.where(z < 2.0, tail, z - 1.0)) + eg / z
        h64 = torch.where(ok & torch.isfinite(h), h.clamp_min(0.0), 0.0).to(_F64)
        mean = h64.mean(-1) if mask is None else h64.sum(-1) / valid.to(_F64).sum(-1).clamp_min(1.0)
        entropy = torch.where(bad, _INF, mean)
    return cand, bad, entropy


# No vectorised loop tails: measured, a third less compile time (cold cache), same speed.
_ROWS = Kernel(_fused_rows, "softmax_rows", {"cpp.enable_loop_tail_vec": False})
_EXACT = Kernel(_exact_rows_fused, "softmax_exact", {"cpp.enable_loop_tail_vec": False})
# Rows up to this length get every bound in the pass (``full``); longer rows the lean pass,
# whose four reductions cost about one softmax (measured: 1.05× at n = 256 and 1024, against
# 1.5× with the refining statistics), and their few candidates the eager refining stage.
_FULL_MAX_NK = 128


def _softmax_chunk_compiled(
    s: Tensor, mask: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor | None] | None:
    """:func:`_softmax_chunk_eager` with its fixed-shape chains compiled: the row pass and the
    bounds in one kernel, the exact float64 solve of the surviving rows in another (a fixed
    number of Newton steps, continued eagerly in the rare case they do not converge). The
    data-dependent steps (which rows survive, their gather, the refining stage for long rows) run eagerly
    between them. ``None`` when the row kernel could not be compiled (the caller then runs the
    eager path)."""
    full = want_entropy or s.shape[-1] <= _FULL_MAX_NK
    got = _ROWS(s.detach(), mask, _row_margin(s), full)
    if got is None:
        return None
    cand, bad, entropy = got
    return _finish_rows(s, mask, cand, bad, entropy if want_entropy else None, full)


def _row_margin(s: Tensor) -> Tensor:
    """The row kernel's ``acc`` for scores ``s``: ``n_k·ε`` of their dtype, a cached 0-d tensor."""
    return constant(s.shape[-1] * torch.finfo(s.dtype).eps, _F64, s.device)


def _finish_rows(
    s: Tensor, mask: Tensor | None, cand: Tensor, bad: Tensor, entropy: Tensor | None, full: bool
) -> tuple[Tensor, Tensor | None]:
    """The data-dependent rest of the compiled path after the row kernel (:func:`_fused_rows`):
    the refining stage for long rows, then the exact solve of the surviving rows."""
    g, nq, nk = s.shape
    rows = cand.view(-1).nonzero().squeeze(-1)
    if not full and rows.numel() > _REFINE_MIN_ROWS * g and rows.numel() * nk > _STAGED_MIN_ELEMS:
        rows = _refine_candidates(s, mask, rows, nk * torch.finfo(s.dtype).eps)
    out = torch.zeros(g, dtype=_F64, device=s.device)
    batch = max(2, _EXACT_ELEMS // nk)  # rows per gather: temporaries stay O(_EXACT_ELEMS)
    for a in range(0, rows.numel(), batch):
        rb = rows[a : a + batch]
        vals = _exact_solve(_gather_rows(s, mask, rb))
        out.scatter_reduce_(0, rb // nq, vals, reduce="amax")
    return torch.where(bad, _INF, out), entropy


def _refine_candidates(s: Tensor, mask: Tensor | None, rows: Tensor, acc: float) -> Tensor:
    """The refining stage of the eager path on candidate ``rows`` of ``s`` (their own softmax: p₂ and the
    tail mass), after the lean pass; the rows that survive it."""
    g, nq, nk = s.shape
    margin = _BOUND_MARGIN + 2.0 * acc
    batch = max(1, _EXACT_ELEMS // nk)
    parts = [
        _refine_rows(s, mask, rows[a : a + batch], None, None, None, acc, margin)
        for a in range(0, rows.numel(), batch)
    ]
    lb, ub = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return rows[_candidates(lb, ub, g, nq, rows)]


def _exact_solve(sr: Tensor) -> Tensor:
    """Exact values of the rows ``sr`` (masked entries -inf) by the compiled float64 solve
    (called on the compiled path, so the row kernel's decision holds; eager if this kernel
    cannot be compiled)."""
    if sr.shape[0] < 2 or sr.shape[1] < 2 or _EXACT.stats.broken is not None:
        return _exact_rows(sr)  # size 1 would compile a graph of its own
    got = _EXACT(sr)
    if got is None:
        return _exact_rows(sr)
    vals, lam, converged = got
    return vals if bool(converged) else _exact_rows_continue(sr.to(_F64), lam)


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
    m = prep_mask(mask, shape, fn)
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
        step = chunk_len(g, nq * nk, chunk_size)
    for g0 in range(0, g, step):
        g1 = min(g, g0 + step)
        s = take_lead(scores, lead, g0, g1).to(work)
        mc = None if m is None else take_lead(m, lead, g0, g1)
        out[g0:g1] = _softmax_chunk(s, mc, want_entropy=False)[0]
    return out.reshape(lead)

"""Per-call attention diagnostics of SPEC §1 (and the entropy of SPEC §8).

``κ_score``, the attention-logit maximum, the row entropy, and :func:`attention_diagnostics`,
which forms a call's scores once per chunk of (batch, head) pairs and derives every diagnostic
from them (κ_softmax with the solver of :mod:`.softmax_solver`; κ_V from
:mod:`.value_conditioning`).

All functions are pure tensor maps: leading dimensions are batch dimensions, the result has
the leading shape and dtype ``float64`` unless stated otherwise. Conventions shared by every
function here (and by :func:`~.softmax_solver.kappa_softmax`):

* ``mask`` is boolean, ``True`` = attended, broadcastable to ``(..., n_q, n_k)``. A masked key
  is not part of its row; a row without any attended key contributes nothing.
* A non-finite value (NaN/±Inf) on an attended position yields ``inf`` for the affected
  element — never an exception and never a NaN that would poison a ``max``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import all_finite, check_tensor, safe_ratio
from ._chunks import chunk_len, expand_rank, prep_mask, take_lead, workspace
from .softmax_solver import _softmax_chunk
from .value_conditioning import kappa_v

__all__ = [
    "AttentionDiagnostics",
    "attention_diagnostics",
    "attention_entropy",
    "attention_logit_max",
    "kappa_score",
]

_F64 = torch.float64
_INF = float("inf")


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
    m = prep_mask(mask, target, fn)
    q64, k64 = q.to(_F64), k.to(_F64)
    fin = torch.isfinite(q64).flatten(-2).all(-1) & torch.isfinite(k64).flatten(-2).all(-1)
    q64 = torch.where(torch.isfinite(q64), q64, 0.0)
    k64 = torch.where(torch.isfinite(k64), k64, 0.0)
    qn, kn, sn = _masked_norms(q64, k64, q64 @ k64.transpose(-1, -2), m)
    return torch.where(fin, safe_ratio(qn * kn, sn), _INF)


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
    m = prep_mask(mask, shape, fn)
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
        logit_max: ``max |S|`` over query rows and attended keys: the largest logit the softmax
            sees, after the soft-capping when there is one (``c·tanh(m/c)`` of the exact
            ``m = max |scale·q·kᵀ + bias|``: the cap is monotone); for a scores-only call
            ``max |S|`` over attended entries. Exact in float64 for the given inputs; 0 for a
            fully masked head.
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
    return expand_rank(bias, 4)


def _logit_max_exact(
    qc: Tensor, kc: Tensor, s: Tensor, mc: Tensor | None, sc: float, bc: Tensor | None,
    rows2: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``max |sc·q·kᵀ + b|`` over attended entries, per chunk element, exact in float64.

    ``s`` holds the same logits in working precision. Entries within a rigorous bound of the
    working-precision maximum (``(d+4)·u·(|sc|·max‖q‖·max‖k‖ + max|b|)``, doubled) are recomputed
    in float64; the maximum of those is the exact one.
    """
    a = None
    if mc is None:  # two reductions instead of a full-size |s|
        row_top = torch.maximum(s.amax(-1), s.amin(-1).neg_())
    else:
        a = torch.abs(s, out=workspace(s.numel(), s, "abs").view_as(s)).masked_fill_(~mc, -1.0)
        row_top = a.amax(-1)  # (c, n_q); -1 for a row without attended keys
    top = row_top.amax(-1)
    if a is not None and not bool((top >= 0).any()):  # unmasked: top ≥ 0 (or NaN → inf below)
        return torch.where(torch.isfinite(top), torch.zeros(s.shape[0], dtype=_F64, device=s.device), _INF)
    if rows2 is None:
        rows2 = (qc.to(_F64).square().sum(-1), kc.to(_F64).square().sum(-1))
    thr = _logit_threshold(top, rows2, sc, bc, 2.0 * (qc.shape[-1] + 4) * torch.finfo(s.dtype).eps)
    return _logit_from_candidates(qc, kc, s, a, mc, sc, bc, row_top, top, thr)


def _logit_threshold(
    top: Tensor, rows2: tuple[Tensor, Tensor], sc: float | Tensor, bc: Tensor | None, coef: float | Tensor
) -> Tensor:
    """``(c, 1)`` float64: entries of ``|S|`` below it cannot be the exact maximum (``coef``:
    ``2(d+4)·ε`` of the working precision)."""
    qn, kn = rows2[0].amax(-1).sqrt(), rows2[1].amax(-1).sqrt()  # largest row norms
    bound = qn * kn * (sc.abs() if isinstance(sc, Tensor) else abs(sc))
    if bc is not None:
        bound = bound + bc.abs().to(_F64).flatten(1).amax(-1).expand(top.shape[0])
    tol = bound * coef + torch.finfo(_F64).tiny
    return (top.to(_F64) - tol).clamp_min(0.0).view(-1, 1)


def _logit_from_candidates(
    qc: Tensor, kc: Tensor, s: Tensor, a: Tensor | None, mc: Tensor | None, sc: float,
    bc: Tensor | None, row_top: Tensor, top: Tensor, thr: Tensor,
) -> Tensor:
    """The exact maximum from the candidate entries (``≥ thr``), recomputed in float64.
    ``a``: ``|s|`` with masked entries −1 (``None``: taken from ``s`` and ``mc`` here)."""
    c, nq, nk = s.shape
    out = torch.zeros(c, dtype=_F64, device=s.device)
    cand = row_top.to(_F64) >= thr
    if mc is not None:
        cand &= row_top >= 0  # a row without attended keys reads -1
    g, i = cand.nonzero().unbind(1)  # candidate rows
    if a is not None:
        rows = a[g, i].to(_F64)  # (m, n_k)
    else:
        rows = s[g, i].abs().to(_F64)
        if mc is not None:
            rows = rows.masked_fill_(~mc.expand(c, nq, nk)[g, i], -1.0)
    cand = rows >= thr[g]
    if mc is not None:
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
    m = prep_mask(mask, target, fn)
    bz = _check_bias(bias, target, fn) if scores is None else None
    bz = None if bz is None else bz.detach()
    sc = 1.0
    if scores is None:
        assert q is not None
        sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lead = (bsz, nh)
    g = bsz * nh
    dtypes = [t.dtype for t in (q, k, scores) if t is not None]
    chunk = _Chunk(q, k, scores, m, bz, sc, softcap, lead, _F64 if _F64 in dtypes else torch.float32)
    ks = torch.full((g,), math.nan if q is None else 1.0, dtype=_F64, device=v.device)
    ksm = torch.zeros(g, dtype=_F64, device=v.device)
    ent = torch.zeros_like(ksm)
    lmax = torch.zeros_like(ksm)
    keys = None if m is None else m.any(-2)
    kv = kappa_v(v, key_mask=keys).expand(lead).reshape(g)
    step = chunk_len(g, nq * nk, chunk_size) if g > 0 else 1
    for g0 in range(0, g if nq > 0 and nk > 0 else 0, step):
        g1 = min(g, g0 + step)
        mc = None if m is None else take_lead(m, lead, g0, g1)
        s, ks_c, lmax[g0:g1] = chunk.scores(g0, g1, mc)
        kap, h = _softmax_chunk(s, mc, want_entropy=True)
        if ks_c is not None:
            ks[g0:g1] = ks_c
        ksm[g0:g1] = kap
        assert h is not None
        ent[g0:g1] = h
    if softcap is not None and scores is None:  # the logit the softmax sees: capped (monotone in |L|)
        lmax = softcap * torch.tanh(lmax / softcap)
    return AttentionDiagnostics(
        kappa_score=ks.reshape(lead),
        kappa_softmax=ksm.reshape(lead),
        kappa_v=kv.reshape(lead),
        entropy=ent.reshape(lead),
        logit_max=lmax.reshape(lead),
    )


@dataclass(frozen=True)
class _Chunk:
    """The checked, detached inputs of :func:`attention_diagnostics`, cut into chunks of
    (batch, head) pairs (``lead`` flattened) in the working dtype ``work``."""

    q: Tensor | None
    k: Tensor | None
    given: Tensor | None  # the softmax input, when the call was recorded from its scores
    mask: Tensor | None
    bias: Tensor | None
    scale: float
    softcap: float | None
    lead: tuple[int, int]
    work: torch.dtype

    def scores(self, g0: int, g1: int, mc: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """The softmax input ``S`` of pairs ``g0:g1`` (working precision), their ``κ_score``
        (``None`` without Q/K) and their exact logit maximum."""
        lead, work = self.lead, self.work
        ks: Tensor | None = None
        if self.q is not None and self.k is not None:
            qc = take_lead(self.q, lead, g0, g1).to(work)
            kc = take_lead(self.k, lead, g0, g1).to(work)
            nq, nk = qc.shape[-2], kc.shape[-2]
            # Into a reused buffer: nothing returned aliases the scores.
            buf = workspace((g1 - g0) * nq * nk, qc, "scores").view(g1 - g0, nq, nk)
            s = torch.matmul(qc, kc.transpose(-1, -2), out=buf)
            rows2 = (qc.to(_F64).square().sum(-1), kc.to(_F64).square().sum(-1))  # shared
            ks = _kappa_score_chunk(qc, kc, s, mc, rows2)
        if self.given is None:
            s.mul_(self.scale)
            bc = None if self.bias is None else take_lead(self.bias, lead, g0, g1).to(work)
            if bc is not None:
                s.add_(bc)
            lmax = _logit_max_exact(qc, kc, s, mc, self.scale, bc, rows2)
            if self.softcap is not None:
                s.div_(self.softcap).tanh_().mul_(self.softcap)
            return s, ks, lmax
        s = take_lead(self.given, lead, g0, g1).to(work)
        a = s.abs() if mc is None else s.abs().masked_fill(~mc, 0.0)
        top = a.flatten(1).amax(-1).to(_F64)
        return s, ks, torch.where(torch.isfinite(top), top, _INF)


def _kappa_score_chunk(
    qc: Tensor, kc: Tensor, s: Tensor, mc: Tensor | None, rows2: tuple[Tensor, Tensor]
) -> Tensor:
    """``κ_score`` of a chunk from its unscaled ``s = q kᵀ`` and the squared row norms ``rows2``."""
    qn, kn, sn = _masked_norms(qc, kc, s, mc, rows2)
    # Common case in one host sync: finite q, k (their squared norms sum finite) and
    # 0 < ‖QKᵀ‖ < inf, where safe_ratio is a plain division. (‖QKᵀ‖ can overflow float32
    # with q, k finite: then safe_ratio gives inf, a division would give 0.)
    if bool(torch.isfinite(rows2[0].sum() + rows2[1].sum()) & ((sn > 0) & (sn < _INF)).all()):
        return qn * kn / sn
    if all_finite(qc, kc):
        return safe_ratio(qn * kn, sn)
    fin = torch.isfinite(qc).flatten(1).all(-1) & torch.isfinite(kc).flatten(1).all(-1)
    return torch.where(fin, safe_ratio(qn * kn, sn), _INF)


def attention_logit_max(
    q: Tensor, k: Tensor, mask: Tensor | None = None, scale: float | None = None, bias: Tensor | None = None
) -> Tensor:
    """Per head ``max |scale·q·kᵀ + bias|`` over query rows and attended keys, ``(B, H)`` float64.

    The attention-logit size Megatron's QK-clip watches (τ = 100) and Wortsman et al. (2023)
    saw pass ~1e4 before divergence. The same value as :attr:`AttentionDiagnostics.logit_max`
    of a call without soft-capping (exact in float64: the candidates of the working-precision
    maximum are recomputed in float64); 0 for a head with no attended entry.

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
    m = prep_mask(mask, target, fn)
    bz = _check_bias(bias, target, fn)
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = _F64 if _F64 in (q.dtype, k.dtype) else torch.float32
    lead, g = (bsz, nh), bsz * nh
    out = torch.zeros(g, dtype=_F64, device=q.device)
    if g == 0 or nq == 0 or k.shape[2] == 0:
        return out.reshape(lead)
    step = chunk_len(g, nq * k.shape[2], None)
    for g0 in range(0, g, step):
        g1 = min(g, g0 + step)
        qc = take_lead(q, lead, g0, g1).to(work)
        kc = take_lead(k, lead, g0, g1).to(work)
        s = (qc @ kc.transpose(-1, -2)).mul_(sc)
        bc = None if bz is None else take_lead(bz, lead, g0, g1).to(work)
        if bc is not None:
            s.add_(bc)
        mc = None if m is None else take_lead(m, lead, g0, g1)
        out[g0:g1] = _logit_max_exact(qc, kc, s, mc, sc, bc)
    return out.reshape(lead)

"""The balanced-mass factor θ(p) and the exact ∞→1 norm of the softmax Jacobian (SPEC §8).

Emadi 2026 ("Exact attention sensitivity and the geometry of Transformer stability",
arXiv 2602.18849) states ``‖J_softmax(u/τ)‖_{∞→1} = θ(p)/τ`` with the *balanced-mass factor*

    θ(p) = 4m(1 − m),   m = the mass Σ_{i∈S} p_i of the subset S of the row closest to ½.

Why: for ``x ∈ {±1}ⁿ`` with ``S = {x_i = +1}`` and ``Σp = 1``, ``(Diag(p) − ppᵀ)x`` has entries
``2p_i(1−m)`` on S and ``−2p_i m`` off S, so ``‖Jx‖₁ = 4m(1−m)``; the maximum of the convex map
``x ↦ ‖Jx‖₁`` over the cube is at a vertex. θ ∈ [0, 1]; θ = 1 iff some subset holds exactly half
the mass, and θ is small only when one key holds almost all of it. ``1 − θ = (2d)²`` with
``d = min_S |m_S − ½|``.

Finding d is the number-partitioning (subset-sum) problem, NP-hard in general. The method here
is exact for the rows attention produces, and says so per row. Every row gets two numbers:

* **θ (lower bound, achieved):** ``4m(1−m)`` of the best *explicit* subset found;
* **upper (rigorous):** from a lower bound ``d_lo ≤ d`` that no subset can beat;

and is flagged ``exact`` when ``upper − θ ≤ atol`` (default 1e-12). Stages, each run only on
the rows not yet settled (so the cost follows the hard rows):

1. *Greedy partition + best exchange* (O(n log n), all rows): entries in descending order to
   the lighter side, then the best single exchange ``p_l − p_i ≈ ½ − m`` found by binary
   search (three rounds of it in a later stage). On long diffuse rows this reaches
   ``d ≲ 2·p_max/n²``: θ within 1e-12 of 1.
   *Subset sizes*: a k-subset has mass in ``[L_k, U_k]`` (k smallest, k largest, both achieved);
   if ½ lies in none, the nearest end is exact (near-uniform rows).
2. *Top entries enumerated, tail as a block* (meet-in-the-middle over the ``2·b`` largest
   entries, ``b = 4``): every subset sum lies in some ``[a_A, a_A + T]`` (A a top-subset, T the
   tail mass); if ½ lies in none, the nearest interval end — itself a subset sum — is exact
   (peaked rows, ``p_max ≥ ½``, rows with ≤ 8 non-zero entries). Otherwise ``d_lo = 0``, and
   tail prefixes (steps ≤ the smallest top entry) and a few tail prefixes completed by the
   closest top-subset give achieved sums.
3. *Karmarkar–Karp differencing* (O(n²), rows with n ≤ 256): short diffuse rows.
4. Stage 2 again with ``b = 8, 10`` and ``half_bits`` on what is left; rows with
   ≤ ``2·half_bits`` non-zero entries are always exact (full enumeration).

Measured on ``softmax(s·N(0,1))`` rows (``examples/benchmarks/bench_theta.py``): 100 % exact
rows at n = 1024 (s = 0.1, 1, 4); at n = 65 100 % (s = 4), 99.95 % (s = 1) and 99.3 % (s = 0.1,
near-uniform attention as at initialisation), the rest with ``upper − θ ≤ 1e-9``. Everything
is float64; "exact" is up to the float64 rounding of the subset sums (≈1e-16), the
probabilities taken as given. The mask zeroes masked entries; rows are **not** renormalised
(for ``Σp ≠ 1`` θ is ``4m(1−m)`` of the given entries, which is the ∞→1 norm only when the
row sums to 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_mask, check_tensor

__all__ = [
    "BalancedMass",
    "balanced_mass_per_head",
    "softmax_jacobian_inf1_norm",
    "theta_balanced_mass",
]

_F64 = torch.float64
_INF = float("inf")
#: Tail prefixes tried around the middle, each completed by the closest top-subset.
_N_PREFIX = 4
#: Rounds of "apply the best exchange, search again" for rows the first round leaves open.
_SWAP_ROUNDS = 3
#: Longest row the O(n²) Karmarkar–Karp stage runs on.
_KK_MAX_N = 256
#: Budget of float64 elements per (rows × half sums) temporary.
_CHUNK_ELEMS = 1 << 20


@dataclass(frozen=True)
class BalancedMass:
    """θ(p) per row with its certificate (each field has the row shape ``p.shape[:-1]``).

    Attributes:
        theta: ``4m(1−m)`` of the best subset found: exact where ``exact``, else a lower bound
            (float64).
        upper: Rigorous upper bound on θ (float64); ``upper == theta`` (to rounding) where exact.
        exact: ``upper − theta ≤ atol`` (bool).
    """

    theta: Tensor
    upper: Tensor
    exact: Tensor


def _bits(k: int, device: torch.device) -> Tensor:
    """``(k, 2^k)`` float64 0/1 matrix whose columns enumerate all subsets of k items."""
    cols = torch.arange(1 << k, device=device)
    return ((cols.unsqueeze(0) >> torch.arange(k, device=device).unsqueeze(1)) & 1).to(_F64)


def _nearest(sorted_vals: Tensor, target: Tensor) -> Tensor:
    """Per row, the entry of ``sorted_vals`` (R, M) closest to each ``target`` (R, Q)."""
    m = sorted_vals.shape[-1]
    i = torch.searchsorted(sorted_vals, target)
    up = sorted_vals.gather(-1, i.clamp_max(m - 1))
    dn = sorted_vals.gather(-1, (i - 1).clamp_min(0))
    up = torch.where(i < m, up, dn)
    dn = torch.where(i > 0, dn, up)
    return torch.where((up - target).abs() <= (target - dn).abs(), up, dn)


def _nearest_index(sorted_vals: Tensor, target: Tensor) -> Tensor:
    """Per row, the index of the entry of ``sorted_vals`` (R, M) closest to ``target`` (R, Q)."""
    m = sorted_vals.shape[-1]
    i = torch.searchsorted(sorted_vals, target).clamp_max(m - 1)
    dn = (i - 1).clamp_min(0)
    closer = (sorted_vals.gather(-1, dn) - target).abs() < (sorted_vals.gather(-1, i) - target).abs()
    return torch.where(closer, dn, i)


def _tail_gap(c: Tensor, t: Tensor) -> Tensor:
    """Per row, ``min_j |c_j − t|`` for the non-decreasing prefix sums ``c`` (R, L) and ``t`` (R, Q)."""
    return (_nearest(c, t) - t).abs()


def _rows_distance(p: Tensor, half_bits: int) -> tuple[Tensor, Tensor]:
    """``(d_ach, d_lo)`` for rows ``p`` (R, n), float64, non-negative: ``d_lo ≤ d ≤ d_ach``."""
    n = p.shape[-1]
    k = min(n, 2 * half_bits)
    top, idx = p.topk(k, dim=-1)
    tail = p.scatter(-1, idx, 0.0)
    c = torch.nn.functional.pad(tail.cumsum(-1), (1, 0))  # (R, n+1) prefix sums, c_0 = 0
    t_mass = c[:, -1:]
    k1 = k // 2
    x = top[:, :k1] @ _bits(k1, p.device)  # (R, 2^k1) sums of the first half
    y = (top[:, k1:] @ _bits(k - k1, p.device)).sort(-1).values  # (R, 2^k2), sorted
    m = y.shape[-1]
    # Step 2: is ½ in some interval [x + y, x + y + T]?  y ∈ [½ − T − x, ½ − x]
    lo_t = 0.5 - t_mass - x
    i = torch.searchsorted(y, lo_t)
    y_up = y.gather(-1, i.clamp_max(m - 1))
    y_dn = y.gather(-1, (i - 1).clamp_min(0))
    inside = (i < m) & (y_up <= 0.5 - x)
    dist_up = torch.where(i < m, x + y_up - 0.5, _INF)  # interval entirely above ½
    dist_dn = torch.where(i > 0, 0.5 - (x + y_dn + t_mass), _INF)  # entirely below ½
    d_out = torch.minimum(dist_up, dist_dn).clamp_min(0.0)
    d_lo = torch.where(inside, 0.0, d_out).amin(-1)
    # Step 3: achieved sums. Interval ends (exact where ½ is outside every interval) ...
    d_ach = torch.where(inside, _INF, d_out).amin(-1)
    # ... A plus a tail prefix, for the two inside pairs of each x (largest and smallest y) ...
    i_hi = torch.searchsorted(y, 0.5 - x, right=True) - 1
    y_hi = y.gather(-1, i_hi.clamp_min(0))
    for yy in (y_up, y_hi):
        gap = _tail_gap(c, 0.5 - x - yy)
        d_ach = torch.minimum(d_ach, torch.where(inside, gap, _INF).amin(-1))
    # ... and a few tail prefixes near the middle, completed by the closest top-subset.
    j0 = torch.searchsorted(c, 0.5 - 0.5 * top.sum(-1, keepdim=True))
    for off in range(-(_N_PREFIX // 2), _N_PREFIX - _N_PREFIX // 2):
        cj = c.gather(-1, (j0 + off).clamp(0, n))
        target = 0.5 - cj - x
        d_ach = torch.minimum(d_ach, (_nearest(y, target) - target).abs().amin(-1))
    return d_ach, d_lo


def _cardinality_distance(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(d_ach, d_lo)`` from subset sizes, for rows ``s`` sorted descending (R, n).

    A subset of k entries has mass in ``[L_k, U_k]`` (the k smallest, the k largest), both ends
    achieved. If ½ lies in no such interval, the nearest end is the exact answer: this settles
    near-uniform rows (attention at initialisation), where e.g. for odd n no half exists.
    """
    zero = torch.zeros_like(s[:, :1])
    upper = torch.cat([zero, s.cumsum(-1)], -1)
    lower = torch.cat([zero, s.flip(-1).cumsum(-1)], -1)
    d_ach = torch.minimum((upper - 0.5).abs(), (lower - 0.5).abs()).amin(-1)
    d_lo = torch.maximum(lower - 0.5, 0.5 - upper).clamp_min(0.0).amin(-1)
    return d_ach, d_lo


def _swap_distance(p: Tensor, atol: float, rounds: int) -> tuple[Tensor, Tensor]:
    """``(d_ach, d_lo)``: the greedy partition improved by the best single exchange, and the
    subset-size bounds of :func:`_cardinality_distance` (rows (R, n)).

    Greedy: entries in descending order, each to the lighter side (the side ``S`` ends within
    about one small entry of ½). Then the best ``i ∈ S ∪ {none}``, ``l ∉ S ∪ {none}`` with
    ``p_l − p_i ≈ r = ½ − m_S``, by binary search over the sorted outside entries: the
    ~n²/4 pair differences cover ``r`` to ~``2·range/n²`` on long rows, in O(n log n).
    """
    s = p.sort(-1, descending=True).values
    side_a = torch.zeros_like(s[:, 0])
    side_b = torch.zeros_like(side_a)
    member = torch.empty_like(s, dtype=torch.bool)
    for i in range(s.shape[-1]):
        into_a = side_a <= side_b
        member[:, i] = into_a
        side_a = side_a + torch.where(into_a, s[:, i], 0.0)
        side_b = side_b + torch.where(into_a, 0.0, s[:, i])
    zero = torch.zeros_like(s[:, :1])
    rows = torch.arange(s.shape[0], device=s.device)
    d_ach = torch.full_like(side_a, _INF)
    for _ in range(rounds):
        ins = torch.cat([zero, torch.where(member, s, _INF)], -1)  # q ↔ s_{q−1}, q = 0: none
        outs, out_idx = torch.cat([zero, torch.where(member, _INF, s)], -1).sort(-1)
        r = 0.5 - torch.where(member, s, 0.0).sum(-1, keepdim=True)
        target = ins + r
        j = _nearest_index(outs, target)
        err = (outs.gather(-1, j) - target).abs().nan_to_num(nan=_INF)
        best, q = err.min(-1)
        d_ach = torch.minimum(d_ach, best)
        if bool((4.0 * d_ach * d_ach <= atol).all()):
            break
        # apply the exchange and search again from the new residual
        l_idx = out_idx.gather(-1, j.gather(-1, q.unsqueeze(-1))).squeeze(-1)
        member = member.clone()
        member[rows, (q - 1).clamp_min(0)] &= q == 0
        member[rows, (l_idx - 1).clamp_min(0)] |= l_idx > 0
    d_card, d_lo = _cardinality_distance(s)
    return torch.minimum(d_ach, d_card), d_lo


def _kk_distance(p: Tensor) -> Tensor:
    """Achieved ``d`` of the Karmarkar–Karp largest-differencing partition (rows (R, n)).

    Repeatedly replace the two largest entries by their difference (they go to opposite sides);
    the last one left is the difference ``D`` of the two sides' masses, so the sides hold
    ``(T ∓ D)/2``. On diffuse rows D is ~``n^(−c·log n)`` of the entries (far below 1e-6 from
    n ≈ 40 on), at O(n) per step; used on the rows the cheaper stages leave open.
    """
    v = p.clone()
    total = p.sum(-1)
    steps = int((p > 0).sum(-1).max().item()) - 1
    for _ in range(max(steps, 0)):
        top, idx = v.topk(2, dim=-1)
        v.scatter_(-1, idx[:, :1], top[:, :1] - top[:, 1:])
        v.scatter_(-1, idx[:, 1:], 0.0)
    diff = v.amax(-1)
    return torch.minimum((0.5 * (total - diff) - 0.5).abs(), (0.5 * (total + diff) - 0.5).abs())


def _settled(d_ach: Tensor, d_lo: Tensor, atol: float) -> Tensor:
    return 4.0 * (d_ach * d_ach - d_lo * d_lo) <= atol


def _open_rows(d_ach: Tensor, d_lo: Tensor, atol: float, step: int) -> list[tuple[int, Tensor]]:
    """Indices of the rows not yet settled, in chunks of ``step``."""
    todo = (~_settled(d_ach, d_lo, atol)).nonzero().squeeze(-1)
    return [(t0, todo[t0 : t0 + step]) for t0 in range(0, todo.numel(), step)]


def _mitm_stage(rows: Tensor, d_ach: Tensor, d_lo: Tensor, bits: int, atol: float) -> None:
    """Meet-in-the-middle with ``bits`` per half on the rows not yet settled (updates in place)."""
    todo = (~_settled(d_ach, d_lo, atol)).nonzero().squeeze(-1)
    step = max(1, _CHUNK_ELEMS >> min(bits, (rows.shape[-1] + 1) // 2))
    for t0 in range(0, todo.numel(), step):
        sel = todo[t0 : t0 + step]
        da, dl = _rows_distance(rows.index_select(0, sel), bits)
        d_ach[sel] = torch.minimum(d_ach[sel], da)
        d_lo[sel] = torch.maximum(d_lo[sel], dl)


def _distance(rows: Tensor, half_bits: int, atol: float) -> tuple[Tensor, Tensor]:
    """``(d_ach, d_lo)`` for all rows, in stages: each stage only sees rows not yet settled.

    1. Greedy partition + one best exchange, and subset-size bounds (O(n log n)).
    2. Meet-in-the-middle with ``min(4, half_bits)`` bits per half: peaked and short rows.
    3. Greedy partition + three rounds of exchanges.
    4. Karmarkar–Karp differencing (O(n²), only for n ≤ 256).
    5. Meet-in-the-middle with 8, 10, then ``half_bits`` bits per half: what is left.
    """
    r, n = rows.shape
    d_ach = torch.full((r,), 0.5, dtype=_F64, device=rows.device)  # empty set: m = 0
    d_lo = torch.zeros_like(d_ach)
    if n == 0 or r == 0:
        d_lo.fill_(0.5)
        return d_ach, d_lo
    step = max(1, (_CHUNK_ELEMS * 4) // (n + 1))
    for r0 in range(0, r, step):
        d_ach[r0 : r0 + step], d_lo[r0 : r0 + step] = _swap_distance(rows[r0 : r0 + step], atol, 1)
    _mitm_stage(rows, d_ach, d_lo, min(4, half_bits), atol)
    for _, sel in _open_rows(d_ach, d_lo, atol, step):
        d_ach[sel] = torch.minimum(
            d_ach[sel], _swap_distance(rows.index_select(0, sel), atol, _SWAP_ROUNDS)[0]
        )
    if n <= _KK_MAX_N:
        for _, sel in _open_rows(d_ach, d_lo, atol, step):
            d_ach[sel] = torch.minimum(d_ach[sel], _kk_distance(rows.index_select(0, sel)))
    for bits in sorted({min(8, half_bits), min(10, half_bits), half_bits}):
        _mitm_stage(rows, d_ach, d_lo, bits, atol)
    return d_ach, d_lo


def theta_balanced_mass(
    p: Tensor, mask: Tensor | None = None, *, half_bits: int = 12, atol: float = 1e-12
) -> BalancedMass:
    """Balanced-mass factor ``θ(p) = 4m(1−m)`` per row, with bounds and an exactness flag.

    ``m`` is the mass of the subset of the row closest to ½ (Emadi 2026). See the module
    docstring for the method. ``theta`` is always achieved by an explicit subset (a lower
    bound), ``upper`` is a rigorous upper bound, and ``exact`` says they agree to ``atol``:
    always for rows with ``≤ 2·half_bits`` non-zero entries, ``p_max ≥ ½`` and, as measured,
    for (nearly) all softmax rows of n = 65…1024.

    Args:
        p: Probabilities ``(..., n)`` (non-negative), any floating dtype.
        mask: Optional boolean keep-mask broadcastable to ``p``; masked entries are dropped
            (no renormalisation).
        half_bits: Items per meet-in-the-middle half (``2^half_bits`` sums per row and half;
            the top ``2·half_bits`` entries are enumerated completely).
        atol: ``exact`` means ``upper − theta ≤ atol``.

    Returns:
        :class:`BalancedMass` of ``(...)`` tensors. A row with no mass → θ = 0 (the empty set);
        a row with a NaN/Inf or negative attended entry → ``inf`` (``exact`` False).

    Raises:
        ValueError: On a non-float ``p``, a bad mask or ``half_bits`` outside 1..16.

    Example:
        >>> p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
        >>> r = theta_balanced_mass(p)
        >>> [round(v, 6) for v in r.theta.tolist()], r.exact.tolist()
        ([0.84, 0.96, 1.0, 0.0], [True, True, True, True])
    """
    fn = "theta_balanced_mass"
    check_tensor("p", p, 1, fn)
    if not 1 <= half_bits <= 16:
        raise ValueError(f"{fn}: half_bits must be in 1..16, got {half_bits}")
    p64 = p.to(_F64)
    if mask is not None:
        check_mask(mask, tuple(p.shape), fn)
        p64 = torch.where(mask, p64, 0.0)
    lead, n = tuple(p.shape[:-1]), p.shape[-1]
    rows = p64.reshape(-1, n)
    bad = ~(torch.isfinite(rows) & (rows >= 0)).all(-1)
    rows = torch.where(bad.unsqueeze(-1), 0.0, rows)
    d_ach, d_lo = _distance(rows, half_bits, atol)
    d_lo = torch.minimum(d_lo, d_ach)  # equal up to rounding where exact
    theta = (1.0 - 4.0 * d_ach * d_ach).clamp_min(0.0)
    upper = (1.0 - 4.0 * d_lo * d_lo).clamp_min(0.0)
    theta = torch.where(bad, _INF, theta)
    upper = torch.where(bad, _INF, upper)
    exact = ~bad & (upper - theta <= atol)
    return BalancedMass(theta=theta.reshape(lead), upper=upper.reshape(lead), exact=exact.reshape(lead))


def softmax_jacobian_inf1_norm(
    p: Tensor, tau: float = 1.0, mask: Tensor | None = None, *, half_bits: int = 12
) -> Tensor:
    """``‖J_softmax(u/τ)‖_{∞→1} = θ(p)/τ`` per row (Emadi 2026), ``p = softmax(u/τ)``.

    ``J`` is the Jacobian of ``u ↦ softmax(u/τ)``, i.e. ``(Diag(p) − ppᵀ)/τ``; τ is the softmax
    temperature. For scaled dot-product attention with raw scores ``u = q·k`` and scale
    ``1/√d``, τ = √d; with ``u`` the already scaled scores, τ = 1. The ∞→1 norm is the
    sensitivity in the tokenwise (block-∞) geometry of the paper, bounded by ``1/τ``; the
    spectral norm of the same matrix is :func:`~.softmax_jacobian.softmax_jacobian_norm`.

    Args:
        p: Probabilities ``(..., n)`` (rows summing to 1 over the attended entries).
        tau: Temperature τ > 0.
        mask: Optional boolean keep-mask (see :func:`theta_balanced_mass`).
        half_bits: See :func:`theta_balanced_mass`.

    Returns:
        ``(...)`` float64: ``theta/τ`` (the lower bound where θ is not exact; see
        :func:`theta_balanced_mass` for the flag).

    Raises:
        ValueError: On τ ≤ 0 or the errors of :func:`theta_balanced_mass`.

    Example (brute force over the sign vectors x ∈ {±1}ⁿ, the vertices of the ∞-ball):
        >>> import itertools
        >>> p = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
        >>> j = (torch.diag(p) - torch.outer(p, p)) / 2.0
        >>> brute = max(
        ...     (j @ torch.tensor(x, dtype=torch.float64)).abs().sum().item()
        ...     for x in itertools.product([-1.0, 1.0], repeat=4)
        ... )
        >>> round(brute, 12), round(softmax_jacobian_inf1_norm(p, tau=2.0).item(), 12)
        (0.48, 0.48)
    """
    if not tau > 0:
        raise ValueError(f"softmax_jacobian_inf1_norm: tau must be > 0, got {tau}")
    return theta_balanced_mass(p, mask, half_bits=half_bits).theta / tau


def balanced_mass_per_head(
    p: Tensor,
    mask: Tensor | None = None,
    reduction: Literal["mean", "min", "max"] = "mean",
    *,
    half_bits: int = 12,
) -> Tensor:
    """θ(p) of every query row reduced to one value per attention matrix (per head).

    Why ``mean`` by default: the paper's finding "θ ≈ 1 persists throughout training" is
    about typical rows — whether attention sharpens enough to lower sensitivity. The max
    over rows (the block-∞ Lipschitz factor, reduced like ``kappa_softmax``) is ≈ 1 as soon as
    *one* row is diffuse, so it cannot show sharpening; ``min`` names the sharpest row.

    Args:
        p: Probabilities ``(..., n_q, n_k)``.
        mask: Optional boolean keep-mask broadcastable to ``p``.
        reduction: ``"mean"``, ``"min"`` or ``"max"`` over the query rows with ≥ 1 attended key.
        half_bits: See :func:`theta_balanced_mass`.

    Returns:
        ``(...)`` float64 (the per-row lower bounds, exact on all but rare rows); no attended
        row → 0; a non-finite or negative attended entry → ``inf``.

    Raises:
        ValueError: On < 2 dims, a bad mask or an unknown reduction.

    Example:
        >>> p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
        >>> [round(v, 6) for v in balanced_mass_per_head(p, reduction="mean").tolist()]
        [0.68]
    """
    fn = "balanced_mass_per_head"
    check_tensor("p", p, 2, fn)
    if reduction not in ("mean", "min", "max"):
        raise ValueError(f"{fn}: reduction must be 'mean', 'min' or 'max', got {reduction!r}")
    theta = theta_balanced_mass(p, mask, half_bits=half_bits).theta
    valid = torch.ones_like(theta, dtype=torch.bool) if mask is None else mask.any(-1).expand(theta.shape)
    bad = torch.isinf(theta).any(-1)
    if reduction == "mean":
        out = torch.where(valid, theta, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
    elif reduction == "min":
        out = torch.where(valid, theta, _INF).amin(-1)
        out = torch.where(valid.any(-1), out, 0.0)
    else:
        out = torch.where(valid, theta, 0.0).amax(-1)
    return torch.where(bad, _INF, out)

"""Extreme singular values of weight matrices, each with an error bound (SPEC §3).

The weight terms need two numbers per matrix: ``σmax`` (``‖W_O‖₂``) and, for ``κ(W)``, also
``σmin``, to the package's tolerance (κ within 1e-4 relative). :func:`singular_value_bounds`
returns both with a bound ``|σ_true − σ| ≤ err`` for each; :func:`largest_singular_value`
returns ``σmax`` alone, which costs far less for a large matrix. Every function takes a stack
``(G, m, n)`` of same-shape matrices and solves it batched.

Routes (``w`` taken tall, ``m ≥ n``; ``C = WᵀW``, ``λ = σ²``):

- **dense**: ``C`` in float64 (its upper block triangle only, ~25% fewer flops than a full
  product) and all its eigenvalues (``eigvalsh``). Error bound from the rounding model:
  ``|λ̂ − λ| ≤ m·ε·‖W‖_F² + n·ε·‖C‖₂`` (the product's entry-wise error summed in Frobenius norm,
  plus the backward error of the symmetric eigen-solver). Where that bound exceeds the
  tolerance (an ill-conditioned matrix: the Gram squares κ) the matrix is redone with
  ``svdvals`` (bound ``(m+n)·ε·σmax``).
- **LU** (square matrices): ``W = PLU`` in float64, block Krylov on ``(WᵀW)⁻¹`` applied by two
  triangular solves per block (``σmin`` of an ill-conditioned square matrix is well separated
  at the bottom, so a few blocks find it), ``σmax`` by the Krylov route, both certified in
  float64. A short start estimates ``κ``; a matrix the dense route certifies (``κ`` up to a few
  hundred at ``n = 768``) is left to it, which costs less there.
- **krylov** (``σmax`` only): block Krylov on ``x ↦ Wᵀ(Wx)`` without forming ``C``, started
  from a fixed-seed Gaussian block, stopped when the Ritz value's residual bound is below the
  tolerance, then *certified* in float64 (:func:`certify`). Cost ``O(k·mn)`` for a Krylov space
  of dimension ``k`` (tens to a few hundred) instead of ``O(mn² + n³)``.

The certificate (:func:`certify`) is a float64 Rayleigh–Ritz step on a subspace: with
``W x = θ p`` and ``s = Wᵀp − θx``, the residual of ``(θ², x)`` for ``C`` is ``ρ = θ‖s‖``, so an
eigenvalue of ``C`` lies within ``ρ`` of ``θ²`` (Weyl), and within ``ρ²/γ`` when the other
eigenvalues are at least ``γ`` away (Kato–Temple; ``γ`` from the neighbouring Ritz value and its
own residual). It bounds the distance to *an* eigenvalue; that the one found is the extreme
one rests on the random start block having a component along its vector (a Gaussian block of
``b`` columns misses one with probability of order ``(√n·δ)^b`` for a component below ``δ``),
and on Rayleigh–Ritz values never passing the extremes (``θ_max ≤ σmax``, ``θ_min ≥ σmin``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["certify", "gram", "largest_singular_value", "singular_value_bounds", "tall"]

#: Columns of the Krylov block: BLAS-3 products of this width cost little more than one
#: matrix-vector product on a memory-bound CPU, and a block of Gaussian columns makes a missed
#: extreme singular vector vanishingly unlikely.
BLOCK = 8
#: Relative tolerance each ``σ`` is certified to by default: ``κ = σmax/σmin`` then stays within
#: ``2e-5`` relative, under the package's documented ``1e-4``.
RTOL = 1e-5
#: Matrices with fewer columns (in their tall orientation) take the dense route for ``σmax``
#: too: below it a full Gram eigen-solve costs less than a few Krylov steps.
KRYLOV_MIN_N = 128
#: Matrices with at least this many columns (tall orientation) take the mixed route for
#: ``σmin`` (float32 Gram and Krylov, float64 certificate); smaller ones the dense route.
MIXED_MIN_N = 1024
#: Square matrices with at least this many columns take the LU route for ``σmin`` (float64 LU,
#: block Krylov on ``(WᵀW)⁻¹``, float64 certificate) where the dense route could not certify
#: theirs: a square matrix is where ``κ`` runs into the thousands (a Gaussian one has
#: ``σmin ~ 1/n``), and there inverse iteration converges in a few blocks. Measured
#: (``bench_extremal_sv``): a quarter of the dense-and-``svdvals`` time at ``n = 768``, even at
#: ``n = 256``.
SQUARE_MIN_N = 512
#: The mixed route searches the bottom only where the float32 Gram's relative rounding at the
#: bottom, ``√m·ε₃₂·κ²`` with κ bounded from below, stays below this: beyond it the float32
#: subspace cannot carry ``σmin`` to the tolerance, and the matrix goes to the dense route at once.
MIXED_FLOOR = 1e-2
#: Key of the hash that seeds each matrix's Krylov start block (:func:`_start`).
SEED = 0x5EED

_EPS = torch.finfo(torch.float64).eps

#: ``(σmax, σmin, err_max, err_min)``, each ``(G,)`` float64.
Extremes = tuple[Tensor, Tensor, Tensor, Tensor]


def tall(w: Tensor) -> Tensor:
    """``w`` (``(G, m, n)``) as a contiguous float64 stack with ``m ≥ n`` (transposed if wide)."""
    x = w.detach()
    if x.shape[-2] < x.shape[-1]:
        x = x.mT
    return x.to(torch.float64).contiguous()


def gram(w: Tensor, blocks: int = 4) -> Tensor:
    """``WᵀW`` of each matrix of ``(G, m, n)``, computing the upper block triangle only.

    The diagonal blocks and the ones above it are products of column blocks, the ones below are
    their transposes: ``(blocks + 1)/(2·blocks)`` of the flops of ``w.mT @ w`` and an exactly
    symmetric result.

    Example:
        >>> w = torch.arange(12.0, dtype=torch.float64).reshape(1, 4, 3)
        >>> torch.equal(gram(w, blocks=2), w.mT @ w)
        True
    """
    g, _, n = w.shape
    blocks = max(1, min(blocks, n // 64))
    edges = [n * i // blocks for i in range(blocks + 1)]
    out = w.new_empty((g, n, n))
    for i in range(blocks):
        left = w[..., edges[i] : edges[i + 1]]
        for j in range(i, blocks):
            part = left.mT @ w[..., edges[j] : edges[j + 1]]
            if j == i:  # a product's rounding is not symmetric: make it so
                part = (part + part.mT) / 2
            out[:, edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = part
            if j > i:
                out[:, edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = part.mT
    return out


def _sqrt_bracket(lam: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``(√λ̂, err)`` with ``|√λ − √λ̂| ≤ err`` for every ``λ ≥ 0`` within ``delta`` of ``λ̂``."""
    lam = lam.clamp_min(0.0)
    root = lam.sqrt()
    up = (lam + delta).sqrt() - root
    down = root - (lam - delta).clamp_min(0.0).sqrt()
    return root, torch.maximum(up, down)


def _dense(w: Tensor) -> Extremes:
    """Dense route on a tall float64 stack: ``(σmax, σmin, err_max, err_min)``."""
    _, m, n = w.shape
    lam = torch.linalg.eigvalsh(gram(w))
    top = lam[..., -1].clamp_min(0.0)
    delta = m * _EPS * w.square().sum((-2, -1)) + n * _EPS * top
    smax, err_max = _sqrt_bracket(top, delta)
    smin, err_min = _sqrt_bracket(lam[..., 0], delta)
    return smax, smin, err_max, err_min


def _svd(w: Tensor) -> Extremes:
    """``svdvals`` route: ``(σmax, σmin, err, err)`` with the backward-stability bound."""
    _, m, n = w.shape
    s = torch.linalg.svdvals(w)
    err = (m + n) * _EPS * s[..., 0]
    return s[..., 0], s[..., -1], err, err


def certify(w: Tensor, basis: Tensor) -> Extremes:
    """Rayleigh–Ritz of ``W`` on ``span(basis)`` in float64, with a residual bound per end.

    Args:
        w: ``(G, m, n)`` float64 matrices.
        basis: ``(G, n, p)``, ``p ≥ 2`` columns of any dtype (orthonormalized here).

    Returns:
        ``(θ_max, θ_min, err_max, err_min)``: the extreme Ritz values (singular values of
        ``W`` restricted to the subspace) and bounds on their distance to singular values of
        ``W`` (see the module docstring), each ``(G,)`` float64.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))[None]
        >>> hi, lo, e_hi, e_lo = certify(w, torch.eye(3, dtype=torch.float64)[None])
        >>> hi.item(), lo.item(), e_hi.item() < 1e-14
        (3.0, 1.0, True)
    """
    _, m, n = w.shape
    x = torch.linalg.qr(basis.to(torch.float64)).Q
    p_vec, theta, vh = torch.linalg.svd((x.mT @ w.mT).mT, full_matrices=False)
    ritz = vh @ x.mT  # Ritz vectors as rows
    s = (p_vec.mT @ w - ritz * theta.unsqueeze(-1)).norm(dim=-1)
    lam, rho = theta.square(), theta * s
    rounding = (m + n) * _EPS * theta[..., 0]  # of the float64 products themselves, on σ

    def bound(j: int, neighbour: int) -> Tensor:
        gap = (lam[..., neighbour] - lam[..., j]).abs() - rho[..., neighbour]
        quad = torch.where(gap > rho[..., j], rho[..., j].square() / gap.clamp_min(1e-300), math.inf)
        return _sqrt_bracket(lam[..., j], torch.minimum(rho[..., j], quad))[1] + rounding

    return theta[..., 0], theta[..., -1], bound(0, 1), bound(-1, -2)


def _start(x: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """Gaussian start blocks as rows ``(G, width, n)``, one per matrix of the stack ``x``, seeded
    by :data:`SEED` and a hash of the matrix's entry sum and sum of squares: the same matrix gets
    the same block (deterministic results, equal alone or batched), and no fixed block exists
    that a matrix could be built against (a singular vector orthogonal to the start block is
    never found by Krylov iterations)."""
    g, _, n = x.shape
    sums = torch.stack([x.sum((-2, -1)), x.square().sum((-2, -1))], -1).to(torch.float64).cpu().numpy()
    blocks = []
    for k in range(g):
        digest = hashlib.blake2b(sums[k].tobytes(), digest_size=8, key=SEED.to_bytes(4, "little")).digest()
        gen = torch.Generator(device=x.device).manual_seed(int.from_bytes(digest, "little") >> 1)
        blocks.append(torch.randn((width, n), generator=gen, dtype=torch.float64, device=x.device))
    return torch.stack(blocks).to(dtype)


def _orthonormal_rows(z: Tensor) -> Tensor:
    return torch.linalg.qr(z.mT).Q.mT


def _next_block(image: Tensor, basis: Tensor) -> Tensor:
    """Rows ``image`` orthogonalized against the rows ``basis`` (twice), orthonormalized, and once
    more against ``basis`` (a block that collapsed to rounding noise then still leaves it)."""
    z = image - (image @ basis.mT) @ basis
    z = z - (z @ basis.mT) @ basis
    q = _orthonormal_rows(z)
    q = q - (q @ basis.mT) @ basis
    return _orthonormal_rows(q)


def krylov_top(
    apply: Callable[[Tensor], Tensor],
    start: Tensor,
    rtol: float,
    max_dim: int,
    check: int = 2,
    inverse_of: Callable[[Tensor], Tensor] | None = None,
    hopeless: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Block Krylov with full reorthogonalization for the top eigenpairs of a symmetric PSD operator.

    Vectors are kept as ROWS (``(G, b, n)``): ``rows @ matrix`` is the product a CPU BLAS runs
    fastest for a narrow block (several times a column block's speed on a large matrix).

    Args:
        apply: ``Xᵀ ↦ (A X)ᵀ`` on row blocks ``(G, b, n)``.
        start: ``(G, b, n)`` start block (``b ≥ 2``).
        rtol: stop when every top Ritz value ``θ`` has a residual bound ``≤ rtol·θ`` (in the
            working precision; callers certify afterwards).
        max_dim: largest Krylov dimension (capped at ``n``: the space is then everything).
        check: Rayleigh–Ritz every this many blocks.
        inverse_of: ``apply`` is the inverse of this operator (given the same way): convergence
            is then judged on it, for the eigenvalue ``1/θ``. A small residual for ``A⁻¹`` can
            hide a large one for ``A`` (components along ``A``'s large eigenvalues are damped in
            the first and amplified in the second), and the certificate is ``A``'s.
        hopeless: ``θ ↦`` mask of the matrices not worth iterating on, given their current top
            Ritz values ``(G,)`` (they stop counting towards the stopping test).

    Returns:
        ``(θ, vectors)``: the ``b`` largest Ritz values, descending ``(G, b)``, and their
        Ritz vectors as rows ``(G, b, n)``.
    """
    _, b, n = start.shape
    limit = min(max_dim, n)
    q = _orthonormal_rows(start)
    blocks, images = [q], [apply(q)]
    while True:
        basis, image = torch.cat(blocks, -2), torch.cat(images, -2)
        last = basis.shape[-2] + b > limit
        if last or len(blocks) % check == 0:
            t = basis @ image.mT
            theta, z = torch.linalg.eigh((t + t.mT) / 2)
            theta, z = theta.flip(-1)[..., :b], z.flip(-1)[..., :b]
            pair = z[..., :2].mT
            ritz = pair @ basis
            if inverse_of is None:
                lam, img = theta[..., :2], pair @ image
            else:
                lam, img = 1.0 / theta[..., :2].clamp_min(1e-300), inverse_of(ritz)
            res = (img - ritz * lam[..., None]).norm(dim=-1)
            gap = (lam[..., 0] - lam[..., 1]).abs() - res[..., 1]
            quad = torch.where(gap > res[..., 0], res[..., 0].square() / gap.clamp_min(1e-300), math.inf)
            done = torch.minimum(res[..., 0], quad) <= rtol * lam[..., 0]
            if hopeless is not None:
                done |= hopeless(theta[..., 0])
            if last or bool(done.all()):
                return theta, z.mT @ basis
        q = _next_block(images[-1], basis)
        blocks.append(q)
        images.append(apply(q))


def largest_singular_value(
    w: Tensor, rtol: float = RTOL, block: int = BLOCK, max_dim: int = 512
) -> tuple[Tensor, Tensor]:
    """``σmax`` of each matrix of ``(G, m, n)`` with an error bound, by certified block Krylov.

    The Krylov products run in float32 on ``x ↦ Wᵀ(Wx)`` (``Wᵀ W`` never formed); the
    Rayleigh–Ritz value and its bound are then computed in float64 (:func:`certify`).
    Matrices with fewer than :data:`KRYLOV_MIN_N` columns (tall orientation), or whose estimate
    does not certify to ``rtol`` within ``max_dim``, take the dense route.

    Args:
        w: ``(G, m, n)`` finite matrices (callers zero non-finite entries and flag them).
        rtol: relative tolerance to certify.
        block: Krylov block width (at least 2).
        max_dim: largest Krylov dimension tried.

    Returns:
        ``(σmax, err)``, each ``(G,)`` float64, ``|σmax_true − σmax| ≤ err``.

    Example:
        >>> w = torch.diag(torch.linspace(1.0, 2.0, 200, dtype=torch.float64))[None]
        >>> s, err = largest_singular_value(w)
        >>> round(s.item(), 6), bool(abs(s.item() - 2.0) <= err.item() <= 1e-5 * s.item())
        (2.0, True)
    """
    x = tall(w)
    g, _, n = x.shape
    if n < KRYLOV_MIN_N or g == 0:
        smax, _, err, _ = _dense(x)
        return smax, err
    x32 = x.to(torch.float32)
    start = _start(x, block, torch.float32)
    _, rows = krylov_top(lambda r: (r @ x32.mT) @ x32, start, rtol, max_dim)
    smax, _, err, _ = certify(x, rows.mT)
    redo = ~(err <= rtol * smax)
    if bool(redo.any()):
        hi, _, e_hi, _ = _dense(x[redo])
        smax, err = smax.clone(), err.clone()
        smax[redo], err[redo] = hi, e_hi
    return smax, err


def _gram32(x: Tensor, rtol: float, block: int, max_dim: int) -> Extremes:
    """Mixed route on a tall float64 stack: float32 Gram, Cholesky, block Krylov on the Gram (top)
    and on its inverse (bottom), then both ends certified in float64 (:func:`certify`).

    The float32 Gram squares κ into its rounding (about ``√m·ε₃₂·κ²`` relative at the bottom),
    so it only finds the subspaces; the values and bounds are float64. A lower bound on κ rules
    out the matrices whose float32 Gram cannot resolve ``σmin`` (:data:`MIXED_FLOOR`), early:
    ``λmax`` is above the top Ritz value of two Krylov blocks, ``λmin`` below each squared
    Cholesky pivot ``L_ii²`` and below ``1/θ`` for every Ritz value ``θ`` of the inverse,
    checked as its search goes. Those, and
    the matrices whose Gram is not positive definite in float32, are returned as NaN (the
    caller redoes them)."""
    m = x.shape[-2]
    c = gram(x.to(torch.float32))
    chol, info = torch.linalg.cholesky_ex(c)
    start = _start(x, block, torch.float32)
    # κ² ≥ θ_top·θ for θ any lower bound on 1/λmin; θ_top: a Ritz value of two Krylov blocks (≤ λmax)
    rough = krylov_top(lambda r: r @ c, start, math.inf, 2 * block)[0][..., 0]
    floor = math.sqrt(m) * torch.finfo(torch.float32).eps * rough.to(torch.float64)

    def hopeless(inv_theta: Tensor) -> Tensor:
        return floor * inv_theta.to(torch.float64) > MIXED_FLOOR

    pivots = chol.diagonal(dim1=-2, dim2=-1).square().amin(-1).to(torch.float64)  # each ≥ λmin
    keep = (info == 0) & ~hopeless(1.0 / pivots.clamp_min(1e-300))
    nan = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device)
    out = (nan.clone(), nan.clone(), nan.clone(), nan.clone())
    if not bool(keep.any()):
        return out
    c, chol, floor, start = c[keep], chol[keep], floor[keep], start[keep]
    inv_theta, bottom = krylov_top(
        lambda r: torch.cholesky_solve(r.mT, chol).mT,
        start,
        2 * rtol,
        max_dim,
        inverse_of=lambda r: r @ c,
        hopeless=hopeless,
    )
    worth = ~hopeless(inv_theta[..., 0])
    solved = keep.clone()
    solved[keep] = worth
    if not bool(worth.any()):
        return out
    c, bottom = c[worth], bottom[worth]
    _, top = krylov_top(lambda r: r @ c, start[worth], 2 * rtol, max_dim)
    for t, v in zip(out, certify(x[solved], torch.cat([top, bottom], -2).mT), strict=True):
        t[solved] = v
    return out


def _lu(x: Tensor, rtol: float, block: int, max_dim: int) -> Extremes:
    """LU route on a square float64 stack (module docstring); NaN for the matrices it leaves to
    the dense route (those the dense route certifies, by the estimate ``λmin ≈ 1/θ`` from the
    inverse's top Ritz value ``θ``, and exactly singular ones)."""
    n = x.shape[-1]
    # matrix by matrix: a batched float64 getrf has returned garbage pivots (torch 2.13 CPU, MKL,
    # two threads), which the checks below would catch but not repair
    parts = [torch.linalg.lu_factor_ex(m) for m in x]
    lu = torch.stack([p.LU for p in parts])
    pivots = torch.stack([p.pivots for p in parts])
    info = torch.stack([p.info for p in parts])
    nan = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device)
    out = (nan.clone(), nan.clone(), nan.clone(), nan.clone())
    factored = (info == 0) & ((pivots >= 1) & (pivots <= n)).all(-1)
    if not bool(factored.all()):  # an exactly singular U (a zero matrix): its pivots are unusable
        if bool(factored.any()):
            for t, v in zip(out, _lu(x[factored], rtol, block, max_dim), strict=True):
                t[factored] = v
        return out
    # the dense route's bound on λ (module docstring), with ‖C‖₂ ≤ ‖W‖_F²
    delta = (2 * n) * _EPS * x.square().sum((-2, -1))

    def dense_certifies(inv_theta: Tensor) -> Tensor:
        return delta * inv_theta <= rtol

    def inverse(r: Tensor) -> Tensor:
        y = torch.linalg.lu_solve(lu, pivots, r.mT, adjoint=True)
        return torch.linalg.lu_solve(lu, pivots, y).mT

    start = _start(x, block, torch.float64)
    inv_theta, bottom = krylov_top(
        inverse, start, 2 * rtol, max_dim, inverse_of=lambda r: (r @ x.mT) @ x, hopeless=dense_certifies
    )
    solved = torch.isfinite(inv_theta[..., 0]) & ~dense_certifies(inv_theta[..., 0])
    if not bool(solved.any()):
        return out
    x32 = x[solved].to(torch.float32)
    _, top = krylov_top(lambda r: (r @ x32.mT) @ x32, start[solved].to(torch.float32), rtol, max_dim)
    basis = torch.cat([top.to(torch.float64), bottom[solved]], -2)
    for t, v in zip(out, certify(x[solved], basis.mT), strict=True):
        t[solved] = v
    return out


def singular_value_bounds(w: Tensor, rtol: float = RTOL) -> Extremes:
    """``σmax`` and ``σmin`` of each matrix of ``(G, m, n)`` with error bounds.

    Square matrices of :data:`SQUARE_MIN_N` columns or more take the LU route, tall ones of
    :data:`MIXED_MIN_N` columns or more the mixed route, the others and any matrix those routes
    leave the dense route (float64 Gram eigenvalues); a matrix whose bound still exceeds
    ``rtol`` relative (ill-conditioned: the Gram route resolves ``σmin`` only to about
    ``√(m·ε)·‖W‖_F``) is redone with ``svdvals``.

    Args:
        w: ``(G, m, n)`` finite matrices; ``σmin`` runs over the ``min(m, n)`` singular values.
        rtol: relative tolerance below which the Gram route's bound is accepted.

    Returns:
        ``(σmax, σmin, err_max, err_min)``, each ``(G,)`` float64.

    Example:
        >>> w = torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64))[None]
        >>> [round(v.item(), 12) for v in singular_value_bounds(w)[:2]]
        [4.0, 0.5]
    """
    x = tall(w)
    if x.shape[0] == 0 or x.shape[-1] == 0:
        zero = x.new_zeros(x.shape[0])
        return zero, zero, zero, zero
    m, n = x.shape[-2:]
    max_dim = 64 + 2 * round(n ** (2 / 3))
    if m == n and n >= SQUARE_MIN_N:
        out = _redo(_lu(x, rtol, BLOCK, max_dim), x, rtol, _dense)
    elif n >= MIXED_MIN_N:
        out = _redo(_gram32(x, rtol, BLOCK, max_dim), x, rtol, _dense)
    else:
        out = _dense(x)
    return _redo(out, x, rtol, _svd)


def _redo(out: Extremes, x: Tensor, rtol: float, route: Callable[[Tensor], Extremes]) -> Extremes:
    """``out`` with the matrices whose bounds exceed ``rtol`` relative (or are NaN) redone by ``route``."""
    redo = ~((out[3] <= rtol * out[1]) & (out[2] <= rtol * out[0]))
    if not bool(redo.any()):
        return out
    again = route(x[redo])
    fixed = [t.clone() for t in out]
    for t, v in zip(fixed, again, strict=True):
        t[redo] = v
    return fixed[0], fixed[1], fixed[2], fixed[3]

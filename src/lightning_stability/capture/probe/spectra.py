"""Spectra of the conditioned weights: ``‖W_O‖₂``, ``κ(W)``, ``κ_eff`` and ``κ(W_Kᵀ W_Q)``.

Every weight of a measurement goes through one place, :func:`singular_values` (``[σmax, σmin]``
of a list of weights, one batched solve per weight shape), and every Q/K pair through
:func:`wkwq_conditions`; :class:`WeightSpectra` keeps their results while a weight is bitwise
unchanged (opt-in) and says how ``σmax``/``σmin`` are computed: certified to
:data:`~lightning_stability.diagnostics.extremal.RTOL` relative by default
(:func:`~lightning_stability.diagnostics.linear.weight_extremes_many`: each value within a
computed error bound, so ``‖W_O‖₂`` within ``1e-5`` and every ``κ(W)`` within ``2e-5`` relative
of the exact float64 value), or ``exact`` (float64 Gram eigenvalues, ``svdvals`` beyond
``κ = 10³``: the float64 values themselves, at several times the cost for large square weights).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_stability import diagnostics as D
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.structure import Block, WeightFn, moe_kappa_eff
from lightning_stability.diagnostics.linear import (
    BATCH_BYTES,
    batches,
    float64_stack,
    kappa_wkwq_many,
    weight_extremes_many,
)
from lightning_stability.metrics import RawKey


def weight_statistics(
    blocks: Sequence[Block], heads: dict[int, int], spectra: WeightSpectra, raw: RawMeasurement
) -> None:
    """``‖W_O‖₂``, ``κ(W_O)``, ``κ_eff`` and ``κ(W_Kᵀ W_Q)`` of every block into ``raw``, the
    weights of one shape solved together (:func:`singular_values`: certified or exact, as
    ``spectra`` says).

    ``κ_eff`` of a block with MoE experts follows
    :func:`~lightning_stability.capture.structure.moe_kappa_eff` (dense FFN weights + the
    worst expert's sum); a block with neither gets none. ``heads``: the query-head count of each
    attended block (``κ(W_Kᵀ W_Q)`` only for those).
    """
    jobs: list[tuple[str, int, WeightFn]] = []
    for block in blocks:
        jobs += [("ffn", block.index, fn) for fn in block.ffn.values()]
        jobs += [("wo", block.index, fn) for fn in block.wo.values()]
        for e, weights in enumerate(block.experts):
            jobs += [(f"expert{e}", block.index, fn) for fn in weights.values()]
    sigma = singular_values([fn().detach() for _, _, fn in jobs], spectra)
    found: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
    for (kind, index, _), s in zip(jobs, sigma, strict=True):
        found[(kind, index)].append(s)
    wkwq = wkwq_conditions(blocks, heads, spectra)
    for block in blocks:
        i = block.index
        ffn = [D.condition_from_singular_values(s) for s in found[("ffn", i)]]
        experts = [
            [D.condition_from_singular_values(s) for s in found[(f"expert{e}", i)]]
            for e in range(len(block.experts))
        ]
        if any(experts):
            raw.put(RawKey("kappa_eff", i), moe_kappa_eff(ffn, experts))
        elif ffn:
            raw.put(RawKey("kappa_eff", i), torch.stack(ffn).sum())
        wo = found[("wo", i)]
        if wo:
            raw.put(RawKey("wo_norm", i), torch.stack([s[0] for s in wo]).amax())
            kappa_wo = torch.stack([D.condition_from_singular_values(s) for s in wo]).amax()
            raw.put(RawKey("kappa_wo", i), kappa_wo)
        if wkwq.get(i):
            raw.put(RawKey("kappa_wkwq", i), torch.stack([k.amax() for k in wkwq[i]]).amax())


def wkwq_conditions(
    blocks: Sequence[Block], heads: dict[int, int], spectra: WeightSpectra
) -> dict[int, list[Tensor]]:
    """Per attended block, ``κ(W_Q^hᵀ W_K^h)`` of each Q/K pair, blocks batched into few calls.

    The pairs are taken block by block and solved whenever they reach ``BATCH_BYTES`` of
    float64, so only that much of them (``pair()`` copies K for grouped-query heads) is
    alive at once.
    """
    out: dict[int, list[Tensor]] = defaultdict(list)
    jobs: list[tuple[int, Tensor, Tensor, int]] = []
    size = done = 0  # float64 bytes pending; pairs solved before them (the reuse keys)
    for block in blocks:
        if not block.qk or block.index not in heads:
            continue
        for proj in block.qk:
            # the module's own head count first (GQA calls carry H_kv)
            n_heads = proj.n_heads or heads[block.index]
            w_q, w_k = (w.detach() for w in proj.pair(n_heads))
            if w_q.shape == w_k.shape and w_q.shape[0] % n_heads == 0:
                if jobs and size + 2 * w_q.numel() * 8 > BATCH_BYTES:
                    _solve_wkwq(jobs, out, done, spectra)
                    done += len(jobs)
                    jobs, size = [], 0
                jobs.append((block.index, w_q, w_k, n_heads))
                size += 2 * w_q.numel() * 8
    _solve_wkwq(jobs, out, done, spectra)
    return out


def _solve_wkwq(
    jobs: list[tuple[int, Tensor, Tensor, int]],
    out: dict[int, list[Tensor]],
    first: int,
    spectra: WeightSpectra,
) -> None:
    """Solve ``jobs`` (pairs number ``first``, ``first + 1``… of the measurement) into ``out``."""
    if not jobs:
        return
    keys = [("wkwq", first + j, n_heads) for j, (*_, n_heads) in enumerate(jobs)]
    kept = spectra.lookup(keys, [(q, k) for _, q, k, _ in jobs])
    todo = [j for j, got in enumerate(kept) if got is None]
    fresh = kappa_wkwq_many([jobs[j][1:] for j in todo])
    for j, kappa in zip(todo, fresh, strict=True):
        kept[j] = kappa
        spectra.keep(keys[j], (jobs[j][1], jobs[j][2]), kappa)
    for (index, *_), value in zip(jobs, kept, strict=True):
        assert value is not None
        out[index].append(value)


class WeightSpectra:
    """Spectra of the conditioned weights, reused while a weight is bitwise unchanged (opt-in),
    and the method computing them.

    Reuse is decided by equality with a kept copy, never by ``Tensor._version``: a write through
    ``p.data`` (``p.data.add_(…)``, as some optimizers and EMA code do) bumps the version counter
    of the ``.data`` alias only, so an unchanged counter does not prove an unchanged weight.
    One host transfer decides every weight of a measurement.

    Args:
        reuse: keep copies and reuse; ``False``: every lookup misses and nothing is kept.
        exact: ``σmax``/``σmin`` of the weights (``‖W_O‖₂``, ``κ(W_O)``, the FFN's ``κ``) as
            float64 eigen/singular values; ``False``: certified within
            :data:`~lightning_stability.diagnostics.extremal.RTOL` relative (module docstring).
    """

    def __init__(self, reuse: bool = False, exact: bool = False) -> None:
        self.reuse = reuse
        self.exact = exact
        self._kept: dict[Any, tuple[tuple[Tensor, ...], Tensor]] = {}
        #: lookups answered from the kept spectra / recomputed, since construction
        self.hits = 0
        self.misses = 0

    def lookup(self, keys: Sequence[Any], weights: Sequence[tuple[Tensor, ...]]) -> list[Tensor | None]:
        """The kept result of each key whose weights all equal their kept copies, else ``None``."""
        out: list[Tensor | None] = [None] * len(keys)
        if not self.reuse:
            self.misses += len(keys)
            return out
        candidates = [j for j, key in enumerate(keys) if _same_layout(self._kept.get(key), weights[j])]
        if candidates:
            per_weight = [
                torch.stack([(a == b).all() for a, b in zip(self._kept[keys[j]][0], weights[j], strict=True)])
                for j in candidates
            ]
            same = torch.stack([e.all() for e in per_weight]).tolist()  # one transfer for all of them
            for j, unchanged in zip(candidates, same, strict=True):
                if unchanged:
                    out[j] = self._kept[keys[j]][1]
        self.hits += sum(v is not None for v in out)
        self.misses += sum(v is None for v in out)
        return out

    def keep(self, key: Any, weights: tuple[Tensor, ...], result: Tensor) -> None:
        """Remember ``result`` for ``key`` with a copy of its ``weights`` (when reusing)."""
        if self.reuse:
            self._kept[key] = (tuple(w.detach().clone() for w in weights), result)


def _same_layout(kept: tuple[tuple[Tensor, ...], Tensor] | None, weights: tuple[Tensor, ...]) -> bool:
    if kept is None or len(kept[0]) != len(weights):
        return False
    pairs = zip(kept[0], weights, strict=True)
    return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in pairs)


def singular_values(weights: Sequence[Tensor], spectra: WeightSpectra) -> list[Tensor]:
    """``[σmax, σmin]`` (float64) of each weight, batched by weight shape (kept ones reused).

    Certified within :data:`~lightning_stability.diagnostics.extremal.RTOL` relative, or the
    float64 values with ``spectra.exact``. A weight with a non-finite entry gets ``[inf, 0]``
    (so ``‖W‖₂`` and ``κ(W)`` read ``inf``). Reuse is keyed by position: the j-th weight of one
    measurement is compared with the j-th weight of the previous one.
    """
    keys = [("sigma", j) for j in range(len(weights))]
    out = spectra.lookup(keys, [(w,) for w in weights])
    todo = [j for j, got in enumerate(out) if got is None]
    if spectra.exact:
        fresh = _exact_extremes([weights[j] for j in todo])
    else:
        pairs = weight_extremes_many([weights[j] for j in todo], [True] * len(todo))
        fresh = [torch.stack(pair) for pair in pairs]
    for j, row in zip(todo, fresh, strict=True):
        out[j] = row
        spectra.keep(keys[j], (weights[j],), row)
    return [s for s in out if s is not None]


def _exact_extremes(weights: Sequence[Tensor]) -> list[Tensor]:
    """``[σmax, σmin]`` of each weight as float64 Gram eigenvalues (``svdvals`` beyond ``κ = 10³``),
    one batched call per weight shape (up to :data:`BATCH_BYTES` of float64 copies at a time)."""
    out: list[Tensor] = [torch.empty(0)] * len(weights)
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for j, w in enumerate(weights):
        groups[(tuple(w.shape), w.device)].append(j)
    for idx in groups.values():
        for run in batches([weights[j].numel() * 8 for j in idx]):
            part = [idx[k] for k in run]
            stack = float64_stack([weights[j] for j in part])
            wide = any(weights[j].dtype == torch.float64 for j in part)
            finite = _finite_matrices(stack, torch.float64 if wide else torch.float32)
            smax, smin = D.extreme_singular_values(stack)
            sigma = torch.stack([smax.masked_fill(~finite, math.inf), smin.masked_fill(~finite, 0.0)], -1)
            del stack
            for row, j in zip(sigma, part, strict=True):
                out[j] = row
    return out


def _finite_matrices(stack: Tensor, source: torch.dtype) -> Tensor:
    """Per matrix of the float64 copy ``stack`` (``(G, m, n)``) of weights of dtype ``source``: all
    entries finite. For float32 and narrower sources, from a float64 sum per matrix (it cannot
    overflow, so it is finite exactly when every entry is): no full-size mask."""
    if source == torch.float64:
        return torch.isfinite(stack).flatten(-2).all(-1)
    return torch.isfinite(stack.sum((-2, -1)))

"""The measurement itself: an exact FP32 forward and a low-precision forward of one sample.

No Lightning here. :class:`StabilityProbe` knows a model's blocks, normalization
layers and attention; :meth:`StabilityProbe.measure` runs the two passes and returns
raw statistics as 0-d tensors still on the device (so a caller can reduce them across
ranks and move them to the host in one transfer); :func:`compose_report` turns those
numbers into a :class:`~lightning_stability.stability_report.StabilityReport` with the pure
functions of :mod:`lightning_stability.diagnostics`. Raw keys end with a name of the metric
table (:mod:`lightning_stability.metrics`), which declares how each is reduced across ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_stability import diagnostics as D
from lightning_stability.capture.attention import (
    AttentionCall,
    AttentionCapture,
    call_diagnostics,
    call_probabilities,
)
from lightning_stability.capture.batch import cast_floating
from lightning_stability.capture.blocks import BlockTap, ModuleAmax, find_sublayers, first_tensor
from lightning_stability.capture.hooks import HookContext
from lightning_stability.capture.norms import NormCapture, NormLayer, find_norms
from lightning_stability.capture.side_forward import (
    compute_dtype,
    exact_fp32,
    rng_restore,
    rng_snapshot,
    side_forward,
)
from lightning_stability.capture.structure import MISSING_WO, Block, WeightFn, model_blocks, moe_kappa_eff
from lightning_stability.diagnostics.collapse import collapse_statistics
from lightning_stability.diagnostics.linear import BATCH_BYTES, batches, float64_stack, kappa_wkwq_many
from lightning_stability.metrics import BLOCK_METRICS, BY_NAME, HEAD_METRICS, RankOp, rank_op
from lightning_stability.rules.thresholds import FP16_MAX
from lightning_stability.stability_report import BlockReport, StabilityReport

#: How each raw statistic is combined across ranks (declared in :mod:`lightning_stability.metrics`).
ReduceOp = RankOp

NO_ATTENTION_WARNING = (
    "StabilityMonitor found no attention in this model, so the attention diagnostics "
    "(kappa_score, kappa_softmax, kappa_v) are not reported; the forward mismatch still is. "
    "Supported: F.scaled_dot_product_attention, nn.MultiheadAttention / nn.Transformer*Layer, "
    "transformers' 'sdpa' and 'eager' attention. For attention written with an explicit softmax, "
    "call lightning_stability.observe_attention(q, k, v, attn_mask) from its forward."
)


def predictor_warnings(blocks: Sequence[Block]) -> list[str]:
    """What the combined predictor leaves out because a weight was not found (for a one-time warning).

    Example:
        >>> predictor_warnings([Block(0, "h.0", nn.Identity(), missing=["W_O"])])[0][:60]
        'h.0: no W_O found, so the combined predictor of these blocks'
    """
    names = [b.name for b in blocks if MISSING_WO in b.missing]
    if not names:
        return []
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return [
        f"{shown}: no W_O found, so the combined predictor of these blocks leaves out the attention "
        "term kappa_softmax(1+kappa_score)kappa_V||W_O|| (it is not computed with ||W_O|| = 1) and the "
        "bound counts kappa(W_O) as 0; name the output projection (e.g. `out_proj`) to include it"
    ]


@dataclass
class RawMeasurement:
    """Raw statistics of one sampled step, still on the device.

    Attributes:
        values: 0-d tensors by key (``block{i}/<metric>``, ``block{i}/r_local/err_sq``,
            ``norm/<name>/variance``, ``module/<name>/amax``, ``kappa_softmax_max``…).
        ops: how each value is reduced across ranks (from the metric table).
        dtype: the low-precision dtype the low-precision pass really used.
        attention_calls: attention evaluations seen in the FP32 pass.
        norm_dtypes: per normalization layer, the dtype it computed in during the low-precision pass.
        residual_gains: per block ``‖J_f‖₂`` when estimated (host floats).
        norm_meta: per normalization layer, ``(d, ε)`` as training uses them.
        attended: indices of the blocks that saw at least one attention call (exact pass).
    """

    values: dict[str, Tensor] = field(default_factory=dict)
    ops: dict[str, ReduceOp] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    attention_calls: int = 0
    norm_dtypes: dict[str, str] = field(default_factory=dict)
    residual_gains: dict[int, float] = field(default_factory=dict)
    norm_meta: dict[str, tuple[int, float]] = field(default_factory=dict)
    attended: set[int] = field(default_factory=set)

    def put(self, key: str, value: Tensor) -> None:
        """Keep ``value`` under ``key``; its cross-rank reduction is the table's (:func:`rank_op`)."""
        self.ops[key] = rank_op(key)
        self.values[key] = value.detach().reshape(()).to(torch.float64)

    def flat(self) -> tuple[list[str], Tensor]:
        """Keys and one float64 vector of all values (one transfer moves it to the host)."""
        keys = list(self.values)
        if not keys:
            return keys, torch.zeros(0, dtype=torch.float64)
        return keys, torch.stack([self.values[k] for k in keys])


def _reduce(x: Tensor, how: str, dim: int) -> Tensor:
    if how == "max":
        return x.amax(dim)
    if how == "sum":
        return x.sum(dim)
    return x.mean(dim)


class StabilityProbe:
    """Two-pass measurement of one model.

    Args:
        model: the model (usually the ``LightningModule``).
        blocks: ``fnmatch`` patterns naming the blocks; ``None`` finds the repeated layers.
        head_reduction: ``"max"`` or ``"sum"`` over heads of ``kappa_softmax`` (SPEC §1: the paper
            sums the softmax term); ``kappa_score`` and ``kappa_v`` are always the max over heads.
        batch_reduction: ``"max"`` or ``"mean"`` over the sampled examples.
        residual_gain_iters: power-iteration steps for ``ρ_ℓ``; 0 skips it (and the bound).
        log_per_head: also keep per-head values.
        local_errors: run every block (and its attention / FFN sub-layers) a second time in the
            low precision on its exact FP32 input (``r_local``…); ``False`` skips that cost.
        balanced_mass: also compute the balanced-mass factor ``θ(p)`` of every attention row
            (``theta``); exact subset-mass search, costly (see README), so off by default.
        reuse_weight_spectra: keep a copy of every conditioned weight and reuse its spectrum
            (``‖W_O‖₂``, ``κ``, ``κ(W_Kᵀ W_Q)``) at a later measurement if the weight is bitwise
            equal to the copy (exact: the same numbers as recomputing). Pays off only for weights
            that do not move (frozen layers, a base model under adapters): in training every
            step moves every weight (README, *Cost of the probe's own work*). Costs one copy of
            those weights in memory, so off by default.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str] | None = None,
        head_reduction: Literal["max", "sum"] = "max",
        batch_reduction: Literal["max", "mean"] = "max",
        residual_gain_iters: int = 0,
        log_per_head: bool = False,
        local_errors: bool = True,
        balanced_mass: bool = False,
        reuse_weight_spectra: bool = False,
    ) -> None:
        self.model = model
        self.blocks: list[Block] = model_blocks(model, blocks)
        self.norms: list[NormLayer] = find_norms(model)
        self.norm_block: dict[str, int] = {}
        for norm in self.norms:
            for block in self.blocks:
                if block.contains(norm.name):
                    self.norm_block[norm.name] = block.index
        #: per block, its attention / FFN sub-layers: ``{index: {"attention": module, ...}}``
        self.sublayers: dict[int, dict[str, nn.Module]] = {
            b.index: {kind: m for kind, (_, m) in find_sublayers(b.module).items()} for b in self.blocks
        }
        self.head_reduction = head_reduction
        self.batch_reduction = batch_reduction
        self.residual_gain_iters = residual_gain_iters
        self.log_per_head = log_per_head
        self.local_errors = local_errors
        self.balanced_mass = balanced_mass
        self.spectra = WeightSpectra(reuse_weight_spectra)

    def block_of(self, module_name: str) -> int | None:
        """Index of the block containing the module ``module_name`` (``None``: outside every block)."""
        return next((b.index for b in self.blocks if b.contains(module_name)), None)

    def measure(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        low_precision: Callable[[], AbstractContextManager[Any]],
        forward: Callable[..., Any] | None = None,
        seed: int = 0,
    ) -> RawMeasurement:
        """Run the FP32 and the low-precision pass on one sample; nothing about training changes.

        The steps, in order (each a method of :class:`_Collector`): the exact FP32 pass
        (attention, norm statistics, block outputs, module maxima), the residual gains, the
        low-precision pass compared block by block as it runs, the local (teacher-forced)
        passes, then the statistics.

        Args:
            args: positional inputs of ``forward``.
            kwargs: keyword inputs of ``forward``.
            low_precision: returns the context of the low-precision pass (autocast, or the
                trainer's precision context).
            forward: what to call (default: the model).
            seed: seeds the residual-gain start vectors.
        """
        run = forward or self.model
        collector = _Collector(self)
        with side_forward(self.model) as same_stream:
            collector.exact_pass(run, args, kwargs, same_stream)
            if self.residual_gain_iters > 0:  # with the taps removed: its block calls are not recorded
                collector.residual_gains(seed)
            collector.low_precision_pass(run, args, kwargs, low_precision, same_stream)
            if self.local_errors:
                collector.local_passes(low_precision)
        return collector.finish()

    def _residual_gains(self, inputs: dict[int, list[_Call]], seed: int) -> dict[int, float]:
        gains: dict[int, float] = {}
        for block in self.blocks:
            if not inputs.get(block.index):
                continue
            call = inputs[block.index][0]
            args, kwargs = call.args, call.kwargs
            if not args or not isinstance(args[0], Tensor):
                continue
            branch = _residual_branch(block.module, args[1:], kwargs)

            gen = torch.Generator(device=args[0].device).manual_seed(seed + block.index)
            # forward-mode AD is implemented for the math SDPA kernel, not the fused ones
            with sdpa_kernel([SDPBackend.MATH]):
                gains[block.index] = float(
                    D.residual_gain(branch, args[0].float(), iters=self.residual_gain_iters, generator=gen)
                )
        return gains

    def _weights(self, raw: RawMeasurement, heads: dict[int, int]) -> None:
        """``‖W_O‖₂``, ``κ(W_O)``, ``κ_eff`` and ``κ(W_Kᵀ W_Q)``, with one SVD per weight shape.

        ``κ_eff`` of a block with MoE experts follows
        :func:`~lightning_stability.capture.structure.moe_kappa_eff` (dense FFN weights + the
        worst expert's sum); a block with neither gets none.
        """
        jobs: list[tuple[str, int, WeightFn]] = []
        for block in self.blocks:
            jobs += [("ffn", block.index, fn) for fn in block.ffn.values()]
            jobs += [("wo", block.index, fn) for fn in block.wo.values()]
            for e, weights in enumerate(block.experts):
                jobs += [(f"expert{e}", block.index, fn) for fn in weights.values()]
        sigma = _grouped_singular_values([fn for _, _, fn in jobs], self.spectra)
        found: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        for (kind, index, _), s in zip(jobs, sigma, strict=True):
            found[(kind, index)].append(s)
        wkwq = self._wkwq(heads)
        for block in self.blocks:
            i = block.index
            ffn = [D.condition_from_singular_values(s) for s in found[("ffn", i)]]
            experts = [
                [D.condition_from_singular_values(s) for s in found[(f"expert{e}", i)]]
                for e in range(len(block.experts))
            ]
            if any(experts):
                raw.put(f"block{i}/kappa_eff", moe_kappa_eff(ffn, experts))
            elif ffn:
                raw.put(f"block{i}/kappa_eff", torch.stack(ffn).sum())
            wo = found[("wo", i)]
            if wo:
                raw.put(f"block{i}/wo_norm", torch.stack([s[0] for s in wo]).amax())
                raw.put(
                    f"block{i}/kappa_wo",
                    torch.stack([D.condition_from_singular_values(s) for s in wo]).amax(),
                )
            if wkwq.get(i):
                raw.put(f"block{i}/kappa_wkwq", torch.stack([k.amax() for k in wkwq[i]]).amax())

    def _wkwq(self, heads: dict[int, int]) -> dict[int, list[Tensor]]:
        """Per attended block, ``κ(W_Q^hᵀ W_K^h)`` of each Q/K pair, blocks batched into few calls.

        The pairs are taken block by block and solved whenever they reach ``BATCH_BYTES`` of
        float64, so only that much of them (``pair()`` copies K for grouped-query heads) is
        alive at once.
        """
        out: dict[int, list[Tensor]] = defaultdict(list)
        jobs: list[tuple[int, Tensor, Tensor, int]] = []
        size = done = 0  # float64 bytes pending; pairs solved before them (the reuse keys)
        for block in self.blocks:
            if not block.qk or block.index not in heads:
                continue
            for proj in block.qk:
                # the module's own head count first (GQA calls carry H_kv)
                n_heads = proj.n_heads or heads[block.index]
                w_q, w_k = (w.detach() for w in proj.pair(n_heads))
                if w_q.shape == w_k.shape and w_q.shape[0] % n_heads == 0:
                    if jobs and size + 2 * w_q.numel() * 8 > BATCH_BYTES:
                        self._solve_wkwq(jobs, out, done)
                        done += len(jobs)
                        jobs, size = [], 0
                    jobs.append((block.index, w_q, w_k, n_heads))
                    size += 2 * w_q.numel() * 8
        self._solve_wkwq(jobs, out, done)
        return out

    def _solve_wkwq(
        self, jobs: list[tuple[int, Tensor, Tensor, int]], out: dict[int, list[Tensor]], first: int
    ) -> None:
        """Solve ``jobs`` (pairs number ``first``, ``first + 1``… of the measurement) into ``out``."""
        if not jobs:
            return
        keys = [("wkwq", first + j, n_heads) for j, (*_, n_heads) in enumerate(jobs)]
        kept = self.spectra.lookup(keys, [(q, k) for _, q, k, _ in jobs])
        todo = [j for j, got in enumerate(kept) if got is None]
        fresh = kappa_wkwq_many([jobs[j][1:] for j in todo])
        for j, kappa in zip(todo, fresh, strict=True):
            kept[j] = kappa
            self.spectra.keep(keys[j], (jobs[j][1], jobs[j][2]), kappa)
        for (index, *_), value in zip(jobs, kept, strict=True):
            assert value is not None
            out[index].append(value)


class WeightSpectra:
    """Spectra of the conditioned weights, reused while a weight is bitwise unchanged (opt-in).

    Reuse is decided by equality with a kept copy, never by ``Tensor._version``: a write through
    ``p.data`` (``p.data.add_(…)``, as some optimizers and EMA code do) bumps the version counter
    of the ``.data`` alias only, so an unchanged counter does not prove an unchanged weight.
    One host transfer decides every weight of a measurement.

    Args:
        reuse: keep copies and reuse; ``False``: every lookup misses and nothing is kept.
    """

    def __init__(self, reuse: bool = False) -> None:
        self.reuse = reuse
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


@dataclass
class _Call:
    """One call of a block or sub-layer in the exact pass: detached copies of its inputs and output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: list[Any]
    output: Tensor | None = None


def _fp32_copy(t: Tensor) -> Tensor:
    """A detached float32 COPY, made once: ``t.float()`` would alias a float32 tensor the model may
    later change in place, and ``.float().clone()`` copies a low-precision tensor twice."""
    return t.detach().to(torch.float32, copy=True)


def _version(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write to it or its views); −1 for an
    inference tensor, which has none."""
    return -1 if t.is_inference() else t._version


def _copy(x: Any) -> Any:
    """A detached copy of every tensor in ``x`` (the model may later change its tensors in place)."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_copy(v) for v in x)
    if isinstance(x, list):
        return [_copy(v) for v in x]
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    return x


class _Taps(HookContext):
    """Forward pre-/post-hooks on a list of modules calling ``on_input(j, c, args, kwargs)``
    and ``on_output(j, c, output)`` (``c``: call number); removed on exit."""

    def __init__(self, modules: Sequence[nn.Module], on_input: Any, on_output: Any) -> None:
        self.modules, self.on_input, self.on_output = list(modules), on_input, on_output
        self._calls = [0] * len(self.modules)
        super().__init__()

    def _install(self, stack: ExitStack) -> None:
        for j, m in enumerate(self.modules):
            stack.enter_context(m.register_forward_pre_hook(self._pre(j), with_kwargs=True))
            stack.enter_context(m.register_forward_hook(self._post(j), always_call=True))

    def _pre(self, j: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.on_input(j, self._calls[j], args, kwargs)

        return hook

    def _post(self, j: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.on_output(j, self._calls[j], output)
            self._calls[j] += 1

        return hook


class _Collector:
    """The state of one :meth:`StabilityProbe.measure`, filled step by step."""

    def __init__(self, probe: StabilityProbe) -> None:
        self.probe = probe
        self.raw = RawMeasurement()
        self.ref: dict[tuple[int, int], Tensor] = {}
        self.attn: dict[int, list[dict[str, Tensor]]] = defaultdict(list)
        self.heads: dict[int, int] = {}
        self.ksm_max: list[Tensor] = []
        self.mismatch: dict[str, list[tuple[Tensor, ...]]] = defaultdict(list)
        self.amax: dict[str, Tensor] = {}
        # teacher forcing: (metric, block index, module) → exact-pass calls
        self.local: dict[tuple[str, int], list[_Call]] = defaultdict(list)
        self.local_modules: dict[tuple[str, int], nn.Module] = {}
        self.norms: NormCapture | None = None
        self.lp_norms: NormCapture | None = None

    # ----------------------------------------------------------- step 1: exact pass
    def exact_pass(
        self,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        same_stream: Callable[[], None],
    ) -> None:
        """Exact FP32: attention and normalization statistics, block outputs, module maxima."""
        probe = self.probe
        keep_inputs = probe.local_errors or probe.residual_gain_iters > 0
        targets = self._local_targets() if keep_inputs else []
        self.local_modules = dict(targets)
        keys = [key for key, _ in targets]
        n_blocks = len(probe.blocks)
        # The residual stream kept once: a block fed the previous block's very output (same tensor,
        # not written since) gets that output's FP32 copy as its kept input instead of a second
        # copy. Not with residual gains, whose block calls run before the low-precision pass
        # compares against these copies.
        share = probe.residual_gain_iters == 0
        last: list[tuple[Tensor, int, Tensor]] = []  # the latest block output, its version, its copy

        def on_input(j: int, c: int, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if keys[j][0] == "r_attention_local":  # tapped inside its block's re-run: output only
                self.local[keys[j]].append(_Call((), {}, []))
                return
            a, kw = _without_cache(a, kw)
            if j < n_blocks and last and a and a[0] is last[0][0] and _version(a[0]) == last[0][1]:
                kept = (last[0][2], *_copy(a[1:]))
            else:
                kept = _copy(a)
            self.local[keys[j]].append(_Call(kept, _copy(kw), rng_snapshot()))

        def on_output(j: int, c: int, output: Any) -> None:
            out = first_tensor(output)
            if out is None:
                return
            copy = _fp32_copy(out)
            if j < n_blocks:  # the block outputs are also the references of the low-precision pass
                self.ref[(j, c)] = copy
                version = _version(out)
                last[:] = [(out, version, copy)] if share and out.dtype == copy.dtype and version >= 0 else []
            if c < len(self.local[keys[j]]):
                self.local[keys[j]][c].output = copy

        with ExitStack() as stack:
            stack.enter_context(exact_fp32(probe.model))
            stack.enter_context(AttentionCapture(probe.model, self._on_attention))
            self.norms = stack.enter_context(NormCapture(probe.norms))
            self.amax = stack.enter_context(ModuleAmax(probe.model)).amax
            if targets:
                stack.enter_context(_Taps([m for _, m in targets], on_input, on_output))
            else:
                stack.enter_context(BlockTap([b.module for b in probe.blocks], self._keep_ref))
            same_stream()
            run(*cast_floating(args, torch.float32), **cast_floating(kwargs, torch.float32))
        self._collapse_stats()
        if probe.blocks and not self.ref:
            names = [b.name for b in probe.blocks]
            raise RuntimeError(
                f"none of the blocks {names} produced an output during the forward; check the "
                "`blocks` patterns and that the forward runs them"
            )

    def _collapse_stats(self) -> None:
        """Rank collapse of each block's exact output (its first call), mean over the examples.

        Tokens are every position between the batch and the feature axis (padding included);
        ``nn.Transformer*Layer(batch_first=False)`` outputs are read sequence-first.
        """
        for block in self.probe.blocks:
            x = self.ref.get((block.index, 0))
            if x is None or x.dim() < 2:
                continue
            if x.dim() == 2:
                x = x.unsqueeze(0)
            elif x.dim() == 3 and getattr(block.module, "batch_first", True) is False:
                x = x.transpose(0, 1)
            rank, similarity = collapse_statistics(x.reshape(x.shape[0], -1, x.shape[-1]))
            self.raw.put(f"block{block.index}/rank_collapse", rank.mean())
            self.raw.put(f"block{block.index}/token_similarity", similarity.mean())

    def _local_targets(self) -> list[tuple[tuple[str, int], nn.Module]]:
        """Blocks first (in order, so index j < n_blocks is block j), then their sub-layers."""
        probe = self.probe
        out: list[tuple[tuple[str, int], nn.Module]] = [
            (("r_local", b.index), b.module) for b in probe.blocks
        ]
        if probe.local_errors:
            for b in probe.blocks:
                for kind, module in probe.sublayers[b.index].items():
                    out.append(((f"r_{kind}_local", b.index), module))
        return out

    def _keep_ref(self, i: int, c: int, out: Tensor) -> None:
        self.ref[(i, c)] = _fp32_copy(out)

    def _on_attention(self, call: AttentionCall) -> None:
        probe = self.probe
        self.raw.attention_calls += 1
        block = probe.block_of(call.name)
        diag = call_diagnostics(call)  # kappa_score is NaN (unknown) for scores-only calls
        self.ksm_max.append(diag.kappa_softmax.amax())
        if block is None:
            return
        logit = diag.logit_max
        self.heads.setdefault(block, call.v.shape[1])
        self.raw.attended.add(block)
        per_head = {
            "kappa_score": diag.kappa_score,
            "kappa_softmax": diag.kappa_softmax,
            "kappa_v": diag.kappa_v,
            "attn_logit_max": logit,
        }
        reduced: dict[str, Tensor] = {}
        for name, value in per_head.items():  # (B, H)
            over_heads = probe.head_reduction if name == "kappa_softmax" else "max"
            over_examples = "max" if name == "attn_logit_max" else probe.batch_reduction
            reduced[name] = _reduce(_reduce(value, over_heads, 1), over_examples, 0)
            reduced[name + "@heads"] = _reduce(value, over_examples, 0)
            if over_examples == "mean":  # sums, so the mean over every rank's examples is exact
                reduced[name + "#sum"] = _reduce(value, over_heads, 1).sum()
                reduced[name + "@heads#sum"] = value.sum(0)
        reduced["#count"] = torch.tensor(float(call.v.shape[0]), device=call.v.device)
        # entropy collapse is a low-entropy event: the mean over heads and examples,
        # and the per-head means.
        reduced["attention_entropy"] = diag.entropy.mean()
        reduced["attention_entropy@heads"] = diag.entropy.mean(0)
        if probe.balanced_mass:  # θ(p): mean over rows, heads and examples; per head over examples
            theta = D.balanced_mass_per_head(call_probabilities(call), call.keep, "mean")  # (B, H)
            reduced["theta"], reduced["theta@heads"] = theta.mean(), theta.mean(0)
        self.attn[block].append(reduced)

    # ----------------------------------------------------------- step 2: residual gains
    def residual_gains(self, seed: int) -> None:
        """``ρ_ℓ`` of each block at its exact-pass input (SPEC §5)."""
        inputs = {i: calls for (name, i), calls in self.local.items() if name == "r_local"}
        self.raw.residual_gains = self.probe._residual_gains(inputs, seed)

    # ----------------------------------------------------------- step 3: low-precision pass
    def low_precision_pass(
        self,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        low_precision: Callable[[], AbstractContextManager[Any]],
        same_stream: Callable[[], None],
    ) -> None:
        """The training's precision, each block output compared with its FP32 reference as it runs."""
        probe = self.probe
        blocks = probe.blocks

        def on_output(i: int, c: int, out: Tensor) -> None:
            x = self.ref.pop((i, c), None)
            if x is not None:
                self.mismatch[f"block{i}/r_block"].append(_mismatch(out, x))

        with ExitStack() as stack:
            stack.enter_context(low_precision())
            self.raw.dtype = compute_dtype(probe.model)
            self.lp_norms = stack.enter_context(NormCapture(probe.norms, variances=False))
            stack.enter_context(BlockTap([b.module for b in blocks], on_output))
            same_stream()
            run(*args, **kwargs)

    # ----------------------------------------------------------- step 4: local errors
    def local_passes(self, low_precision: Callable[[], AbstractContextManager[Any]]) -> None:
        """Teacher forcing: each block, and its FFN, in low precision on its exact FP32 input.

        The attention sub-layer is tapped inside its block's re-run (the paper taps after
        attention): with the block fed its exact input, the attention's input is exact too
        whenever the ops before it compute in FP32 (pre-/post-LN norms under autocast), so no
        separate attention re-run is needed.
        """
        for (metric, i), calls in self.local.items():
            if metric == "r_attention_local":
                continue
            module = self.local_modules[(metric, i)]
            attention = self.local.get(("r_attention_local", i)) if metric == "r_local" else None
            seen: list[Tensor] = []
            with ExitStack() as stack:
                if attention:
                    tap = self.local_modules[("r_attention_local", i)]
                    stack.enter_context(tap.register_forward_hook(_collect_first(seen)))
                for call in calls:
                    out = self._rerun(module, call, low_precision)
                    if out is not None and call.output is not None:
                        self.mismatch[f"block{i}/{metric}"].append(_squares(out, call.output))
            for got, exact in zip(seen, attention or [], strict=False):
                if exact.output is not None:
                    self.mismatch[f"block{i}/r_attention_local"].append(_squares(got, exact.output))

    @staticmethod
    def _rerun(
        module: nn.Module, call: _Call, low_precision: Callable[[], AbstractContextManager[Any]]
    ) -> Tensor | None:
        """``module`` in the low precision on the inputs of one exact-pass call, same random stream."""
        a, kw = call.args, call.kwargs
        rng_restore(call.rng)
        with low_precision():
            dtype = _input_dtype(module)
            if dtype is not None:  # `*-true` precision: the format the module receives in training
                a, kw = cast_floating(a, dtype), cast_floating(kw, dtype)
            out = first_tensor(module(*a, **kw))
        return None if out is None else out.detach()

    # ----------------------------------------------------------- step 5: statistics
    def finish(self) -> RawMeasurement:
        """Every raw statistic as a 0-d device tensor, keyed by the metric table's names."""
        raw, probe = self.raw, self.probe
        norms, lp_norms = self.norms, self.lp_norms
        assert norms is not None and lp_norms is not None
        # ε as training uses it (nn.RMSNorm(eps=None) means finfo of the low-precision input dtype)
        raw.norm_meta = {
            name: (s.d, lp_norms.stats[name].eps if name in lp_norms.stats else s.eps)
            for name, s in norms.stats.items()
        }
        raw.norm_dtypes = {
            name: str(s.compute_dtype).replace("torch.", "") for name, s in lp_norms.stats.items()
        }
        if self.ksm_max:
            raw.put("kappa_softmax_max", torch.stack(self.ksm_max).amax())
        self._attention_stats()
        for name, stats in norms.stats.items():
            raw.put(f"norm/{name}/variance", stats.median_variance())
        for index, gain in raw.residual_gains.items():
            raw.put(f"block{index}/residual_gain", torch.tensor(gain))
        self._mismatch_stats()
        self._amax_stats()
        probe._weights(raw, self.heads)
        return raw

    def _attention_stats(self) -> None:
        raw = self.raw
        for index, calls in self.attn.items():
            if self.probe.batch_reduction == "mean":
                self._mean_stats(index, calls)
            for name in ("kappa_score", "kappa_softmax", "kappa_v", "attn_logit_max"):
                if name + "#sum" not in calls[0]:
                    raw.put(f"block{index}/{name}", _nanmax(torch.stack([c[name] for c in calls])))
            for name in ("attention_entropy", "theta"):  # low is the event: min over calls
                if name in calls[0]:
                    raw.put(f"block{index}/{name}", torch.stack([c[name] for c in calls]).amin())
            if not self.probe.log_per_head:
                continue
            for name in HEAD_METRICS:
                if name + "#sum" in calls[0] or name + "@heads" not in calls[0]:
                    continue
                per_call = [c[name + "@heads"] for c in calls]
                if len({t.shape for t in per_call}) != 1:
                    per_call = per_call[:1]  # calls with different head counts: the first one's heads
                stacked = torch.stack(per_call)
                per_head = stacked.amin(0) if name in ("attention_entropy", "theta") else stacked.amax(0)
                for h in range(per_head.shape[0]):
                    raw.put(f"block{index}/head{h}/{name}", per_head[h])

    def _mean_stats(self, index: int, calls: list[dict[str, Tensor]]) -> None:
        """``batch_reduction="mean"``: per call, sums over the examples and their count (summed
        across ranks, so :func:`compose_report` forms the exact mean over all ranks' examples)."""
        raw = self.raw
        for c, call in enumerate(calls):
            raw.put(f"block{index}/call{c}/example_count", call["#count"])
            for name in ("kappa_score", "kappa_softmax", "kappa_v"):
                raw.put(f"block{index}/call{c}/{name}/example_sum", call[name + "#sum"])
                if self.probe.log_per_head:
                    for h, value in enumerate(call[name + "@heads#sum"]):
                        raw.put(f"block{index}/head{h}/call{c}/{name}/example_sum", value)

    def _mismatch_stats(self) -> None:
        raw = self.raw
        for key, items in self.mismatch.items():
            raw.put(f"{key}/err_sq", torch.stack([m[0] for m in items]).sum())
            raw.put(f"{key}/ref_sq", torch.stack([m[1] for m in items]).sum())
            if key.endswith("/r_block"):
                block = key.rsplit("/", 1)[0]
                tokens = torch.cat([m[2] for m in items])
                raw.put(f"{block}/r_block_median", tokens.median())
                raw.put(f"{key}/token_sum", tokens.double().sum())
                raw.put(f"{key}/token_count", torch.tensor(float(tokens.numel()), device=tokens.device))
                raw.put(f"{key}/nonfinite", torch.stack([m[3] for m in items]).sum())

    def _amax_stats(self) -> None:
        raw, probe = self.raw, self.probe
        for name, value in self.amax.items():
            raw.put(f"module/{name}/amax", value)
        for block in probe.blocks:
            inside = [v for name, v in self.amax.items() if block.contains(name)]
            if inside:
                raw.put(f"block{block.index}/amax", torch.stack(inside).amax())


def _nanmax(t: Tensor) -> Tensor:
    """Max over the known values (NaN = unknown, e.g. κ_score of a scores-only call); NaN if none is."""
    top = t.nan_to_num(nan=-math.inf).amax()
    return torch.where(top == -math.inf, torch.full_like(top, math.nan), top)


def _collect_first(into: list[Tensor]) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        out = first_tensor(output)
        if out is not None:
            into.append(out.detach())

    return hook


def _input_dtype(module: nn.Module) -> torch.dtype | None:
    """Under autocast ``None`` (inputs stay FP32, as in mixed precision); else the parameters' dtype
    when it is not float32 (``bf16-true``/``16-true``)."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None or torch.is_autocast_enabled(param.device.type) or param.dtype == torch.float32:
        return None
    return param.dtype


def _is_cache(value: Any) -> bool:
    return not isinstance(value, Tensor) and type(value).__name__.endswith("Cache")


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with key/value cache objects (transformers' ``*Cache``) set to ``None``.

    A block updates its cache in place; re-running it with the same cache would attend to the
    keys twice.
    """
    return (
        tuple(None if _is_cache(v) else v for v in args),
        {k: None if _is_cache(v) else v for k, v in kwargs.items()},
    )


def _mismatch(lp: Tensor, x: Tensor) -> tuple[Tensor, ...]:
    """``(Σ‖X̃−X‖², Σ‖X‖², per-token ‖X̃−X‖/‖X‖, non-finite count)`` of one output against its reference."""
    lp = lp.float()
    diff = (lp - x).reshape(-1, x.shape[-1]) if x.dim() > 0 else (lp - x).reshape(1, 1)
    err_tok = diff.square().sum(-1)
    ref_tok = x.reshape(diff.shape).square().sum(-1)
    per_token = (err_tok / ref_tok.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
    return err_tok.double().sum(), ref_tok.double().sum(), per_token, _nonfinite(lp, err_tok)


def _nonfinite(lp: Tensor, err_tok: Tensor) -> Tensor:
    """Non-finite entries of ``lp``, given its per-token squared errors against a reference.

    A finite total error proves every entry of ``lp`` finite (a NaN/±inf entry, or a non-finite
    reference, makes its token's error non-finite), so on CPU, where reading one number on the
    host is free, the full-size ``isfinite`` mask (the dearest elementwise op of the comparison)
    is only built when that total is not finite. Elsewhere it is always built: no host sync.
    """
    if lp.device.type == "cpu" and bool(torch.isfinite(err_tok.sum())):
        return torch.zeros((), dtype=torch.int64)
    return (~torch.isfinite(lp)).sum()


def _squares(lp: Tensor, x: Tensor) -> tuple[Tensor, ...]:
    """``(Σ‖X̃−X‖², Σ‖X‖²)`` only (local errors: no per-token statistics)."""
    err = torch.linalg.vector_norm(lp.float() - x, dtype=torch.float64)
    return err.square(), torch.linalg.vector_norm(x, dtype=torch.float64).square()


def _residual_branch(
    module: nn.Module, rest: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[Tensor], Tensor]:
    """``f(x) = block(x, *rest, **kwargs) − x``: the block's residual branch at its other inputs."""

    def branch(x: Tensor) -> Tensor:
        out = first_tensor(module(x, *rest, **kwargs))
        if out is None:
            raise TypeError(f"block {type(module).__name__} returned no tensor")
        return out - x

    return branch


def _grouped_singular_values(fns: Sequence[WeightFn], spectra: WeightSpectra) -> list[Tensor]:
    """``[σmax, σmin]`` of each weight, one batched call per weight shape (kept ones reused).

    A weight with a non-finite entry gets ``[inf, 0]`` (so ``‖W‖₂`` and ``κ(W)`` read ``inf``).
    """
    weights = [fn().detach() for fn in fns]
    keys = [("sigma", j) for j in range(len(weights))]
    out = spectra.lookup(keys, [(w,) for w in weights])
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for j, w in enumerate(weights):
        if out[j] is None:
            groups[(tuple(w.shape), w.device)].append(j)
    for idx in groups.values():
        for run in batches([weights[j].numel() * 8 for j in idx]):  # ≤ BATCH_BYTES of float64 copies
            part = [idx[k] for k in run]
            stack = float64_stack([weights[j] for j in part])
            wide = any(weights[j].dtype == torch.float64 for j in part)
            finite = _finite_matrices(stack, torch.float64 if wide else torch.float32)
            smax, smin = D.extreme_singular_values(stack)
            sigma = torch.stack([smax.masked_fill(~finite, math.inf), smin.masked_fill(~finite, 0.0)], -1)
            del stack
            for row, j in zip(sigma, part, strict=True):
                out[j] = row
                spectra.keep(keys[j], (weights[j],), row)
    return [s for s in out if s is not None]


def _finite_matrices(stack: Tensor, source: torch.dtype) -> Tensor:
    """Per matrix of the float64 copy ``stack`` (``(G, m, n)``) of weights of dtype ``source``: all
    entries finite. For float32 and narrower sources, from a float64 sum per matrix (it cannot
    overflow, so it is finite exactly when every entry is): no full-size mask."""
    if source == torch.float64:
        return torch.isfinite(stack).flatten(-2).all(-1)
    return torch.isfinite(stack.sum((-2, -1)))


def _ratio(err_sq: float, ref_sq: float) -> float:
    if not math.isfinite(err_sq):
        return math.inf
    if ref_sq > 0:
        return math.sqrt(err_sq / ref_sq)
    return 0.0 if err_sq == 0 else math.inf


def compose_report(
    probe: StabilityProbe,
    raw: RawMeasurement,
    values: dict[str, float],
    step: int,
    ln_constants: tuple[float, float, float] = (1.0, 1.0, 1.0),
    bound_c: float = 1.0,
    eps_mach: float | None = None,
) -> StabilityReport:
    """Turn reduced raw values (host floats) into a :class:`StabilityReport` (SPEC §2–§5).

    Metrics the table marks as measured are copied from their raw keys; the others (ratios,
    ``C_LN``/``ρ_LN``, the predictor, the bound, the roll-ups) are derived here. A term that was
    not measured (a block without attention, say) is left out of the combined predictor and
    counts as 0 in the bound. In particular a block whose attention output projection ``W_O``
    was not found (``"W_O"`` in :attr:`Block.missing`) gets a predictor without its attention
    term ``κ_softmax(1+κ_score)κ_V‖W_O‖₂`` (no ``‖W_O‖ = 1`` is assumed) and ``κ(W_O) = 0``
    in the bound; :func:`predictor_warnings` words it.

    Args:
        probe: the probe that measured.
        raw: its raw measurement (for the dtype and norm metadata).
        values: the reduced raw values by key.
        step: the training step.
        ln_constants: ``C1, C2, C3`` of ``C_LN``.
        bound_c: the constant of the unified bound.
        eps_mach: ``ε_mach`` override (SPEC §2); default that of the low-precision dtype.
    """
    eps = D.eps_mach(raw.dtype) if eps_mach is None else float(eps_mach)
    blocks = [_block_report(probe, raw, values, block, eps, ln_constants) for block in probe.blocks]
    out = StabilityReport(
        step=step,
        dtype=str(raw.dtype).replace("torch.", ""),
        eps_mach=eps,
        blocks=blocks,
        nonfinite=sum(int(values.get(f"block{b.index}/r_block/nonfinite") or 0) for b in probe.blocks),
        norm_dtypes=dict(raw.norm_dtypes),
    )
    out.kappa_softmax_max = values.get("kappa_softmax_max")
    predictors = [b.predictor for b in blocks if b.predictor is not None]
    if predictors:
        out.predictor = max(predictors)
        out.predictor_scaled = out.predictor * eps
    logits = [b.attn_logit_max for b in blocks if b.attn_logit_max is not None]
    out.attn_logit_max = max(logits) if logits else None
    if blocks:
        out.r_block = blocks[-1].r_block
        out.r_block_median = blocks[-1].r_block_median
        out.r_block_mean_token = blocks[-1].r_block_mean_token
    local = [(b.r_local, i) for i, b in enumerate(blocks) if b.r_local is not None]
    if local:
        worst = max(local)[1]
        out.worst_block, out.worst_block_index = blocks[worst].name, worst
    modules = {k[len("module/") : -len("/amax")]: v for k, v in values.items() if k.startswith("module/")}
    if modules:
        name, top = max(modules.items(), key=lambda kv: kv[1])
        out.amax_module = name or "(model output)"
        out.fp16_headroom = math.log2(FP16_MAX / top) if top > 0 else math.inf
    if blocks and all(b.residual_gain is not None for b in blocks):
        _bound(out, probe, values, bound_c)
    return out


def _block_report(
    probe: StabilityProbe,
    raw: RawMeasurement,
    values: dict[str, float],
    block: Block,
    eps: float,
    ln_constants: tuple[float, float, float],
) -> BlockReport:
    i = block.index
    report = BlockReport(name=block.name)
    for name in BLOCK_METRICS:  # measured directly: the reduced raw value is the metric
        if BY_NAME[name].measured:
            value = values.get(f"block{i}/{name}")
            setattr(report, name, None if value is None or math.isnan(value) else value)  # NaN: unknown
    if probe.batch_reduction == "mean":
        _exact_means(report, values, i)
    c_ln: list[float] = []
    rho: list[float] = []
    for norm in probe.norms:
        var = values.get(f"norm/{norm.name}/variance")
        if probe.norm_block.get(norm.name) != i or var is None:
            continue
        d, norm_eps = raw.norm_meta[norm.name]
        rho.append(float(D.rho_ln_from_variance(var, d, norm_eps, eps)))
        c_ln.append(
            float(D.ln_error_coefficient_from_variance(var, norm_eps, *ln_constants, eps_mach=eps, d=d))
        )
    report.c_ln = sum(c_ln) if c_ln else None
    report.rho_ln = min(rho) if rho else None
    for name in ("r_block", "r_local", "r_attention_local", "r_ffn_local"):
        err_sq, ref_sq = values.get(f"block{i}/{name}/err_sq"), values.get(f"block{i}/{name}/ref_sq")
        if err_sq is not None and ref_sq is not None:
            setattr(report, name, _ratio(err_sq, ref_sq))
    count = values.get(f"block{i}/r_block/token_count")
    if count:
        report.r_block_mean_token = values[f"block{i}/r_block/token_sum"] / count
    if values.get(f"block{i}/r_block/nonfinite"):
        report.r_block = report.r_block_median = report.r_block_mean_token = math.inf
    attention = 0.0
    ksm, ksc, kv = report.kappa_softmax, report.kappa_score, report.kappa_v
    # no W_O found (Block.missing): the attention term is left out, not computed with ‖W_O‖ = 1
    # (the monitor says so once, naming the blocks: predictor_warnings)
    if ksm is not None and ksc is not None and kv is not None and report.wo_norm is not None:
        attention = float(D.combined_predictor(ksm, ksc, kv, report.wo_norm, 0.0, 0.0))
    report.predictor = attention + (report.kappa_eff or 0.0) + (report.c_ln or 0.0)
    report.per_head.update(
        {
            name: [values[f"block{i}/head{h}/{name}"] for h in range(_count_heads(values, i, name))]
            for name in HEAD_METRICS
            if f"block{i}/head0/{name}" in values
        }
    )
    return report


def _exact_means(report: BlockReport, values: dict[str, float], i: int) -> None:
    """``batch_reduction="mean"``: max over calls of (Σ over every rank's examples) / (their count)."""
    counts: list[float] = []
    while f"block{i}/call{len(counts)}/example_count" in values:
        counts.append(values[f"block{i}/call{len(counts)}/example_count"])
    if not counts:
        return
    for name in ("kappa_score", "kappa_softmax", "kappa_v"):
        means = [values[f"block{i}/call{c}/{name}/example_sum"] / n for c, n in enumerate(counts)]
        known = [m for m in means if not math.isnan(m)]  # NaN: κ_score of a scores-only call
        setattr(report, name, max(known) if known else None)
        heads: list[float] = []
        while f"block{i}/head{len(heads)}/call0/{name}/example_sum" in values:
            h = len(heads)
            heads.append(
                max(
                    values[f"block{i}/head{h}/call{c}/{name}/example_sum"] / n
                    for c, n in enumerate(counts)
                    if f"block{i}/head{h}/call{c}/{name}/example_sum" in values
                )
            )
        if heads:
            report.per_head[name] = heads


def _bound(out: StabilityReport, probe: StabilityProbe, values: dict[str, float], bound_c: float) -> None:
    blocks = out.blocks

    def col(name: str) -> list[float]:
        return [float(getattr(b, name) or 0.0) for b in blocks]

    kappa_wo = [values.get(f"block{b.index}/kappa_wo", 0.0) for b in probe.blocks]
    bound = D.unified_bound(
        col("kappa_eff"),
        kappa_wo,
        col("kappa_softmax"),
        col("kappa_score"),
        col("kappa_v"),
        col("c_ln"),
        col("residual_gain"),
        out.eps_mach,
        c=bound_c,
    )
    out.bound, out.bound_rigorous, out.small_gain = bound.first_order, bound.rigorous, bound.small_gain


def _count_heads(values: dict[str, float], i: int, name: str) -> int:
    h = 0
    while f"block{i}/head{h}/{name}" in values:
        h += 1
    return h


def first_nonfinite_module(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    low_precision: Callable[[], AbstractContextManager[Any]],
) -> str | None:
    """Re-run the low-precision pass; name the first leaf module whose output is non-finite.

    Only called after a step found non-finite block outputs, so the per-module check (a host
    sync each) costs nothing in normal steps.
    """
    found: list[str] = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            out = first_tensor(output)
            if not found and out is not None and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)

        return fn

    with ExitStack() as stack:
        for name, module in model.named_modules():
            if not any(True for _ in module.children()):
                stack.enter_context(module.register_forward_hook(hook(name)))
        stack.enter_context(side_forward(model))
        stack.enter_context(low_precision())
        model(*args, **kwargs)
    return found[0] if found else None

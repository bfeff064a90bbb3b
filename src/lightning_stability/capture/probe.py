"""The measurement itself: an exact FP32 forward and a low-precision forward of one sample.

No Lightning here. :class:`StabilityProbe` knows a model's blocks, normalization
layers and attention; :meth:`StabilityProbe.measure` runs the two passes and returns
raw statistics as 0-d tensors still on the device (so a caller can reduce them across
ranks and move them to the host in one transfer); :func:`compose_report` turns those
numbers into a :class:`~lightning_stability.report.StabilityReport` with the pure
functions of :mod:`lightning_stability.diagnostics`.
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
from lightning_stability.capture.attention import AttentionCall, AttentionCapture
from lightning_stability.capture.batch import cast_floating
from lightning_stability.capture.blocks import BlockTap, first_tensor
from lightning_stability.capture.guards import (
    compute_dtype,
    eval_mode,
    exact_fp32,
    fastpath_disabled,
    preserved_rng,
)
from lightning_stability.capture.norms import NormCapture, NormLayer, find_norms
from lightning_stability.capture.structure import Block, WeightFn, model_blocks
from lightning_stability.report import BlockReport, StabilityReport

#: How each raw statistic is combined across ranks.
ReduceOp = Literal["max", "min", "sum"]

NO_ATTENTION_WARNING = (
    "StabilityMonitor found no attention in this model, so the attention diagnostics "
    "(kappa_score, kappa_softmax, kappa_v) are not reported; the forward mismatch still is. "
    "Supported: F.scaled_dot_product_attention, nn.MultiheadAttention / nn.Transformer*Layer, "
    "transformers' 'sdpa' and 'eager' attention. For attention written with an explicit softmax, "
    "call lightning_stability.observe_attention(q, k, v, attn_mask) from its forward."
)


@dataclass
class RawMeasurement:
    """Raw statistics of one sampled step, still on the device.

    Attributes:
        values: 0-d tensors by key (``block{i}/<stat>``, ``norm/<name>``, ``kappa_softmax_max``…).
        ops: how each value is reduced across ranks.
        dtype: the low-precision dtype the low-precision pass really used.
        attention_calls: attention evaluations seen in the FP32 pass.
        norm_dtypes: per normalization layer, the dtype it computed in during the low-precision pass.
        residual_gains: per block ``‖J_f‖₂`` when estimated (host floats).
    """

    values: dict[str, Tensor] = field(default_factory=dict)
    ops: dict[str, ReduceOp] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    attention_calls: int = 0
    norm_dtypes: dict[str, str] = field(default_factory=dict)
    residual_gains: dict[int, float] = field(default_factory=dict)
    norm_meta: dict[str, tuple[int, float]] = field(default_factory=dict)

    def put(self, key: str, value: Tensor, op: ReduceOp) -> None:
        self.values[key] = value.detach().reshape(()).to(torch.float64)
        self.ops[key] = op

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
        head_reduction: ``"max"`` or ``"sum"`` over heads (SPEC §1).
        batch_reduction: ``"max"`` or ``"mean"`` over the sampled examples.
        residual_gain_iters: power-iteration steps for ``ρ_ℓ``; 0 skips it (and the bound).
        log_per_head: also keep per-head values.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str] | None = None,
        head_reduction: Literal["max", "sum"] = "max",
        batch_reduction: Literal["max", "mean"] = "max",
        residual_gain_iters: int = 0,
        log_per_head: bool = False,
    ) -> None:
        self.model = model
        self.blocks: list[Block] = model_blocks(model, blocks)
        self.norms: list[NormLayer] = find_norms(model)
        self.norm_block: dict[str, int] = {}
        for norm in self.norms:
            for block in self.blocks:
                if block.contains(norm.name):
                    self.norm_block[norm.name] = block.index
        self.head_reduction = head_reduction
        self.batch_reduction = batch_reduction
        self.residual_gain_iters = residual_gain_iters
        self.log_per_head = log_per_head

    # ------------------------------------------------------------------ passes
    def measure(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        low_precision: Callable[[], AbstractContextManager[Any]],
        forward: Callable[..., Any] | None = None,
        seed: int = 0,
    ) -> RawMeasurement:
        """Run the FP32 and the low-precision pass on one sample; nothing about training changes.

        Args:
            args: positional inputs of ``forward``.
            kwargs: keyword inputs of ``forward``.
            low_precision: returns the context of the low-precision pass (autocast, or the
                trainer's precision context).
            forward: what to call (default: the model).
            seed: seeds the residual-gain start vectors.
        """
        run = forward or self.model
        raw = RawMeasurement()
        ref: dict[tuple[int, int], Tensor] = {}
        inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        attn: dict[int, list[dict[str, Tensor]]] = defaultdict(list)
        heads: dict[int, int] = {}
        ksm_max: list[Tensor] = []

        def on_attention(call: AttentionCall) -> None:
            raw.attention_calls += 1
            block = next((b.index for b in self.blocks if b.contains(call.name)), None)
            # contiguous: q/k/v are usually permuted views of a fused projection, which the
            # diagnostics would otherwise gather element by element (same values either way)
            diag = D.attention_diagnostics(
                call.q.float().contiguous(),
                call.k.float().contiguous(),
                call.v.float().contiguous(),
                mask=call.keep,
                scale=call.scale,
                bias=None if call.bias is None else call.bias.float(),
            )
            ksm_max.append(diag.kappa_softmax.amax())
            if block is None:
                return
            heads.setdefault(block, call.q.shape[1])
            reduced: dict[str, Tensor] = {}
            for name in ("kappa_score", "kappa_softmax", "kappa_v"):
                value = getattr(diag, name)  # (B, H)
                per_example = _reduce(value, self.head_reduction, 1)
                reduced[name] = _reduce(per_example, self.batch_reduction, 0)
                reduced[name + "@heads"] = _reduce(value, self.batch_reduction, 0)
            # entropy collapse is a low-entropy event: the mean over heads and examples,
            # and the per-head means.
            reduced["attention_entropy"] = diag.entropy.mean()
            reduced["attention_entropy@heads"] = diag.entropy.mean(0)
            attn[block].append(reduced)

        def keep_ref(i: int, c: int, out: Tensor) -> None:
            ref[(i, c)] = out.float()

        def keep_input(i: int, c: int, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if c == 0:
                inputs[i] = (a, kw)

        mismatch: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = defaultdict(list)

        def compare(i: int, c: int, out: Tensor) -> None:
            x = ref.pop((i, c), None)
            if x is None:
                return
            lp = out.float()
            diff = (lp - x).reshape(-1, x.shape[-1]) if x.dim() > 0 else (lp - x).reshape(1, 1)
            xr = x.reshape(diff.shape)
            per_token = diff.norm(dim=-1) / xr.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            nonfinite = (~torch.isfinite(lp)).sum()
            mismatch[i].append(
                (diff.double().square().sum(), xr.double().square().sum(), per_token, nonfinite)
            )

        block_modules = [b.module for b in self.blocks]
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(preserved_rng())
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(fastpath_disabled())
            # measure the eager arithmetic, and do not make torch.compile recompile for our hooks
            stack.enter_context(torch.compiler.set_stance("force_eager"))
            # 1. exact FP32 reference: attention and normalization statistics, block outputs.
            with ExitStack() as fp32:
                fp32.enter_context(exact_fp32(self.model))
                with ExitStack() as taps:
                    taps.enter_context(AttentionCapture(self.model, on_attention))
                    norms = taps.enter_context(NormCapture(self.norms))
                    taps.enter_context(
                        BlockTap(
                            block_modules, keep_ref, keep_input if self.residual_gain_iters > 0 else None
                        )
                    )
                    run(*cast_floating(args, torch.float32), **cast_floating(kwargs, torch.float32))
                if self.blocks and not ref:
                    names = [b.name for b in self.blocks]
                    raise RuntimeError(
                        f"none of the blocks {names} produced an output during the forward; check the "
                        "`blocks` patterns and that the forward runs them"
                    )
                if self.residual_gain_iters > 0:  # with the taps removed: its block calls are not recorded
                    raw.residual_gains = self._residual_gains(inputs, seed)
            # 2. the low-precision pass, compared block by block as it runs.
            with ExitStack() as lp:
                lp.enter_context(low_precision())
                raw.dtype = compute_dtype(self.model)
                lp_norms = lp.enter_context(NormCapture(self.norms, variances=False))
                lp.enter_context(BlockTap(block_modules, compare))
                run(*args, **kwargs)
        # ε as training uses it (nn.RMSNorm(eps=None) means finfo of the low-precision input dtype)
        raw.norm_meta = {
            name: (s.d, lp_norms.stats[name].eps if name in lp_norms.stats else s.eps)
            for name, s in norms.stats.items()
        }
        raw.norm_dtypes = {
            name: str(s.compute_dtype).replace("torch.", "") for name, s in lp_norms.stats.items()
        }
        self._collect(raw, attn, heads, ksm_max, norms, mismatch)
        return raw

    def _residual_gains(
        self, inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]], seed: int
    ) -> dict[int, float]:
        gains: dict[int, float] = {}
        for block in self.blocks:
            if block.index not in inputs:
                continue
            args, kwargs = inputs[block.index]
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

    # ------------------------------------------------------------- statistics
    def _collect(
        self,
        raw: RawMeasurement,
        attn: dict[int, list[dict[str, Tensor]]],
        heads: dict[int, int],
        ksm_max: list[Tensor],
        norms: NormCapture,
        mismatch: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor]]],
    ) -> None:
        if ksm_max:
            raw.put("kappa_softmax_max", torch.stack(ksm_max).amax(), "max")
        for index, calls in attn.items():
            for name in ("kappa_score", "kappa_softmax", "kappa_v"):
                raw.put(f"block{index}/{name}", torch.stack([c[name] for c in calls]).amax(), "max")
            raw.put(
                f"block{index}/attention_entropy",
                torch.stack([c["attention_entropy"] for c in calls]).amin(),
                "min",
            )
            if self.log_per_head:
                for name in ("kappa_score", "kappa_softmax", "kappa_v", "attention_entropy"):
                    per_call = [c[name + "@heads"] for c in calls]
                    if len({t.shape for t in per_call}) != 1:
                        per_call = per_call[:1]  # calls with different head counts: the first one's heads
                    entropy = name == "attention_entropy"
                    stacked = torch.stack(per_call)
                    per_head = stacked.amin(0) if entropy else stacked.amax(0)
                    for h in range(per_head.shape[0]):
                        raw.put(f"block{index}/head{h}/{name}", per_head[h], "min" if entropy else "max")
        for name, stats in norms.stats.items():
            raw.put(f"norm/{name}", stats.median_variance(), "min")
        for index, gain in raw.residual_gains.items():
            raw.put(f"block{index}/residual_gain", torch.tensor(gain), "max")
        for index, items in mismatch.items():
            raw.put(f"block{index}/err_sq", torch.stack([m[0] for m in items]).sum(), "sum")
            raw.put(f"block{index}/ref_sq", torch.stack([m[1] for m in items]).sum(), "sum")
            raw.put(f"block{index}/r_block_median", torch.cat([m[2] for m in items]).median(), "max")
            raw.put(f"block{index}/nonfinite", torch.stack([m[3] for m in items]).sum(), "sum")
        self._weights(raw, heads)

    def _weights(self, raw: RawMeasurement, heads: dict[int, int]) -> None:
        """``‖W_O‖₂``, ``κ(W_O)``, ``κ_eff`` and ``κ(W_Kᵀ W_Q)``, with one SVD per weight shape."""
        jobs: list[tuple[str, int, WeightFn]] = []
        for block in self.blocks:
            jobs += [("ffn", block.index, fn) for fn in block.ffn.values()]
            jobs += [("wo", block.index, fn) for fn in block.wo.values()]
        sigma = _grouped_singular_values([fn for _, _, fn in jobs])
        ffn: dict[int, list[Tensor]] = defaultdict(list)
        wo: dict[int, list[Tensor]] = defaultdict(list)
        for (kind, index, _), s in zip(jobs, sigma, strict=True):
            (ffn if kind == "ffn" else wo)[index].append(s)
        for block in self.blocks:
            i = block.index
            if ffn[i]:
                raw.put(
                    f"block{i}/kappa_eff",
                    torch.stack([D.condition_from_singular_values(s) for s in ffn[i]]).sum(),
                    "max",
                )
            if wo[i]:
                raw.put(f"block{i}/wo_norm", torch.stack([s[0] for s in wo[i]]).amax(), "max")
                raw.put(
                    f"block{i}/kappa_wo",
                    torch.stack([D.condition_from_singular_values(s) for s in wo[i]]).amax(),
                    "max",
                )
            if block.qk and i in heads:
                values = []
                for proj in block.qk:
                    w_q, w_k = proj.w_q().float(), proj.w_k().float()
                    n_heads = heads[i]
                    if w_k.shape[0] != w_q.shape[0] and w_q.shape[0] % w_k.shape[0] == 0:
                        d_head = w_q.shape[0] // n_heads
                        rep = w_q.shape[0] // w_k.shape[0]
                        w_k = w_k.reshape(-1, d_head, w_k.shape[1]).repeat_interleave(rep, 0).reshape_as(w_q)
                    if w_q.shape == w_k.shape and w_q.shape[0] % n_heads == 0:
                        values.append(D.kappa_wkwq(w_q, w_k, n_heads).amax())
                if values:
                    raw.put(f"block{i}/kappa_wkwq", torch.stack(values).amax(), "max")


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


def _grouped_singular_values(fns: Sequence[WeightFn]) -> list[Tensor]:
    """``[σmax, σmin]`` of each weight, one batched call per weight shape.

    A weight with a non-finite entry gets ``[inf, 0]`` (so ``‖W‖₂`` and ``κ(W)`` read ``inf``).
    """
    weights = [fn().detach() for fn in fns]
    out: list[Tensor | None] = [None] * len(weights)
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for j, w in enumerate(weights):
        groups[(tuple(w.shape), w.device)].append(j)
    for idx in groups.values():
        stack = torch.stack([weights[j] for j in idx])
        smax, smin = D.extreme_singular_values(stack)
        finite = torch.isfinite(stack).flatten(-2).all(-1)
        sigma = torch.stack([smax.masked_fill(~finite, math.inf), smin.masked_fill(~finite, 0.0)], -1)
        for row, j in zip(sigma, idx, strict=True):
            out[j] = row
    return [s for s in out if s is not None]


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
) -> StabilityReport:
    """Turn reduced raw values (host floats) into a :class:`StabilityReport` (SPEC §2–§5).

    A term that was not measured (a block without attention, say) is left out of the
    combined predictor and counts as 0 in the bound.
    """
    eps = D.eps_mach(raw.dtype)
    blocks: list[BlockReport] = []
    nonfinite = 0
    for block in probe.blocks:
        i = block.index

        def get(name: str, i: int = i) -> float | None:
            return values.get(f"block{i}/{name}")

        report = BlockReport(name=block.name)
        for name in (
            "kappa_score",
            "kappa_softmax",
            "kappa_v",
            "wo_norm",
            "kappa_eff",
            "kappa_wkwq",
            "attention_entropy",
            "r_block_median",
        ):
            setattr(report, name, get(name))
        c_ln: list[float] = []
        rho: list[float] = []
        for norm in probe.norms:
            var = values.get(f"norm/{norm.name}")
            if probe.norm_block.get(norm.name) != i or var is None:
                continue
            d, norm_eps = raw.norm_meta[norm.name]
            rho.append(float(D.rho_ln_from_variance(var, d, norm_eps, eps)))
            c_ln.append(
                float(D.ln_error_coefficient_from_variance(var, norm_eps, *ln_constants, eps_mach=eps, d=d))
            )
        report.c_ln = sum(c_ln) if c_ln else None
        report.rho_ln = min(rho) if rho else None
        err_sq, ref_sq = get("err_sq"), get("ref_sq")
        count = int(get("nonfinite") or 0)
        nonfinite += count
        if err_sq is not None and ref_sq is not None:
            report.r_block = math.inf if count else _ratio(err_sq, ref_sq)
            if count:
                report.r_block_median = math.inf
        report.residual_gain = get("residual_gain")
        attention = 0.0
        ksm, ksc, kv = report.kappa_softmax, report.kappa_score, report.kappa_v
        if ksm is not None and ksc is not None and kv is not None:
            attention = float(
                D.combined_predictor(
                    ksm,
                    ksc,
                    kv,
                    report.wo_norm if report.wo_norm is not None else 1.0,
                    0.0,
                    0.0,
                )
            )
        report.predictor = attention + (report.kappa_eff or 0.0) + (report.c_ln or 0.0)
        report.per_head = {
            name: [values[f"block{i}/head{h}/{name}"] for h in range(_count_heads(values, i, name))]
            for name in ("kappa_score", "kappa_softmax", "kappa_v", "attention_entropy")
            if f"block{i}/head0/{name}" in values
        }
        blocks.append(report)

    out = StabilityReport(
        step=step,
        dtype=str(raw.dtype).replace("torch.", ""),
        eps_mach=eps,
        blocks=blocks,
        nonfinite=nonfinite,
        norm_dtypes=dict(raw.norm_dtypes),
    )
    out.kappa_softmax_max = values.get("kappa_softmax_max")
    predictors = [b.predictor for b in blocks if b.predictor is not None]
    if predictors:
        out.predictor = max(predictors)
        out.predictor_scaled = out.predictor * eps
    if blocks:
        out.r_block = blocks[-1].r_block
        out.r_block_median = blocks[-1].r_block_median
    if blocks and all(b.residual_gain is not None for b in blocks):

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
            eps,
            c=bound_c,
        )
        out.bound, out.bound_rigorous, out.small_gain = bound.first_order, bound.rigorous, bound.small_gain
    return out


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
        for ctx in (torch.no_grad(), preserved_rng(), eval_mode(model), fastpath_disabled(), low_precision()):
            stack.enter_context(ctx)
        model(*args, **kwargs)
    return found[0] if found else None

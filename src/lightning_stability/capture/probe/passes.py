"""The probe's passes: the steps of one :meth:`~.stability_probe.StabilityProbe.measure`.

:class:`_Collector` holds the state of one measurement and runs, in order: the exact FP32 pass
(attention, norm statistics, block outputs, module maxima), the residual gains, the
low-precision pass compared block by block as it runs, the local (teacher-forced) passes, and
:meth:`_Collector.finish` (the statistics). Every pass that runs in the low precision takes the
context factory ``low_precision`` of :meth:`~.stability_probe.StabilityProbe.measure`; an
:class:`~.fp8_pass.FP8Precision` factory runs the propagated pass under its measured context
(per-layer FP8 statistics) and every other low-precision forward under its plain one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_stability import diagnostics as D
from lightning_stability.capture.attention import (
    AttentionCall,
    AttentionCapture,
    call_diagnostics,
)
from lightning_stability.capture.batch import cast_floating
from lightning_stability.capture.blocks import BlockTap, ModuleAmax, first_tensor
from lightning_stability.capture.fp8 import FP8Record
from lightning_stability.capture.hooks import HookContext
from lightning_stability.capture.norms import NormCapture
from lightning_stability.capture.probe.attention_stats import CallValues, block_statistics, call_values
from lightning_stability.capture.probe.fp8_pass import FP8Precision, fp8_statistics
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.probe.spectra import weight_statistics
from lightning_stability.capture.sharding import full_weights, gather_heads, unsharded
from lightning_stability.capture.side_forward import compute_dtype, exact_fp32, rng_restore, rng_snapshot
from lightning_stability.diagnostics.collapse import collapse_statistics
from lightning_stability.metrics import RawKey

if TYPE_CHECKING:
    from lightning_stability.capture.probe.stability_probe import StabilityProbe


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
        self.attn: dict[int, list[CallValues]] = defaultdict(list)
        self.heads: dict[int, int] = {}
        self.ksm_max: list[Tensor] = []
        self.mismatch: dict[tuple[str, int], list[tuple[Tensor, ...]]] = defaultdict(list)
        self.amax: dict[str, Tensor] = {}
        # teacher forcing: (metric, block index, module) → exact-pass calls
        self.local: dict[tuple[str, int], list[_Call]] = defaultdict(list)
        self.local_modules: dict[tuple[str, int], nn.Module] = {}
        self.norms: NormCapture | None = None
        self.lp_norms: NormCapture | None = None
        self.fp8_records: dict[str, FP8Record] = {}

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
            self.raw.put(RawKey("rank_collapse", block.index), rank.mean())
            self.raw.put(RawKey("token_similarity", block.index), similarity.mean())

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
        if block in probe.head_groups:  # tensor parallel: every rank's heads, as in the unsharded model
            call = gather_heads(call, probe.head_groups[block])
        diag = call_diagnostics(call)  # kappa_score is NaN (unknown) for scores-only calls
        self.ksm_max.append(diag.kappa_softmax.amax())
        if block is None:
            return
        self.heads.setdefault(block, call.v.shape[1])
        self.raw.attended.add(block)
        self.attn[block].append(call_values(call, diag, probe))

    # ----------------------------------------------------------- step 2: residual gains
    def residual_gains(self, seed: int) -> None:
        """``ρ_ℓ`` of each block at its exact-pass input (SPEC §5)."""
        probe = self.probe
        gains: dict[int, float] = {}
        for block in probe.blocks:
            calls = self.local.get(("r_local", block.index))
            if not calls:
                continue
            args, kwargs = calls[0].args, calls[0].kwargs
            if not args or not isinstance(args[0], Tensor):
                continue
            branch = _residual_branch(block.module, args[1:], kwargs)
            gen = torch.Generator(device=args[0].device).manual_seed(seed + block.index)
            # forward-mode AD is implemented for the math SDPA kernel, not the fused ones
            with sdpa_kernel([SDPBackend.MATH]):
                gains[block.index] = float(
                    D.residual_gain(branch, args[0].float(), iters=probe.residual_gain_iters, generator=gen)
                )
        self.raw.residual_gains = gains

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
                self.mismatch[("r_block", i)].append(_mismatch(out, x))

        fp8 = low_precision if isinstance(low_precision, FP8Precision) else None
        measured = fp8.measured() if fp8 is not None else None
        with ExitStack() as stack:
            stack.enter_context(low_precision() if measured is None else measured)
            self.raw.dtype = compute_dtype(probe.model) if fp8 is None else fp8.dtype
            self.lp_norms = stack.enter_context(NormCapture(probe.norms, variances=False))
            stack.enter_context(BlockTap([b.module for b in blocks], on_output))
            same_stream()
            run(*args, **kwargs)
        if measured is not None:
            self.fp8_records = measured.records
            self.raw.fp8_unquantized = [*measured.unsupported, *measured.not_called]

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
                stack.enter_context(unsharded(module, self.probe.model))  # a sub-layer inside an FSDP2 block
                for call in calls:
                    out = self._rerun(module, call, low_precision)
                    if out is not None and call.output is not None:
                        self.mismatch[(metric, i)].append(_squares(out, call.output))
            for got, exact in zip(seen, attention or [], strict=False):
                if exact.output is not None:
                    self.mismatch[("r_attention_local", i)].append(_squares(got, exact.output))

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
            raw.put(RawKey("kappa_softmax_max"), torch.stack(self.ksm_max).amax())
        for index, calls in self.attn.items():
            block_statistics(raw, index, calls, probe.log_per_head)
        for name, stats in norms.stats.items():
            raw.put(RawKey("variance", module=name), stats.median_variance())
        for index, gain in raw.residual_gains.items():
            raw.put(RawKey("residual_gain", index), torch.tensor(gain))
        self._mismatch_stats()
        self._amax_stats()
        fp8_statistics(raw, self.fp8_records)
        for blocks in full_weights(probe.blocks):  # sharded: one block at a time, gathered in FP32
            weight_statistics(blocks, self.heads, probe.spectra_of(blocks), raw)
        return raw

    def _mismatch_stats(self) -> None:
        raw = self.raw
        for (metric, i), items in self.mismatch.items():
            raw.put(RawKey("err_sq", i, metric=metric), torch.stack([m[0] for m in items]).sum())
            raw.put(RawKey("ref_sq", i, metric=metric), torch.stack([m[1] for m in items]).sum())
            if metric == "r_block":
                tokens = torch.cat([m[2] for m in items])
                count = torch.tensor(float(tokens.numel()), device=tokens.device)
                raw.put(RawKey("r_block_median", i), tokens.median())
                raw.put(RawKey("token_sum", i, metric="r_block_mean_token"), tokens.double().sum())
                raw.put(RawKey("token_count", i, metric="r_block_mean_token"), count)
                raw.put(RawKey("nonfinite", i, metric="r_block"), torch.stack([m[3] for m in items]).sum())

    def _amax_stats(self) -> None:
        raw, probe = self.raw, self.probe
        for name, value in self.amax.items():
            raw.put(RawKey("amax", module=name), value)
        for block in probe.blocks:
            inside = [v for name, v in self.amax.items() if block.contains(name)]
            if inside:
                raw.put(RawKey("amax", block.index), torch.stack(inside).amax())


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

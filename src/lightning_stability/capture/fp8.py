"""The FP8 what-if: a model's linear layers (optionally its attention matmuls) in FP8 for a forward.

Under :class:`FP8WhatIf` every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's linear
layer) computes its GEMM on FP8-quantized, scaled input and weight with FP32 accumulation —
emulated as :func:`~lightning_stability.diagnostics.fp8_recipe.fp8_linear` does: the FP8 grid
values multiplied in FP32 with the scales applied as ``torch._scaled_mm`` applies them, equal to
an FP8 GEMM with FP32 accumulation up to the summation order. The bias is added in FP32 and the
output is cast to the autocast dtype, as an FP8 GEMM's BF16 output. Everything else runs as
under BF16 autocast (the context enters it). With ``attention=True`` the attention matmuls
(``QKᵀ`` and ``PV``) of every ``F.scaled_dot_product_attention`` call run in FP8 too, as
TransformerEngine's ``fp8_dpa=True`` does; no recipe does this by default (TE's
``DelayedScaling``/``Float8CurrentScaling``/``MXFP8BlockScaling`` all default to
``fp8_dpa=False``, torchao's float8 training converts linear layers only, DeepSeek-V3 kept
attention in BF16).

Per layer (by module name) it records the statistics of
:class:`~lightning_stability.diagnostics.fp8.FP8TensorStats` for each quantized operand and
the error of the layer's output against the same layer in exact FP32 on the same input, next
to the error of the same layer under plain autocast (the BF16 baseline).

Not covered, and reported: linear layers whose class overrides ``forward`` (LoRA wrappers,
quantized layers) are left alone (:attr:`FP8WhatIf.unsupported`); a linear layer whose weight
a parent uses directly (``nn.MultiheadAttention``'s ``out_proj``) never runs its forward and
so never shows up in :attr:`FP8WhatIf.records` (:attr:`FP8WhatIf.not_called`); attention
written with explicit matmuls (transformers' ``eager``) stays in the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_stability.capture.hooks import HookContext
from lightning_stability.diagnostics.fp8 import FP8TensorStats
from lightning_stability.diagnostics.fp8_recipe import (
    AmaxHistory,
    FP8Recipe,
    RecipeName,
    fp8_attention,
    fp8_linear,
)

__all__ = ["FP8Record", "FP8WhatIf", "linear_layers"]

_F64 = torch.float64
Kind = Literal["linear", "attention"]


@dataclass
class FP8Record:
    """What one layer did under FP8 during the forwards of one ``with`` (calls summed).

    Args:
        kind: ``"linear"`` or ``"attention"``.
        calls: forward calls seen.
        operands: statistics per quantized operand (``input``/``weight``; ``q``/``k``/``p``/``v``).
        err_sq: Σ ‖y_fp8 − y_fp32‖² of the layer's output (float64).
        ref_sq: Σ ‖y_fp32‖².
        err_sq_autocast: Σ ‖y_autocast − y_fp32‖² (``None`` without autocast dtype).
        token_err: Σ over output rows (tokens; heads too for attention) of ‖Δy_row‖/‖y_row‖.
        token_err_autocast: the same for the autocast output.
        tokens: output rows.
    """

    kind: Kind
    calls: int = 0
    operands: dict[str, FP8TensorStats] = field(default_factory=dict)
    err_sq: Tensor | None = None
    ref_sq: Tensor | None = None
    err_sq_autocast: Tensor | None = None
    token_err: Tensor | None = None
    token_err_autocast: Tensor | None = None
    tokens: int = 0

    @property
    def relative_error(self) -> Tensor | None:
        """‖y_fp8 − y_fp32‖/‖y_fp32‖ over every output element of every call."""
        return _relative(self.err_sq, self.ref_sq)

    @property
    def relative_error_autocast(self) -> Tensor | None:
        """The same for the layer under plain autocast (the baseline FP8 is compared with)."""
        return _relative(self.err_sq_autocast, self.ref_sq)

    @property
    def mean_token_error(self) -> Tensor | None:
        """Mean over output rows of the per-row relative error (not dominated by a few huge rows)."""
        return None if self.token_err is None else self.token_err / max(self.tokens, 1)

    @property
    def mean_token_error_autocast(self) -> Tensor | None:
        """The same for the layer under plain autocast."""
        return None if self.token_err_autocast is None else self.token_err_autocast / max(self.tokens, 1)

    def add(self, operands: dict[str, FP8TensorStats], errors: _Errors | None) -> None:
        """Fold one call in."""
        self.calls += 1
        for key, stats in operands.items():
            self.operands[key] = stats if key not in self.operands else self.operands[key].merge(stats)
        if errors is None:
            return
        self.err_sq = _plus(self.err_sq, errors.err_sq)
        self.ref_sq = _plus(self.ref_sq, errors.ref_sq)
        self.token_err = _plus(self.token_err, errors.token_err)
        self.err_sq_autocast = _plus(self.err_sq_autocast, errors.err_sq_autocast)
        self.token_err_autocast = _plus(self.token_err_autocast, errors.token_err_autocast)
        self.tokens += errors.tokens


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _relative(err_sq: Tensor | None, ref_sq: Tensor | None) -> Tensor | None:
    if err_sq is None or ref_sq is None:
        return None
    ok = ref_sq > 0
    return torch.where(
        ok, err_sq / torch.where(ok, ref_sq, 1.0), torch.where(err_sq > 0, torch.inf, 0.0)
    ).sqrt()


@dataclass
class _Errors:
    err_sq: Tensor
    ref_sq: Tensor
    token_err: Tensor
    tokens: int
    err_sq_autocast: Tensor | None = None
    token_err_autocast: Tensor | None = None


def _row_errors(y: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ‖y − ref‖², Σ over rows of ‖Δ_row‖/‖ref_row‖): FP32 differences, float64 sums; 0/0 rows count 0."""
    err_rows = torch.linalg.vector_norm(y.float() - ref, dim=-1, dtype=_F64)
    ref_rows = torch.linalg.vector_norm(ref, dim=-1, dtype=_F64)
    ratio = torch.where(ref_rows > 0, err_rows / torch.where(ref_rows > 0, ref_rows, 1.0), 0.0)
    ratio = torch.where((ref_rows == 0) & (err_rows > 0), torch.inf, ratio)
    return err_rows.square().sum(), ratio.sum()


def _errors(y: Tensor, ref: Tensor, baseline: Tensor | None) -> _Errors:
    """Errors of ``y`` (and of ``baseline``) against the FP32 reference ``ref``."""
    err_sq, token_err = _row_errors(y, ref)
    ref_sq = torch.linalg.vector_norm(ref, dtype=_F64).square()
    out = _Errors(err_sq, ref_sq, token_err, ref[..., 0].numel())
    if baseline is not None:
        out.err_sq_autocast, out.token_err_autocast = _row_errors(baseline, ref)
    return out


def linear_layers(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, bool]], list[str]]:
    """The linear layers :class:`FP8WhatIf` runs in FP8, and the ones it must leave alone.

    Returns:
        ``({name: (module, weight stored transposed)}, [names of linear layers with their own
        forward or a non-floating weight])``. ``nn.Linear`` subclasses that keep
        ``nn.Linear.forward`` are taken; transformers' ``Conv1D`` stores its weight ``(in, out)``.
    """
    found: dict[str, tuple[nn.Module, bool]] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        floating = isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() == 2
        if isinstance(module, nn.Linear):
            if type(module).forward is nn.Linear.forward and floating:
                found[name] = (module, False)
            else:
                unsupported.append(name)
        elif type(module).__name__ == "Conv1D" and floating:
            found[name] = (module, True)
    return found, unsupported


def _out_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


#: ``F.scaled_dot_product_attention``'s positional parameters, in order
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _AttentionMode(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` calls to the what-if; everything else through."""

    def __init__(self, handler: Callable[..., Tensor]) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.handler(func, args, kwargs)
        return func(*args, **kwargs)


class FP8WhatIf(HookContext):
    """Context manager: the model's linear layers (and optionally attention) in FP8, the rest in autocast.

    Inside the ``with`` the forwards of the linear layers are replaced (instance attributes,
    removed on exit, also when the forward raises), autocast to ``autocast_dtype`` and
    ``torch.no_grad`` are on. Parameters, buffers and RNG are never touched; outside the ``with``
    the model computes exactly as before. A delayed-scaling recipe reads and updates
    ``history`` (an :class:`~lightning_stability.diagnostics.fp8_recipe.AmaxHistory` the caller
    owns and passes again next time; one is made if none is given): its scales advance on exit
    when ``update_history`` (one ``with`` = one step, as one TE ``fp8_autocast`` forward).

    Args:
        model: any ``nn.Module``.
        recipe: an :class:`~lightning_stability.diagnostics.fp8_recipe.FP8Recipe` or its name
            (``"current"``, ``"delayed"``, ``"mxfp8"``).
        history: delayed scaling's state.
        attention: also run ``QKᵀ`` and ``PV`` of every SDPA call in FP8.
        autocast_dtype: autocast around everything else (``None``: leave autocast as it is).
        measure_error: compute the FP32 reference and the autocast baseline of every layer call.
        update_history: advance ``history`` on exit.
        exclude: module names left in the autocast dtype (not quantized, not recorded).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> with FP8WhatIf(model, "mxfp8") as fp8:
        ...     y = model(torch.randn(4, 64))
        >>> sorted(fp8.records), y.dtype, "forward" in model[0].__dict__
        (['0', '2'], torch.bfloat16, False)
        >>> float(fp8.records["0"].relative_error) < 0.1
        True
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: FP8Recipe | RecipeName = "current",
        *,
        history: AmaxHistory | None = None,
        attention: bool = False,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        measure_error: bool = True,
        update_history: bool = True,
        exclude: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe if isinstance(recipe, FP8Recipe) else FP8Recipe(recipe)
        if history is None and self.recipe.name == "delayed":
            history = self.recipe.new_history()
        self.history = history
        self.attention = attention
        self.autocast_dtype = autocast_dtype
        self.measure_error = measure_error
        self.update_history = update_history
        self.layers, self.unsupported = linear_layers(model)
        self.layers = {k: v for k, v in self.layers.items() if k not in set(exclude)}
        self.records: dict[str, FP8Record] = {}
        self.skipped_attention: list[str] = []
        self._scope: list[str] = []

    @property
    def not_called(self) -> list[str]:
        """Linear layers that were set up but never ran their own forward."""
        return [name for name in self.layers if name not in self.records]

    def _reset(self) -> None:
        self.records = {}
        self.skipped_attention = []
        self._scope = []

    def _install(self, stack: ExitStack) -> None:
        if self.update_history and self.history is not None:
            stack.callback(self.history.update)  # runs last: after every call of the step
        stack.enter_context(torch.no_grad())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self._device_type(), dtype=self.autocast_dtype))
        for name, (module, transposed) in self.layers.items():
            self._replace_forward(stack, name, module, transposed)
        if self.attention:
            for name, module in self.model.named_modules():
                stack.enter_context(module.register_forward_pre_hook(self._enter_scope(name)))
                stack.enter_context(module.register_forward_hook(self._leave_scope, always_call=True))
            stack.enter_context(_AttentionMode(self._attention))

    def _device_type(self) -> str:
        param = next(self.model.parameters(), None)
        return "cpu" if param is None else param.device.type

    def _replace_forward(self, stack: ExitStack, name: str, module: nn.Module, transposed: bool) -> None:
        saved = module.__dict__.get("forward")

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return self._linear(name, module, transposed, x)

        def restore() -> None:
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved

        stack.callback(restore)
        module.forward = forward

    def _linear(self, name: str, module: nn.Module, transposed: bool, x: Tensor) -> Tensor:
        weight: Tensor = module.weight.t() if transposed else module.weight  # type: ignore[operator, assignment]
        bias = b if isinstance(b := getattr(module, "bias", None), Tensor) else None
        out_dtype = _out_dtype(x)
        keys = (f"{name}/input", f"{name}/weight")
        with torch.autocast(x.device.type, enabled=False):
            y32, qx, qw = fp8_linear(x, weight, bias, self.recipe, history=self.history, keys=keys)
            y = y32.to(out_dtype)
            errors = self._linear_errors(x, weight, bias, y, out_dtype) if self.measure_error else None
        self.records.setdefault(name, FP8Record("linear")).add(
            {"input": qx.stats, "weight": qw.stats}, errors
        )
        return y

    @staticmethod
    def _linear_errors(x: Tensor, w: Tensor, b: Tensor | None, y: Tensor, dtype: torch.dtype) -> _Errors:
        precision = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")
            ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        finally:
            torch.set_float32_matmul_precision(precision)
        baseline = None
        if dtype != torch.float32:
            baseline = F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
        return _errors(y, ref, baseline)

    def _enter_scope(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._scope.append(name)

        return hook

    def _leave_scope(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._scope:
            self._scope.pop()

    def _attention(
        self, func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        call = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
        name = self._scope[-1] if self._scope else ""
        if float(call.get("dropout_p", 0.0)) > 0:
            self.skipped_attention.append(name)  # its dropout mask is not emulated: the call runs as is
            return func(*args, **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        out_dtype = _out_dtype(q)
        mask = call.get("attn_mask")
        options: dict[str, Any] = {
            "attn_mask": mask,
            "is_causal": bool(call.get("is_causal", False)),
            "scale": call.get("scale"),
        }
        if call.get("enable_gqa", False):
            options["enable_gqa"] = True  # passed on only when set (older torch has no such argument)
        # the baseline: this very call under the autocast around it
        baseline = func(*args, **kwargs) if self.measure_error and out_dtype != torch.float32 else None
        with torch.autocast(q.device.type, enabled=False):
            o32, quant = fp8_attention(q, k, v, self.recipe, history=self.history, key=name, **options)
            y = o32.to(out_dtype)
            errors = None
            if self.measure_error:
                fp32_mask = mask.float() if isinstance(mask, Tensor) and mask.is_floating_point() else mask
                ref = func(q.float(), k.float(), v.float(), **(options | {"attn_mask": fp32_mask}))
                errors = _errors(y, ref, baseline)
        record = self.records.setdefault(name, FP8Record("attention"))
        record.add({key: qz.stats for key, qz in quant.items()}, errors)
        return y

"""FP8 recipes: which scaling each one uses, delayed scaling's state, and GEMMs on FP8 operands.

The recipes, named as TransformerEngine names them (``transformer_engine/common/recipe/__init__.py``),
all with E4M3 in the forward pass:

* ``"current"`` — ``Float8CurrentScaling``: one FP32 scale per tensor from this tensor's amax
  (:func:`~.fp8.quantize_current`).
* ``"delayed"`` — ``DelayedScaling``: one FP32 scale per tensor from an amax *history* of
  earlier steps (``delayed_scaling.cu``): the amax of this step is recorded in slot 0 of an
  ``amax_history_len`` window; at the end of the step the amax used is the window's max
  (``amax_compute_algo="max"``) or slot 0 (``"most_recent"``), the window rolls, and
  ``scale = fp8_max · 2^(−margin) / amax`` (unchanged when that amax is 0 or not finite).
  The first step quantizes with scale 1. :class:`AmaxHistory` holds that state.
* ``"mxfp8"`` — ``MXFP8BlockScaling`` (OCP MX): a power-of-two scale per 32 consecutive
  elements along the reduction dimension (:func:`~.fp8.quantize_mx`), rounded up as
  TransformerEngine and cuBLAS do (``mx_rounding="rceil"``; the spec's ``"floor"`` selectable).

The GEMM (:func:`fp8_matmul`) multiplies the FP8 grid values in FP32 and applies the scales
as ``torch._scaled_mm`` and the FP8 tensor cores do: per-tensor scales multiply the FP32
result, block scales are exact powers of two applied per block. The result equals an FP8
GEMM with exact FP32 accumulation up to the order of the FP32 summation; the hardware's own
accumulation (e.g. Hopper's reduced-precision FP8 accumulators, which TransformerEngine's
``use_split_accumulator`` and DeepSeek-V3's periodic FP32 promotion work around) is not
emulated.

:func:`fp8_attention` is attention with both of its matmuls (``QKᵀ`` and ``PV``) in FP8, as
TransformerEngine's FP8 dot-product attention (``fp8_dpa=True``, off by default in every
recipe) computes it: Q, K, V and the softmax output P quantized with the recipe's scaling,
scores and softmax in FP32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .fp8 import (
    E4M3,
    FORMATS,
    FP8Format,
    FP8Quantized,
    MXRounding,
    quantize_current,
    quantize_mx,
    quantize_with_scale,
)

__all__ = ["RECIPES", "AmaxHistory", "FP8Recipe", "fp8_attention", "fp8_linear", "fp8_matmul", "quantize"]

RecipeName = Literal["current", "delayed", "mxfp8"]
AmaxAlgo = Literal["max", "most_recent"]
#: the recipe names :class:`FP8Recipe` accepts
RECIPES: tuple[str, ...] = ("current", "delayed", "mxfp8")

_F32 = torch.float32


class AmaxHistory:
    """Delayed scaling's state: an amax history and a scale per tensor key, owned by the caller.

    Mirrors TransformerEngine's ``DelayedScaling`` (``delayed_scaling.cu``): :meth:`record`
    max-accumulates this step's amax into slot 0 of the key's window (NaN ignored); :meth:`update`
    (TE: at the end of each ``fp8_autocast`` forward) picks the amax — the window's max or the
    most recent — rolls the window, and sets ``scale = fp8_max · 2^(−margin) / amax`` (unchanged
    when that amax is 0 or not finite). Keys never updated quantize with scale 1 (TE's initial
    scale). :meth:`state_dict` / :meth:`load_state_dict` save and restore it.

    Args:
        amax_history_len: window length (TE default 1024).
        amax_compute_algo: ``"max"`` or ``"most_recent"``.
        margin: the scale is divided by ``2^margin``.
        fmt: the element format.

    Example:
        >>> h = AmaxHistory(amax_history_len=2)
        >>> h.record("fc/input", torch.tensor(7.0)); h.update(); float(h.scale("fc/input"))
        64.0
        >>> h.record("fc/input", torch.tensor(3.5)); h.update(); float(h.scale("fc/input"))
        64.0
    """

    def __init__(
        self,
        amax_history_len: int = 1024,
        amax_compute_algo: AmaxAlgo = "max",
        margin: int = 0,
        fmt: FP8Format = E4M3,
    ) -> None:
        if not isinstance(amax_history_len, int) or amax_history_len < 1:
            raise ValueError(
                f"AmaxHistory: amax_history_len must be a positive int, got {amax_history_len!r}"
            )
        if amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(
                f"AmaxHistory: amax_compute_algo must be 'max' or 'most_recent', got {amax_compute_algo!r}"
            )
        if not isinstance(margin, int):
            raise ValueError(f"AmaxHistory: margin must be an int, got {margin!r}")
        self.amax_history_len = amax_history_len
        self.amax_compute_algo: AmaxAlgo = amax_compute_algo
        self.margin = margin
        self.fmt = fmt
        self.histories: dict[str, Tensor] = {}
        self.scales: dict[str, Tensor] = {}
        self._pending: set[str] = set()

    def scale(self, key: str, device: torch.device | str = "cpu") -> Tensor:
        """The FP32 scale ``key`` quantizes with in the current step (1 before its first update)."""
        s = self.scales.get(key)
        return torch.ones((), dtype=_F32, device=device) if s is None else s.to(device)

    def record(self, key: str, amax: Tensor) -> None:
        """Max-accumulate ``amax`` into this step's slot of ``key``'s history."""
        h = self.histories.get(key)
        if h is None:
            h = self.histories[key] = torch.zeros(self.amax_history_len, dtype=_F32, device=amax.device)
        h[0] = torch.fmax(h[0], amax.detach().to(h))
        self._pending.add(key)

    def update(self) -> None:
        """End of a step: new scales from the histories of the keys recorded since the last update."""
        for key in sorted(self._pending):
            h = self.histories[key]
            amax = h.amax() if self.amax_compute_algo == "max" else h[0].clone()
            self.histories[key] = h = torch.roll(h, -1, 0)
            h[0] = 0.0
            old = self.scale(key, h.device)
            new = torch.tensor(self.fmt.max * 2.0**-self.margin, dtype=_F32, device=h.device) / amax
            self.scales[key] = torch.where(torch.isfinite(amax) & (amax > 0), new, old)
        self._pending.clear()

    def state_dict(self) -> dict[str, Any]:
        """Settings, histories and scales (tensors cloned)."""
        return {
            "amax_history_len": self.amax_history_len,
            "amax_compute_algo": self.amax_compute_algo,
            "margin": self.margin,
            "format": self.fmt.name,
            "histories": {k: v.clone() for k, v in self.histories.items()},
            "scales": {k: v.clone() for k, v in self.scales.items()},
            "pending": sorted(self._pending),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (settings included)."""
        fresh = AmaxHistory(
            state["amax_history_len"], state["amax_compute_algo"], state["margin"], FORMATS[state["format"]]
        )
        self.__dict__.update(fresh.__dict__)
        self.histories = {k: v.clone() for k, v in state["histories"].items()}
        self.scales = {k: v.clone() for k, v in state["scales"].items()}
        self._pending = set(state["pending"])


# ----------------------------------------------------------------------------- recipes and GEMMs
@dataclass(frozen=True)
class FP8Recipe:
    """Which scaling, with TransformerEngine's parameter names.

    Args:
        name: ``"current"`` (``Float8CurrentScaling``), ``"delayed"`` (``DelayedScaling``) or
            ``"mxfp8"`` (``MXFP8BlockScaling``).
        fmt: the forward element format (:data:`E4M3`, as in TE's ``HYBRID`` forward and MXFP8).
        margin: delayed scaling's margin.
        amax_history_len: delayed scaling's window.
        amax_compute_algo: delayed scaling's ``"max"`` or ``"most_recent"``.
        amax_epsilon: current scaling's amax floor.
        power_2_scale: current scaling's power-of-two scales.
        block_size: MX block length.
        mx_rounding: MX scale rule, ``"rceil"`` (default: TE / cuBLAS, what MXFP8 hardware
            computes) or ``"floor"`` (the OCP spec's rule, which lets block maxima saturate).
    """

    name: RecipeName = "current"
    fmt: FP8Format = E4M3
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: AmaxAlgo = "max"
    amax_epsilon: float = 0.0
    power_2_scale: bool = False
    block_size: int = 32
    mx_rounding: MXRounding = "rceil"

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"FP8Recipe: name must be one of {RECIPES}, got {self.name!r}")
        if self.mx_rounding not in ("floor", "rceil"):
            raise ValueError(f"FP8Recipe: mx_rounding must be 'floor' or 'rceil', got {self.mx_rounding!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"FP8Recipe: block_size must be a positive int, got {self.block_size!r}")
        AmaxHistory(self.amax_history_len, self.amax_compute_algo, self.margin, self.fmt)  # validates

    def new_history(self) -> AmaxHistory:
        """An empty :class:`AmaxHistory` with this recipe's delayed-scaling settings."""
        return AmaxHistory(self.amax_history_len, self.amax_compute_algo, self.margin, self.fmt)


def quantize(
    x: Tensor, recipe: FP8Recipe, *, dim: int = -1, history: AmaxHistory | None = None, key: str = ""
) -> FP8Quantized:
    """Quantize ``x`` as ``recipe`` does; ``dim`` is the reduction dimension (used by block scaling).

    Delayed scaling quantizes with ``history.scale(key)`` and records ``x``'s amax under ``key``.
    """
    if recipe.name == "current":
        return quantize_current(
            x, recipe.fmt, amax_epsilon=recipe.amax_epsilon, power_2_scale=recipe.power_2_scale
        )
    if recipe.name == "mxfp8":
        return quantize_mx(x, recipe.fmt, block_size=recipe.block_size, dim=dim, rounding=recipe.mx_rounding)
    if history is None:
        raise ValueError("quantize: the 'delayed' recipe needs an AmaxHistory (history=...)")
    q = quantize_with_scale(x, history.scale(key, x.device), recipe.fmt)
    history.record(key, q.stats.amax)
    return q


def fp8_matmul(
    a: Tensor,
    b: Tensor,
    recipe: FP8Recipe,
    *,
    history: AmaxHistory | None = None,
    keys: tuple[str, str] = ("a", "b"),
) -> tuple[Tensor, FP8Quantized, FP8Quantized]:
    """``a @ b`` on FP8 operands with FP32 accumulation (batched like ``torch.matmul``).

    ``a`` is quantized along its last dim and ``b`` along its second-to-last (both the
    reduction dim K). Per-tensor recipes multiply the grid values in FP32 and scale the result
    by ``scale_inv_a · scale_inv_b`` (``torch._scaled_mm``'s arithmetic); block scaling
    multiplies the exactly dequantized operands.

    Returns:
        ``(a @ b in float32, quantized a, quantized b)``.
    """
    qa = quantize(a, recipe, dim=-1, history=history, key=keys[0])
    qb = quantize(b, recipe, dim=-2, history=history, key=keys[1])
    if qa.block_size is None:
        out = (qa.data @ qb.data) * (qa.scale_inv * qb.scale_inv)
    else:
        out = qa.dequantize() @ qb.dequantize()
    return out, qa, qb


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    recipe: FP8Recipe,
    *,
    history: AmaxHistory | None = None,
    keys: tuple[str, str] = ("input", "weight"),
) -> tuple[Tensor, FP8Quantized, FP8Quantized]:
    """``x Wᵀ + b`` with the GEMM in FP8 (input and ``(out, in)`` weight quantized along ``in``).

    The bias is added to the FP32 result (the GEMM epilogue's order). Returns
    ``(output in float32 shaped (..., out), quantized input (M, in), quantized weightᵀ (in, out))``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    out, qx, qw = fp8_matmul(x2, weight.t(), recipe, history=history, keys=keys)
    if bias is not None:
        out = out + bias.detach().to(_F32)
    return out.reshape(*x.shape[:-1], weight.shape[0]), qx, qw


def fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    recipe: FP8Recipe,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    history: AmaxHistory | None = None,
    key: str = "attention",
) -> tuple[Tensor, dict[str, FP8Quantized]]:
    """``F.scaled_dot_product_attention`` (no dropout) with ``QKᵀ`` and ``PV`` on FP8 operands.

    Q and K are quantized along the head dim (the reduction of ``QKᵀ``), P and V along the
    keys (the reduction of ``PV``); scores, mask and softmax in FP32. Masks as SDPA takes them:
    boolean (True = attend) or additive; ``is_causal`` is SDPA's top-left-aligned lower triangle.

    Returns:
        ``(output in float32, {"q", "k", "p", "v": FP8Quantized})``; delayed-scaling keys are
        ``f"{key}/q"`` etc.
    """
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    keys = (f"{key}/q", f"{key}/k")
    s, qq, qk = fp8_matmul(q, k.transpose(-2, -1), recipe, history=history, keys=keys)
    s = s * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.to(_F32)
    p = torch.softmax(s, dim=-1)
    out, qp, qv = fp8_matmul(p, v, recipe, history=history, keys=(f"{key}/p", f"{key}/v"))
    return out, {"q": qq, "k": qk, "p": qp, "v": qv}

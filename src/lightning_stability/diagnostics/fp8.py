"""FP8 quantization as the FP8 training recipes do it, emulated exactly on any device.

Formats (Micikevicius et al. 2022, "FP8 formats for deep learning", arXiv 2209.05433):

* **E4M3** (``torch.float8_e4m3fn``): 3 mantissa bits, no infinities, max 448, smallest
  normal 2⁻⁶, subnormals down to 2⁻⁹. The forward format of every recipe below.
* **E5M2** (``torch.float8_e5m2``): 2 mantissa bits, IEEE-like, max 57344, subnormals down to
  2⁻¹⁶. The gradient format of TransformerEngine's ``HYBRID`` recipes.

Rounding is to nearest, ties to even, on the format's grid (subnormals included);
finite values past the format's max and ±inf *saturate* to ±max (CUDA's ``__NV_SATFINITE``
conversion that TransformerEngine uses; torch's own E5M2 cast would give inf); NaN stays NaN.

Scaling, as the recipes of TransformerEngine (``transformer_engine/common/recipe/__init__.py``)
and the OCP Microscaling spec do it (which recipe uses which: :mod:`.fp8_recipe`):

* per tensor (:func:`quantize_with_scale`, :func:`quantize_current`): one FP32 scale,
  ``FP8 value = round(x · scale)``, ``scale = fp8_max / amax`` for current scaling
  (``recipe_common.cuh::compute_scale_from_amax``: amax floored at ``amax_epsilon``; amax 0,
  inf or NaN → scale 1; an infinite scale → FP32 max; ``power_2_scale`` truncates the scale
  to a power of two);
* per block (:func:`quantize_mx`, MXFP8 — OCP Microscaling Formats spec v1.0 §5, §6.3):
  blocks of 32 consecutive elements along the GEMM's reduction (K) dimension share one
  power-of-two E8M0 scale ``X``; elements are E4M3. The default scale is the one
  TransformerEngine and cuBLAS on Blackwell compute, what MXFP8 training hardware does
  (``"rceil"``: ``X = 2^⌈log₂(amax/448)⌉``, the scale rounded up, nothing saturates). The
  OCP spec's own rule stays selectable (``"floor"``, torchao's ``ScaleCalculationMode.FLOOR``
  in ``torchao/prototype/mx_formats/mx_tensor.py::to_mx``): ``X = 2^(⌊log₂ amax⌋ − emax)``,
  ``emax = 8`` for E4M3, so the block's largest elements can exceed 448 and saturate (by up
  to 12.5%). A block holding NaN or ±inf gets the NaN scale: every element of it becomes
  NaN (spec §5.3).

Statistics (:class:`FP8TensorStats`) follow TransformerEngine's FP8 debug statistics
(``transformer_engine/debug/features/log_fp8_tensor_stats.py`` and
``debug/features/utils/stats_computation.py``: ``underflows%``, ``overflows%``,
``scale_inv_min``/``max``, ``mse``) with one difference: the underflow fraction here counts
only elements that were non-zero before quantization (TE's counts every zero of the FP8
tensor, so true zeros such as ReLU outputs read as underflows there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_tensor

__all__ = [
    "E4M3",
    "E5M2",
    "FORMATS",
    "FP8Format",
    "FP8Quantized",
    "FP8TensorStats",
    "current_scale",
    "fp8_round",
    "mx_scale_exponent",
    "quantize_current",
    "quantize_mx",
    "quantize_with_scale",
]

MXRounding = Literal["floor", "rceil"]

_F32 = torch.float32
_F64 = torch.float64
_FP32_MAX = float(torch.finfo(_F32).max)
_E8M0_MIN, _E8M0_MAX = -127, 127


@dataclass(frozen=True)
class FP8Format:
    """An FP8 element format.

    Args:
        name: ``"e4m3"`` or ``"e5m2"``.
        dtype: the torch dtype whose cast rounds to this grid.
        max: largest finite magnitude.
        min_normal: smallest normal magnitude.
        min_subnormal: smallest non-zero magnitude.
        mantissa_bits: explicit mantissa bits.
        emax: exponent of the largest power of two ≤ ``max`` (the MX spec's ``emax_elem``).
    """

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int
    emax: int


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 3, 8)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 2, 15)
#: the formats by name
FORMATS = {f.name: f for f in (E4M3, E5M2)}


def fp8_round(y: Tensor, fmt: FP8Format = E4M3) -> Tensor:
    """Round FP32 values to the FP8 grid: nearest, ties to even, saturating; NaN stays NaN.

    Args:
        y: values already scaled into the format's range (any floating dtype; read as FP32).
        fmt: :data:`E4M3` or :data:`E5M2`.

    Returns:
        The grid values as a float32 tensor (exact: every FP8 value is an FP32 value).

    Example:
        >>> fp8_round(torch.tensor([1.0625, 1.1875, 500.0, -float("inf"), 2.0**-10]))
        tensor([   1.0000,    1.2500,  448.0000, -448.0000,    0.0000])
    """
    y32 = y.to(_F32)
    return y32.clamp(-fmt.max, fmt.max).to(fmt.dtype).to(_F32)


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class FP8TensorStats:
    """Statistics of one quantized tensor (or a merge of several): 0-d tensors, no host sync.

    Args:
        numel: elements.
        nonzero: finite elements that were non-zero before quantization.
        underflow: of those, elements whose FP8 value is zero.
        saturated: elements whose scaled magnitude exceeded the format's max (clipped to
            ±max; ±inf included) — TransformerEngine's ``overflows``.
        nonfinite: NaN or ±inf elements of the input.
        amax: max |x| over the input, NaN ignored (as the amax kernels' ``fmaxf``).
        scale_inv_min: smallest dequantization factor (``1/scale``; the block scale ``X`` for MX).
        scale_inv_max: largest dequantization factor.
        err_sq: Σ (dequantized − x)² over finite elements, float64.
        ref_sq: Σ x² over finite elements, float64.
    """

    numel: Tensor
    nonzero: Tensor
    underflow: Tensor
    saturated: Tensor
    nonfinite: Tensor
    amax: Tensor
    scale_inv_min: Tensor
    scale_inv_max: Tensor
    err_sq: Tensor
    ref_sq: Tensor

    @property
    def underflow_fraction(self) -> Tensor:
        """Non-zero elements that became zero, over the non-zero elements (0 when there are none)."""
        return self.underflow.to(_F64) / self.nonzero.clamp(min=1).to(_F64)

    @property
    def saturation_fraction(self) -> Tensor:
        """Elements clipped at the format's max, over all elements (TE's ``overflows%`` / 100)."""
        return self.saturated.to(_F64) / self.numel.clamp(min=1).to(_F64)

    @property
    def relative_error(self) -> Tensor:
        """``‖dequantized − x‖/‖x‖`` over finite elements (0 when both are 0)."""
        return _relative(self.err_sq, self.ref_sq)

    def merge(self, other: FP8TensorStats) -> FP8TensorStats:
        """Statistics of both tensors together (counts and squares summed, extremes kept)."""
        return FP8TensorStats(
            numel=self.numel + other.numel,
            nonzero=self.nonzero + other.nonzero,
            underflow=self.underflow + other.underflow,
            saturated=self.saturated + other.saturated,
            nonfinite=self.nonfinite + other.nonfinite,
            amax=torch.fmax(self.amax, other.amax),
            scale_inv_min=torch.fmin(self.scale_inv_min, other.scale_inv_min),
            scale_inv_max=torch.fmax(self.scale_inv_max, other.scale_inv_max),
            err_sq=self.err_sq + other.err_sq,
            ref_sq=self.ref_sq + other.ref_sq,
        )

    def as_floats(self) -> dict[str, float]:
        """Every field and derived fraction as a Python float (one host sync per value)."""
        out = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        out["underflow_fraction"] = float(self.underflow_fraction)
        out["saturation_fraction"] = float(self.saturation_fraction)
        out["relative_error"] = float(self.relative_error)
        return out


def _relative(err_sq: Tensor, ref_sq: Tensor) -> Tensor:
    """``sqrt(err_sq/ref_sq)``; 0 when both are 0, inf when only the reference is."""
    ratio = err_sq / torch.where(ref_sq > 0, ref_sq, torch.ones_like(ref_sq))
    ratio = torch.where(ref_sq > 0, ratio, torch.where(err_sq > 0, math.inf, 0.0))
    return ratio.sqrt()


def _amax(x32: Tensor) -> Tensor:
    """max |x| with NaN ignored and ±inf kept; 0 for an empty tensor."""
    a = torch.nan_to_num(x32.abs(), nan=0.0, posinf=math.inf)
    return a.amax() if a.numel() else a.new_zeros(())


def _sum_sq(t: Tensor) -> Tensor:
    """Σ t² accumulated in float64 (no float64 copy of ``t``)."""
    return torch.linalg.vector_norm(t, dtype=_F64).square()


def _stats(
    x32: Tensor, y: Tensor, q: Tensor, deq: Tensor, scale_inv: Tensor, fmt: FP8Format, amax: Tensor
) -> FP8TensorStats:
    """Statistics from the input, its scaled values, their grid values and the dequantized values.

    The squared errors are float64 sums of FP32 differences: exact for block scaling, and for
    per-tensor scaling within one FP32 rounding of ``q · scale_inv`` (2⁻²⁴ of the value, against
    an error of about 2⁻⁵ of it).
    """
    finite = torch.isfinite(x32)
    xf = torch.where(finite, x32, 0.0)
    nonzero = xf != 0
    s = scale_inv.to(_F32)
    s_ok = ~torch.isnan(s)
    return FP8TensorStats(
        numel=torch.tensor(x32.numel(), dtype=torch.int64, device=x32.device),
        nonzero=nonzero.sum(),
        underflow=(nonzero & (q == 0)).sum(),
        saturated=(y.abs() > fmt.max).sum(),
        nonfinite=x32.numel() - finite.sum(),
        amax=amax.to(_F64),
        scale_inv_min=torch.where(s_ok, s, math.inf).amin().to(_F64),
        scale_inv_max=torch.where(s_ok, s, -math.inf).amax().to(_F64),
        err_sq=_sum_sq(torch.where(finite, deq - xf, 0.0)),
        ref_sq=_sum_sq(xf),
    )


# ----------------------------------------------------------------------------- quantized tensors
@dataclass(frozen=True)
class FP8Quantized:
    """A tensor in FP8: grid values, the factors that dequantize them, and statistics.

    Args:
        data: the FP8 values (on the format's grid) as float32, shape of the input.
        scale_inv: dequantization factor: 0-d for per-tensor scaling; for block scaling one
            per block, shaped like the input with ``dim`` moved last and divided into blocks.
        dim: the dimension the blocks run along (block scaling only).
        block_size: elements per block, ``None`` for per-tensor scaling.
        fmt: the element format.
        stats: :class:`FP8TensorStats` of this quantization.
        exact: the dequantized values in float32 when that is exact (block scaling), else ``None``.
    """

    data: Tensor
    scale_inv: Tensor
    dim: int
    block_size: int | None
    fmt: FP8Format
    stats: FP8TensorStats
    exact: Tensor | None = None

    def dequantize(self, dtype: torch.dtype = _F32) -> Tensor:
        """``data · scale_inv`` broadcast to the input's shape.

        Exact in float64 always, and in float32 for block scaling (power-of-two factors);
        per-tensor float32 results carry one FP32 rounding of the product.
        """
        if self.block_size is None:
            return self.data.to(dtype) * self.scale_inv.to(dtype)
        if self.exact is not None:
            return self.exact.to(dtype)
        x = self.data.movedim(self.dim, -1)
        k = x.shape[-1]
        factors = self.scale_inv.to(dtype).repeat_interleave(self.block_size, dim=-1)[..., :k]
        return (x.to(dtype) * factors).movedim(-1, self.dim)


def current_scale(
    amax: Tensor,
    fmt: FP8Format = E4M3,
    *,
    margin: int = 0,
    amax_epsilon: float = 0.0,
    power_2_scale: bool = False,
) -> Tensor:
    """TransformerEngine's per-tensor scale from an amax (``compute_scale_from_amax``), FP32.

    Args:
        amax: 0-d tensor.
        fmt: the element format.
        margin: the scale is divided by ``2^margin`` (delayed scaling's margin).
        amax_epsilon: floor of the amax.
        power_2_scale: truncate the scale to a power of two (mantissa bits cleared).

    Returns:
        ``fmt.max · 2^(−margin) / amax`` in FP32; 1 when the amax is 0, inf or NaN; the FP32
        max when the quotient overflows.

    Example:
        >>> current_scale(torch.tensor(3.5))
        tensor(128.)
    """
    a = torch.clamp(amax.to(_F32), min=amax_epsilon) if amax_epsilon > 0 else amax.to(_F32)
    scaled_max = torch.tensor(fmt.max * 2.0**-margin, dtype=_F32, device=a.device)
    bad = ~torch.isfinite(a) | (a == 0)
    scale = scaled_max / torch.where(bad, torch.ones_like(a), a)
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, _FP32_MAX), scale)
    if power_2_scale:
        scale = (scale.view(torch.int32) & -8388608).view(_F32)  # 0xFF800000: sign and exponent kept
    return torch.where(bad, torch.ones_like(scale), scale)


def quantize_with_scale(x: Tensor, scale: Tensor, fmt: FP8Format = E4M3) -> FP8Quantized:
    """Per-tensor quantization with a given FP32 ``scale``: ``q = round(x·scale)``, ``1/scale`` back.

    Args:
        x: any floating tensor; computed in FP32 (a float64 input is rounded to FP32 first).
        scale: 0-d scale (TransformerEngine's ``scale``: FP8 value = x · scale).
        fmt: the element format.

    Returns:
        :class:`FP8Quantized` with a 0-d ``scale_inv = 1/scale`` (FP32).
    """
    check_tensor("x", x, 0, "quantize_with_scale")
    x32 = x.detach().to(_F32)
    return _per_tensor(x32, scale, fmt, _amax(x32))


def _per_tensor(x32: Tensor, scale: Tensor, fmt: FP8Format, amax: Tensor) -> FP8Quantized:
    s = scale.detach().to(device=x32.device, dtype=_F32)
    y = x32 * s
    q = fp8_round(y, fmt)
    scale_inv = torch.reciprocal(s)
    stats = _stats(x32, y, q, q * scale_inv, scale_inv, fmt, amax)
    return FP8Quantized(q, scale_inv, -1, None, fmt, stats)


def quantize_current(
    x: Tensor, fmt: FP8Format = E4M3, *, amax_epsilon: float = 0.0, power_2_scale: bool = False
) -> FP8Quantized:
    """Per-tensor *current* scaling (``Float8CurrentScaling``): the scale from this tensor's amax.

    Example:
        >>> q = quantize_current(torch.tensor([0.5, -3.5, 1e-6]))
        >>> q.dequantize().tolist(), float(q.stats.underflow_fraction)
        ([0.5, -3.5, 0.0], 0.3333333333333333)
    """
    check_tensor("x", x, 0, "quantize_current")
    x32 = x.detach().to(_F32)
    amax = _amax(x32)
    scale = current_scale(amax, fmt, amax_epsilon=amax_epsilon, power_2_scale=power_2_scale)
    return _per_tensor(x32, scale, fmt, amax)


def mx_scale_exponent(block_amax: Tensor, fmt: FP8Format = E4M3, rounding: MXRounding = "rceil") -> Tensor:
    """The E8M0 exponent ``e`` of each block's shared scale ``X = 2^e`` (float32; NaN for NaN scales).

    Args:
        block_amax: max |x| of each block (float32), NaN or inf for blocks holding non-finite values.
        fmt: the element format.
        rounding: ``"rceil"`` (default; TransformerEngine / cuBLAS: ``⌈log₂(amax · (1/max))⌉``,
            the product in FP32) or ``"floor"`` (OCP MX spec §6.3: ``⌊log₂ amax⌋ − emax``).

    Returns:
        Exponents clamped to E8M0's ``[−127, 127]``; −127 for all-zero blocks.

    Example:
        >>> mx_scale_exponent(torch.tensor([448.0, 449.0, 1.0, 0.0]))
        tensor([   0.,    1.,   -8., -127.])
        >>> mx_scale_exponent(torch.tensor([448.0, 449.0, 1.0]), rounding="floor")
        tensor([ 0.,  0., -8.])
    """
    a = block_amax.to(_F32)
    if rounding == "floor":
        mant, exp = torch.frexp(a)  # a = mant · 2^exp, mant ∈ [0.5, 1)
        e = (exp - 1 - fmt.emax).to(_F32)
    elif rounding == "rceil":
        descale = a * torch.tensor(1.0 / fmt.max, dtype=_F32, device=a.device)
        mant, exp = torch.frexp(descale)
        e = torch.where(mant == 0.5, exp - 1, exp).to(_F32)  # exact powers of two stay
    else:
        raise ValueError(f"mx_scale_exponent: rounding must be 'floor' or 'rceil', got {rounding!r}")
    e = torch.where(a == 0, float(_E8M0_MIN), e).clamp(_E8M0_MIN, _E8M0_MAX)
    return torch.where(torch.isfinite(a), e, math.nan)


def quantize_mx(
    x: Tensor, fmt: FP8Format = E4M3, *, block_size: int = 32, dim: int = -1, rounding: MXRounding = "rceil"
) -> FP8Quantized:
    """MX block scaling: blocks of ``block_size`` consecutive elements along ``dim``, one E8M0 scale each.

    A last, shorter block (``dim`` not a multiple of ``block_size``) is scaled on its own
    elements (zero padding does not change a block's amax); TransformerEngine and torchao
    require a multiple of 32 instead.

    Args:
        x: any floating tensor with at least one dim; computed in FP32.
        fmt: the element format (MXFP8: :data:`E4M3`).
        block_size: elements per block (32 in MXFP8).
        dim: the dimension blocks run along: a GEMM's reduction (K) dimension.
        rounding: the scale rule, see :func:`mx_scale_exponent`.

    Returns:
        :class:`FP8Quantized` whose ``scale_inv`` holds ``X = 2^e`` per block, shaped
        ``x.movedim(dim, -1).shape[:-1] + (n_blocks,)``.

    Example:
        >>> x = torch.cat([torch.full((32,), 1e-3), torch.full((32,), 1e3)])
        >>> quantize_mx(x).dequantize()[[0, 32]].tolist()
        [0.0009765625, 1024.0]
        >>> q = quantize_mx(x, rounding="floor")  # the spec's scale: 1000/2 = 500 saturates at 448
        >>> q.scale_inv.tolist(), q.dequantize()[[0, 32]].tolist(), int(q.stats.saturated)
        ([3.814697265625e-06, 2.0], [0.0009765625, 896.0], 32)
    """
    check_tensor("x", x, 1, "quantize_mx")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"quantize_mx: block_size must be a positive int, got {block_size!r}")
    dim = dim % x.dim()
    x32 = x.detach().to(_F32).movedim(dim, -1)
    k = x32.shape[-1]
    n_blocks = -(-k // block_size)
    padded = F.pad(x32, (0, n_blocks * block_size - k)) if k % block_size else x32
    blocks = padded.reshape(*x32.shape[:-1], n_blocks, block_size)
    amax = blocks.abs().amax(-1)  # NaN and inf propagate: such a block gets the NaN scale
    e = mx_scale_exponent(amax, fmt, rounding)
    e_int = torch.nan_to_num(e, nan=0.0).to(torch.int32).unsqueeze(-1)
    y = torch.ldexp(blocks, -e_int)  # exact: a power-of-two factor
    y = torch.where(torch.isnan(e).unsqueeze(-1), math.nan, y)
    q = fp8_round(y, fmt)
    deq = torch.ldexp(q, e_int)  # exact in FP32 (≥ 2⁻¹⁴³ > FP32's smallest subnormal)
    scale_inv = torch.where(torch.isnan(e), math.nan, torch.ldexp(torch.ones_like(e), e_int.squeeze(-1)))

    def unblock(t: Tensor) -> Tensor:
        return t.reshape(*x32.shape[:-1], n_blocks * block_size)[..., :k]

    y, q, deq = unblock(y), unblock(q), unblock(deq)
    stats = _stats(x32, y, q, deq, scale_inv, fmt, _amax(x32))
    return FP8Quantized(q.movedim(-1, dim), scale_inv, dim, block_size, fmt, stats, deq.movedim(-1, dim))

"""An FP8 reference that never calls torch's FP8 casts (float64 / Python floats).

It enumerates every finite value of the format from its bit layout, rounds to the nearest grid
value with ties to the even code (the even position on the sorted grid: the mantissa's last
bit is 0), saturates past the max, keeps NaN and the sign of zero. Scales follow the recipes'
FP32 arithmetic, written in float64 and rounded once to FP32 (for +, ×, ÷ of FP32 values that
single rounding equals FP32's own).
"""

from __future__ import annotations

import math

import torch

from lightning_stability.diagnostics.fp8 import E4M3, FP8Format

F64 = torch.float64


def grid(exp_bits: int, man_bits: int, bias: int, ieee: bool) -> list[float]:
    """Every non-negative finite value of the format, ascending, from its bit fields.

    ``ieee`` (E5M2): the all-ones exponent is inf/NaN. Otherwise (E4M3 "fn"): only the
    all-ones exponent with all-ones mantissa is NaN.
    """
    values = []
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            if e == 2**exp_bits - 1 and (ieee or m == 2**man_bits - 1):
                continue
            if e == 0:
                values.append(m / 2**man_bits * 2.0 ** (1 - bias))
            else:
                values.append((1 + m / 2**man_bits) * 2.0 ** (e - bias))
    assert values == sorted(values)
    return values


GRIDS = {"e4m3": grid(4, 3, 7, ieee=False), "e5m2": grid(5, 2, 15, ieee=True)}


def ref_round(v: float, fmt: FP8Format) -> float:
    """Nearest grid value, ties to the even code, saturating; NaN → NaN; sign kept (also of zero)."""
    if math.isnan(v):
        return math.nan
    g = GRIDS[fmt.name]
    a = abs(v)
    if a >= g[-1]:
        r = g[-1]
    else:
        hi = next(i for i, x in enumerate(g) if x > a)
        lo = hi - 1
        d_lo, d_hi = a - g[lo], g[hi] - a
        r = g[lo] if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0) else g[hi]
    return math.copysign(r, v)


def f32(v: float) -> float:
    return float(torch.tensor(v, dtype=F64).float())


def ref_current(xs: list[float], fmt: FP8Format = E4M3) -> dict[str, float]:
    """Per-tensor current scaling, every statistic, in float64 (inputs are FP32 values)."""
    finite = [x for x in xs if math.isfinite(x)]
    amax = max((abs(x) for x in xs if not math.isnan(x)), default=0.0)
    scale = 1.0 if amax == 0 or math.isinf(amax) else f32(fmt.max / amax)
    if math.isinf(scale):
        scale = float(torch.finfo(torch.float32).max)
    return ref_with_scale(xs, scale, fmt) | {"amax": amax, "n_finite": len(finite)}


def ref_with_scale(xs: list[float], scale: float, fmt: FP8Format) -> dict[str, float]:
    inv = f32(1.0 / scale)
    out: dict[str, float] = {"underflow": 0, "saturated": 0, "nonzero": 0, "err_sq": 0.0, "ref_sq": 0.0}
    deq = []
    for x in xs:
        y = f32(x * scale) if math.isfinite(x) else x * scale
        q = ref_round(y, fmt)
        d = q * inv
        deq.append(d)
        out["saturated"] += abs(y) > fmt.max
        if math.isfinite(x):
            out["nonzero"] += x != 0
            out["underflow"] += x != 0 and q == 0
            out["err_sq"] += (d - x) ** 2
            out["ref_sq"] += x * x
    return out | {"scale_inv": inv, "deq": deq}  # type: ignore[dict-item]


def ref_mx_exponent(amax: float, fmt: FP8Format, rounding: str) -> float:
    """Block scale exponent by search: largest e with 2^e ≤ amax (floor), smallest with 2^e ≥ d (rceil)."""
    if not math.isfinite(amax):
        return math.nan
    if amax == 0:
        return -127.0
    if rounding == "floor":
        e = 200
        while 2.0**e > amax:
            e -= 1
        e -= fmt.emax
    else:
        d = f32(amax * f32(1.0 / fmt.max))
        e = -200
        while 2.0**e < d:
            e += 1
    return float(min(max(e, -127), 127))


def ref_mx(xs: list[float], fmt: FP8Format, rounding: str, block: int = 32) -> dict[str, object]:
    deq: list[float] = []
    sat = under = nonzero = 0
    exps = []
    for start in range(0, len(xs), block):
        blk = xs[start : start + block]
        amax = math.nan if any(math.isnan(x) for x in blk) else max(abs(x) for x in blk)
        e = ref_mx_exponent(amax, fmt, rounding)
        exps.append(e)
        for x in blk:
            nonzero += math.isfinite(x) and x != 0
            if math.isnan(e):  # the NaN scale: the whole block is NaN
                deq.append(math.nan)
                continue
            y = x / 2.0**e
            q = ref_round(y, fmt)
            sat += abs(y) > fmt.max
            under += x != 0 and q == 0
            deq.append(q * 2.0**e)
    return {"deq": deq, "exps": exps, "saturated": sat, "underflow": under, "nonzero": nonzero}


def same(a: torch.Tensor, b: list[float]) -> bool:
    """Equal values, NaN where NaN, and the same sign of zero."""
    t = torch.tensor(b, dtype=F64)
    a = a.to(F64)
    nan = torch.isnan(t)
    return bool(
        torch.equal(torch.isnan(a), nan)
        and torch.equal(a[~nan], t[~nan])
        and torch.equal(torch.signbit(a[~nan]), torch.signbit(t[~nan]))
    )

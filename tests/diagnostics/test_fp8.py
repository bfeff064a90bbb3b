"""FP8 quantization against an independent float64 rounding to the enumerated E4M3/E5M2 grids.

The reference (``fp8_reference.py``) never calls torch's FP8 casts: it enumerates every finite value of the
format from its bit layout, rounds to the nearest grid value with ties to the even code
(the even position on the sorted grid: the mantissa's last bit is 0), saturates past the max,
keeps NaN and the sign of zero. Scales follow the recipes' FP32 arithmetic, written in
float64 and rounded once to FP32 (for +, ×, ÷ of FP32 values that single rounding equals
FP32's own).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.diagnostics.fp8_reference import (
    F64,
    GRIDS,
    f32,
    ref_current,
    ref_mx,
    ref_round,
    same,
)

from lightning_stability.diagnostics.fp8 import (
    E4M3,
    E5M2,
    FP8Format,
    current_scale,
    fp8_round,
    mx_scale_exponent,
    quantize_current,
    quantize_mx,
    quantize_with_scale,
)
from lightning_stability.diagnostics.fp8_recipe import (
    AmaxHistory,
    FP8Recipe,
    fp8_linear,
    fp8_matmul,
    quantize,
)


# ----------------------------------------------------------------------------- rounding
def adversarial(fmt: FP8Format) -> list[float]:
    """Every grid value, every midpoint (tie) and its FP32 neighbours, both signs; range edges."""
    g = GRIDS[fmt.name]
    vals: list[float] = []
    for lo, hi in itertools.pairwise(g):
        mid = (lo + hi) / 2
        vals += [lo, mid, f32(mid), float(torch.nextafter(torch.tensor(mid).float(), torch.tensor(0.0)))]
        vals.append(float(torch.nextafter(torch.tensor(mid).float(), torch.tensor(math.inf))))
    vals += [g[-1], g[-1] * 1.01, g[-1] + (g[-1] - g[-2]) / 2, 1e30, 3.4e38, math.inf, 0.0]
    vals += [fmt.min_subnormal / 2, fmt.min_subnormal / 2 * 1.0001, fmt.min_subnormal * 0.49, 1e-40]
    vals = [f32(v) if math.isfinite(v) else v for v in vals]
    return vals + [-v for v in vals] + [math.nan]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_round_adversarial(fmt: FP8Format) -> None:
    vals = adversarial(fmt)
    got = fp8_round(torch.tensor(vals, dtype=torch.float32), fmt)
    assert got.dtype == torch.float32
    assert same(got, [ref_round(v, fmt) for v in vals])


def test_grid_facts() -> None:
    g = GRIDS["e4m3"]
    assert len(g) == 127 and g[-1] == E4M3.max == 448 and g[1] == E4M3.min_subnormal == 2**-9
    assert g[8] == E4M3.min_normal == 2**-6
    g5 = GRIDS["e5m2"]
    assert len(g5) == 124 and g5[-1] == E5M2.max == 57344 and g5[1] == E5M2.min_subnormal == 2**-16
    # saturation, NaN, negative zero, and ties stated explicitly
    got = fp8_round(
        torch.tensor([449.0, -math.inf, math.nan, -0.0, -(2**-11), 1.0625, 1.1875, 2**-10, 3 * 2**-10])
    )
    assert same(got, [448.0, -448.0, math.nan, -0.0, -0.0, 1.0, 1.25, 0.0, 2**-8])
    assert same(fp8_round(torch.tensor([60000.0, math.inf]), E5M2), [57344.0, 57344.0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=40))
def test_round_hypothesis(vals: list[float]) -> None:
    for fmt in (E4M3, E5M2):
        assert same(
            fp8_round(torch.tensor(vals, dtype=torch.float32), fmt), [ref_round(v, fmt) for v in vals]
        )


# ----------------------------------------------------------------------------- per-tensor scaling
def check_current(xs: list[float], fmt: FP8Format = E4M3) -> None:
    xs = [f32(x) if math.isfinite(x) else x for x in xs]  # the quantizer reads FP32
    q = quantize_current(torch.tensor(xs, dtype=torch.float32), fmt)
    ref = ref_current(xs, fmt)
    assert same(q.dequantize(F64), ref["deq"])  # type: ignore[arg-type]
    s = q.stats
    assert int(s.numel) == len(xs) and int(s.nonfinite) == len(xs) - ref["n_finite"]
    for key in ("underflow", "saturated", "nonzero"):
        assert int(getattr(s, key)) == ref[key], key
    assert float(s.amax) == ref["amax"]
    assert float(s.scale_inv_min) == float(s.scale_inv_max) == ref["scale_inv"]
    # the squared errors: FP32 differences, q·scale_inv rounded once (δ ≤ 2⁻²⁴|x| per element), summed
    # in float64: |Σ(e+δ)² − Σe²| ≤ 2‖δ‖‖e‖ + ‖δ‖² ≤ 2⁻²³‖e‖‖x‖ + 2⁻⁴⁸‖x‖²
    bound = 2.0**-23 * math.sqrt(ref["err_sq"] * ref["ref_sq"]) + 2.0**-48 * ref["ref_sq"]
    assert abs(float(s.err_sq) - ref["err_sq"]) <= bound * 1.01 + 1e-300
    assert float(s.ref_sq) == pytest.approx(ref["ref_sq"], rel=1e-12, abs=1e-300)
    if ref["nonzero"]:
        assert float(s.underflow_fraction) == pytest.approx(ref["underflow"] / ref["nonzero"])
    assert float(s.saturation_fraction) == pytest.approx(ref["saturated"] / len(xs))


def test_current_random_and_wide_range() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1.0, 1e4):
        check_current((torch.randn(500, generator=g) * scale).tolist())
    # a 10^6 dynamic range: the small values fall into E4M3's subnormals and below
    x = torch.randn(300, generator=g) * torch.logspace(-6, 0, 300)
    check_current(x.tolist())
    check_current(x.tolist(), E5M2)


def test_current_zeros_and_specials() -> None:
    check_current([0.0, -0.0, 0.0])  # amax 0 → scale 1, nothing underflows
    check_current([1.0, -0.0, 2**-30, math.nan])  # NaN ignored by the amax, stays NaN
    check_current([1.0, math.inf, -3.0, 1e-3])  # inf amax → scale 1 (TE), inf saturates to 448
    q = quantize_current(torch.tensor([1.0, math.inf]))
    assert (
        float(q.stats.saturated) == 1 and float(q.stats.nonfinite) == 1 and float(q.stats.scale_inv_max) == 1
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**100), max_value=2.0**100),
        min_size=1,
        max_size=64,
    )
)
def test_current_hypothesis(vals: list[float]) -> None:
    check_current(vals)


def test_current_scale_rules() -> None:
    t = torch.tensor
    assert (
        float(current_scale(t(0.0)))
        == float(current_scale(t(math.inf)))
        == float(current_scale(t(math.nan)))
        == 1
    )
    assert float(current_scale(t(1e-44))) == torch.finfo(torch.float32).max  # 448/1e-44 overflows FP32
    assert float(current_scale(t(3.0))) == f32(448 / 3)
    assert float(current_scale(t(3.0), power_2_scale=True)) == 128.0  # 149.33 → 2^7
    assert float(current_scale(t(1e-9), amax_epsilon=1e-3)) == f32(448 / f32(1e-3))
    assert float(current_scale(t(3.0), margin=2)) == f32(112 / 3)
    q = quantize_with_scale(torch.tensor([1.0, 2.0]), torch.tensor(300.0))  # 600 saturates
    assert int(q.stats.saturated) == 1 and q.dequantize(F64).tolist()[1] == 448 * f32(1 / 300)


# ----------------------------------------------------------------------------- MX block scaling
@pytest.mark.parametrize("rounding", ["floor", "rceil"])
def test_mx_against_reference(rounding: str) -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 96, generator=g) * torch.logspace(-8, 6, 6).unsqueeze(1)
    rows[0, :32] *= 0.0  # an all-zero block
    rows[1, 40] = 500.0 * rows[1, 32:64].abs().max()  # one block dominated by one element
    rows[2, 5] = -0.0
    rows[3, 70] = math.nan  # a NaN block
    rows[4, 10] = math.inf  # an inf block
    rows[5, :32] = torch.tensor([2.0**-140, 2.0**-135] * 16)  # FP32 subnormal amax: exponent clamps at -127
    q = quantize_mx(rows, rounding=rounding)  # type: ignore[arg-type]
    assert q.scale_inv.shape == (6, 3)
    for r in range(6):
        ref = ref_mx(rows[r].tolist(), E4M3, rounding)
        assert same(q.dequantize(F64)[r], ref["deq"]), r  # type: ignore[arg-type]
        expected = [math.nan if math.isnan(e) else 2.0**e for e in ref["exps"]]  # type: ignore[attr-defined]
        assert same(q.scale_inv[r], expected)
    total = [ref_mx(rows[r].tolist(), E4M3, rounding) for r in range(6)]
    for key in ("saturated", "underflow", "nonzero"):
        assert int(getattr(q.stats, key)) == sum(t[key] for t in total), key  # type: ignore[misc]
    assert int(q.stats.nonfinite) == 2
    finite_rows = [0, 1, 2, 5]  # block scaling's errors are exact FP32 differences (Sterbenz)
    ref_err = sum(
        ((torch.tensor(total[r]["deq"], dtype=F64) - rows[r].to(F64)) ** 2).sum() for r in finite_rows
    )
    clean = quantize_mx(rows[finite_rows], rounding=rounding)  # type: ignore[arg-type]
    assert float(clean.stats.err_sq) == pytest.approx(float(ref_err), rel=1e-13)
    assert float(q.stats.scale_inv_min) == 2.0**-127  # the zero block and the clamped one
    if rounding == "floor":
        assert int(q.stats.saturated) > 0  # the spec's scale lets block maxima past 448
    else:
        assert int(q.stats.saturated) == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**116), max_value=2.0**116),
        min_size=1,
        max_size=70,
    ),
    st.sampled_from(["floor", "rceil"]),
)
def test_mx_hypothesis(vals: list[float], rounding: str) -> None:
    q = quantize_mx(torch.tensor(vals, dtype=torch.float32), rounding=rounding)  # type: ignore[arg-type]
    ref = ref_mx(vals, E4M3, rounding)
    assert same(q.dequantize(F64), ref["deq"])  # type: ignore[arg-type]
    assert int(q.stats.saturated) == ref["saturated"] and int(q.stats.underflow) == ref["underflow"]


def test_mx_blocks_run_along_dim_and_partial_block() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, generator=g) * torch.logspace(-3, 3, 40).unsqueeze(1)
    q = quantize_mx(x, dim=0)
    assert q.scale_inv.shape == (3, 2) and q.data.shape == (40, 3)
    for c in range(3):
        ref = ref_mx(x[:, c].tolist(), E4M3, "rceil")  # a 32-block and an 8-element block
        assert same(q.dequantize(F64)[:, c], ref["deq"])  # type: ignore[arg-type]
    from_scales = dataclasses.replace(q, exact=None)  # data · scale_inv, broadcast per block
    assert torch.equal(from_scales.dequantize(F64), q.dequantize(F64))
    assert torch.equal(from_scales.dequantize(), q.dequantize())  # power-of-two scales: exact in FP32


def test_mx_exponent_rules() -> None:
    values = [448.0, 511.0, 512.0, 0.0, math.inf, math.nan, 2.0**127]
    e = mx_scale_exponent(torch.tensor(values), rounding="floor")
    assert e[:4].tolist() == [0.0, 0.0, 1.0, -127.0] and e[4:6].isnan().all() and e[6] == 119
    r = mx_scale_exponent(torch.tensor([448.0, 448.1, 896.0, 2.0**-140]))  # the default: TE's rceil
    assert r.tolist() == [0.0, 1.0, 1.0, -127.0]
    assert torch.equal(r, mx_scale_exponent(torch.tensor([448.0, 448.1, 896.0, 2.0**-140]), rounding="rceil"))
    with pytest.raises(ValueError, match="rounding"):
        mx_scale_exponent(torch.tensor([1.0]), rounding="round")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- delayed scaling
def ref_delayed(amaxes: list[float], length: int, algo: str, margin: int) -> list[float]:
    """Scales used at each step under TE's DelayedScaling, from a plain list window."""
    window: list[float] = []
    scale, used = 1.0, []
    for a in amaxes:
        used.append(scale)
        window = ([*window, a])[-length:]
        amax = max(window) if algo == "max" else a
        if math.isfinite(amax) and amax > 0:
            scale = f32(f32(448 * 2.0**-margin) / amax)
    return used


@pytest.mark.parametrize(("length", "algo", "margin"), [(1, "max", 0), (3, "max", 1), (4, "most_recent", 0)])
def test_delayed_history_matches_window(length: int, algo: str, margin: int) -> None:
    g = torch.Generator().manual_seed(3)
    amaxes = (torch.rand(12, generator=g) * 10).tolist()
    amaxes[5] = 0.0  # an all-zero step keeps the scale (most_recent)
    h = AmaxHistory(length, algo, margin)  # type: ignore[arg-type]
    used = []
    for a in amaxes:
        used.append(float(h.scale("x")))
        h.record("x", torch.tensor(a))
        h.update()
    assert used == pytest.approx(ref_delayed(amaxes, length, algo, margin), rel=0, abs=0)


def test_delayed_quantize_uses_last_steps_scale_and_records() -> None:
    recipe = FP8Recipe("delayed", amax_history_len=4)
    h = recipe.new_history()
    x1, x2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 8.0])
    q1 = quantize(x1, recipe, history=h, key="k")
    assert float(q1.stats.scale_inv_max) == 1.0  # TE's initial scale
    quantize(
        torch.tensor([3.0, math.nan]), recipe, history=h, key="k"
    )  # same step: amax max-accumulates, NaN ignored
    h.update()
    q2 = quantize(x2, recipe, history=h, key="k")
    assert float(q2.stats.scale_inv_max) == f32(1 / f32(448 / 3))
    assert int(q2.stats.saturated) == 1  # 8 > amax history 3: the outlier delayed scaling cannot see coming
    with pytest.raises(ValueError, match="AmaxHistory"):
        quantize(x1, recipe)


def test_history_state_dict_round_trip() -> None:
    h = AmaxHistory(3, "max", 1)
    for a in (2.0, 5.0):
        h.record("a", torch.tensor(a))
        h.update()
    h.record("b", torch.tensor(math.inf))  # inf: the scale stays
    state = h.state_dict()
    h2 = AmaxHistory()
    h2.load_state_dict(state)
    assert h2.amax_history_len == 3 and h2.margin == 1
    h.update()
    h2.update()
    for key in ("a", "b"):
        assert torch.equal(h.scale(key), h2.scale(key)) and torch.equal(h.histories[key], h2.histories[key])
    assert float(h.scale("b")) == 1.0
    state["histories"]["a"][0] = 99.0  # a copy, not the live tensor
    assert float(h.histories["a"].amax()) == 5.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "fp4"}, "name"),
        ({"amax_history_len": 0}, "amax_history_len"),
        ({"amax_compute_algo": "mean"}, "amax_compute_algo"),
        ({"block_size": 0}, "block_size"),
        ({"mx_rounding": "up"}, "mx_rounding"),
    ],
)
def test_recipe_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FP8Recipe(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- GEMMs
def test_per_tensor_matmul_equals_scaled_mm() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, 64, generator=g) * 3, torch.randn(64, 24, generator=g) * 0.02
    out, qa, qb = fp8_matmul(a, b, FP8Recipe("current"))
    ref = torch._scaled_mm(
        qa.data.to(torch.float8_e4m3fn),
        qb.data.to(torch.float8_e4m3fn).t().contiguous().t(),  # column-major second operand
        scale_a=qa.scale_inv,
        scale_b=qb.scale_inv,
        out_dtype=torch.float32,
    )
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    exact = qa.dequantize(F64) @ qb.dequantize(F64)
    assert torch.allclose(out.to(F64), exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("name", ["current", "mxfp8"])
def test_linear_against_float64(name: str) -> None:
    g = torch.Generator().manual_seed(5)
    x, w, b = (
        torch.randn(2, 5, 96, generator=g),
        torch.randn(40, 96, generator=g) * 0.1,
        torch.randn(40, generator=g),
    )
    out, qx, qw = fp8_linear(x, w, b, FP8Recipe(name))  # type: ignore[arg-type]
    assert out.shape == (2, 5, 40) and out.dtype == torch.float32
    if name == "mxfp8":
        assert qx.scale_inv.shape == (10, 3) and qw.scale_inv.shape == (40, 3)  # blocks along K for both
    exact = (qx.dequantize(F64) @ qw.dequantize(F64) + b.to(F64)).reshape(2, 5, 40)
    assert torch.allclose(out.to(F64), exact, rtol=1e-5, atol=1e-5)
    true = x.to(F64) @ w.to(F64).t() + b.to(F64)
    err = float((out.to(F64) - true).norm() / true.norm())
    assert 1e-3 < err < 0.08  # E4M3's 3 mantissa bits: a few percent, not zero

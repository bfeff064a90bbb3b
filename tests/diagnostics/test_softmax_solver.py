"""kappa_softmax: the exact maximum through every pruning stage, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from tests.diagnostics.conftest import F64, entropy_ref, gen, ksm_ref

import lightning_stability.diagnostics.softmax_solver as solver
from lightning_stability.diagnostics import (
    attention_diagnostics,
    extreme_singular_values,
    kappa_softmax,
    kappa_v,
)


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of the private helper ``name`` (so a test proves its path ran)."""
    calls: list[int] = []
    inner = getattr(solver, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(solver, name, wrapped)
    return calls


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_kappa_softmax_exact_vs_brute_force(scale: float) -> None:
    s = torch.randn(3, 4, 12, 12, generator=gen(int(scale)), dtype=F64) * scale
    ref = ksm_ref(s)
    assert (kappa_softmax(s) - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", ["causal", "padding", "random"])
def test_kappa_softmax_masks(kind: str) -> None:
    g = gen(3)
    s = torch.randn(2, 3, 10, 10, generator=g) * 5
    if kind == "causal":
        mask = torch.ones(10, 10, dtype=torch.bool).tril()
    elif kind == "padding":
        mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        mask[0, ..., 6:] = False
    else:
        mask = torch.rand(2, 3, 10, 10, generator=g) > 0.6
        mask[0, 0] = False  # a fully masked head
    s_masked_garbage = s.masked_fill(~mask, float("nan"))  # masked entries must not matter
    ref = ksm_ref(s, mask)
    got = kappa_softmax(s_masked_garbage, mask)
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    if kind == "random":
        assert got[0, 0].item() == 0.0


def test_kappa_softmax_pruning_many_rows_and_ties() -> None:
    g = gen(4)
    s = (torch.randn(6, 48, 40, generator=g) * 10).to(F64)
    s[0, :, :2] = 7.0  # every row of matrix 0 has a top-2 tie
    s[1] = s[1, :1]  # identical rows
    s[2, 5, :] = s[2, 5, :] + torch.linspace(0, 1e-9, 40, dtype=F64)  # near tie
    ref = ksm_ref(s)
    assert (kappa_softmax(s) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert (kappa_softmax(s, chunk_size=1) - kappa_softmax(s)).abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kappa_softmax_low_precision_inputs(dtype: torch.dtype) -> None:
    s = (torch.randn(2, 2, 16, 16, generator=gen(5)) * 4).to(dtype)
    got = kappa_softmax(s)
    assert got.dtype == F64 and got.shape == (2, 2)
    ref = ksm_ref(s.to(F64))  # exact on the given (rounded) scores
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_kappa_softmax_degenerate() -> None:
    s = torch.randn(4, 5, 6, generator=gen(6))
    s[1, 2, 3] = float("nan")
    s[2, 0, 0] = float("inf")
    s[3, 4, 5] = -float("inf")
    got = kappa_softmax(s)
    assert got[0].isfinite() and (got[1:] == math.inf).all()
    assert kappa_softmax(torch.zeros(2, 1, 1)).tolist() == [0.0, 0.0]  # n = 1
    assert kappa_softmax(torch.randn(3, 1, generator=gen(7))).item() == 0.0  # n_k = 1 → one-hot
    assert kappa_softmax(s, torch.zeros(6, dtype=torch.bool)).abs().sum().item() == 0.0  # fully masked
    assert kappa_softmax(torch.randn(3, 4)).shape == ()


def test_kappa_softmax_errors() -> None:
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"mask.*dtype torch.float32"):
        kappa_softmax(s, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(5,\) is not broadcastable to \(2, 3, 4\)"):
        kappa_softmax(s, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        kappa_softmax(torch.randn(4))


@pytest.mark.parametrize("mask_kind", ["none", "per_head", "broadcast"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_blocked_pass_over_many_subchunks_is_exact(
    monkeypatch: pytest.MonkeyPatch, mask_kind: str, scale: float, path: str
) -> None:
    monkeypatch.setattr(solver, "_BUF_ELEMS", 150)  # 1 head per sub-chunk: 6 sub-chunks
    g = gen(int(scale) + len(mask_kind))
    s = torch.randn(2, 3, 9, 11, generator=g) * scale
    mask = None
    if mask_kind == "per_head":
        mask = torch.rand(2, 3, 9, 11, generator=g) > 0.4
        mask[1, 2] = False  # a fully masked head
        mask[0, 1, 3] = False  # a fully masked row
    elif mask_kind == "broadcast":
        mask = torch.ones(1, 1, 9, 11, dtype=torch.bool).tril(1)
    ref = ksm_ref(s, mask)
    got = kappa_softmax(s, mask)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    q = torch.randn(2, 3, 9, 5, generator=g)
    k = torch.randn(2, 3, 11, 5, generator=g) * scale
    v = torch.randn(2, 3, 11, 4, generator=g)
    d = attention_diagnostics(q, k, v, mask)
    s_qk = q @ k.transpose(-1, -2) / 5**0.5  # float32 matmul, as the diagnostic forms it
    assert torch.allclose(d.kappa_softmax, ksm_ref(s_qk, mask), rtol=1e-6, atol=0)
    assert torch.allclose(d.entropy, entropy_ref(s_qk, mask), rtol=1e-6, atol=1e-12)


def test_near_ties_float32_cannot_separate_are_resolved_in_float64() -> None:
    # 40 rows that agree to ~1e-9 relative: the float32 bounds overlap, the float64 solve decides.
    base = torch.randn(24, generator=gen(1), dtype=F64) * 3
    rows = base.repeat(40, 1)
    rows[torch.arange(40), torch.arange(40) % 24] += torch.linspace(0, 4e-8, 40, dtype=F64)
    s = rows.reshape(1, 40, 24)
    ref = ksm_ref(s, None)
    assert (kappa_softmax(s) - ref).abs().item() <= 1e-12 * ref.item()
    s32 = s.float()
    ref32 = ksm_ref(s32.to(F64), None)  # exact on the rounded scores
    assert (kappa_softmax(s32) - ref32).abs().item() <= 1e-12 * ref32.item()


@pytest.mark.parametrize("n", [64, 300])
def test_realistic_sizes_match_eigvalsh(n: int, path: str) -> None:
    s = torch.randn(2, 2, n, n, generator=gen(n)) * 4
    s[0, 1, :, : n // 2] -= 20.0  # a peaked head
    ref = ksm_ref(s, None)
    assert (kappa_softmax(s) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_non_finite_entries_still_take_the_exact_path() -> None:
    v = torch.randn(3, 10, 4, generator=gen(2))
    v[1, 2, 3] = float("nan")
    v[2, 0, 0] = 50.0
    got = kappa_v(v)
    assert got[1].item() == float("inf") and torch.isfinite(got[[0, 2]]).all()
    sv = torch.linalg.svdvals(v[[0, 2]].to(F64))
    assert torch.allclose(got[[0, 2]], sv[:, 0] / (sv[:, -1] + 1e-6), rtol=1e-9)
    w = torch.randn(4, 3, dtype=F64)
    w_bad = w.clone()
    w_bad[0, 0] = float("inf")  # non-finite entries count as 0 (documented)
    w[0, 0] = 0.0
    hi, lo = extreme_singular_values(w_bad)
    sv = torch.linalg.svdvals(w)
    assert torch.allclose(torch.stack([hi, lo]), sv[[0, -1]], rtol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "per_head", "broadcast"])
@pytest.mark.parametrize("scale", [1.0, 8.0, 40.0])
def test_staged_pruning_and_batched_exact_solve_are_exact(
    monkeypatch: pytest.MonkeyPatch, mask_kind: str, scale: float, path: str
) -> None:
    # Force every stage on a small input: the top-2 block lower bound on the candidates (1b), the
    # bounds from the candidates' own softmax (1.5), and exact solves gathered 3 rows at a time.
    # Compiled: the lean row kernel (as for long rows), the refining stage and batched compiled solves.
    monkeypatch.setattr(solver, "_STAGED_MIN_ELEMS", 0)
    monkeypatch.setattr(solver, "_BLOCK_BOUND_MIN_ROWS", 0)
    monkeypatch.setattr(solver, "_REFINE_MIN_ROWS", 0)
    monkeypatch.setattr(solver, "_EXACT_ELEMS", 3 * 23)
    monkeypatch.setattr(solver, "_FULL_MAX_NK", 0)
    # (counted eagerly only: inside a compiled kernel the helpers are traced, not called)
    exact_fn = "_exact_solve" if path == "compiled" else "_exact_rows"
    stage_1b = [1] if path == "compiled" else _counting(monkeypatch, "_block_lower_bound")
    stage_15 = _counting(monkeypatch, "_refine_rows")
    exact = _counting(monkeypatch, exact_fn)
    g = gen(100 + int(scale) + len(mask_kind))
    s = torch.randn(2, 3, 17, 23, generator=g) * scale
    s[0, 0, :, 1] = s[0, 0, :, 0]  # exact top-2 ties
    s[1, 2, 4] = 0.0  # a zero row (‖S_i‖ = 0)
    s[1, 1, 5, 0] += 60.0  # a one-hot row
    for b, h in ((0, 1), (1, 0)):  # heads of near-identical rows: many candidates survive 1b
        s[b, h] = s[b, h, 0] + 1e-6 * torch.randn(17, 23, generator=g)
    mask = None
    if mask_kind == "per_head":
        mask = torch.rand(2, 3, 17, 23, generator=g) > 0.3
        mask[0, 2] = False  # a fully masked head
        mask[1, 0, 3] = False  # a fully masked row
    elif mask_kind == "broadcast":
        mask = torch.ones(1, 1, 17, 23, dtype=torch.bool).tril(4)
    ref = ksm_ref(s, mask)
    got = kappa_softmax(s, mask)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert stage_1b and stage_15 and len(exact) >= 2  # the stages ran; the solve in batches
    s64 = s.to(F64) * 1.0001  # float64 input: same stages, float64 working precision
    ref64 = ksm_ref(s64, mask)
    assert (kappa_softmax(s64, mask) - ref64).abs().max().item() <= 1e-12 * ref64.abs().max().item()


def test_zero_tiny_and_mixed_rows(path: str) -> None:
    zero = torch.zeros(3, 8, 8)
    assert kappa_softmax(zero).tolist() == [0.0, 0.0, 0.0]
    # Scores so small that ‖S_i‖² underflows float32: the bounds read 0 everywhere, every row
    # goes to the float64 solve, which resolves them.
    tiny = torch.randn(2, 6, 9, generator=gen(7)) * 1e-30
    ref = ksm_ref(tiny, None)
    assert (ref > 0).all()
    assert torch.allclose(kappa_softmax(tiny), ref, rtol=1e-12, atol=0)
    mixed = torch.randn(2, 6, 9, generator=gen(8)) * 3
    mixed[:, ::2] = 0.0  # half the rows zero: pruned without a solve
    mixed[1, 1] *= 1e-30
    ref = ksm_ref(mixed, None)
    assert torch.allclose(kappa_softmax(mixed), ref, rtol=1e-12, atol=0)


def test_one_chunk_equals_many_chunks_and_other_dtypes() -> None:
    s = torch.randn(3, 4, 20, 20, generator=gen(9)) * 5
    whole = kappa_softmax(s)  # float32 contiguous: one chunk, a view of the input
    assert torch.equal(whole, kappa_softmax(s, chunk_size=5))
    assert torch.equal(whole, kappa_softmax(s.transpose(0, 1).contiguous().transpose(0, 1)))  # strided
    half = s.to(torch.bfloat16)  # converted chunk by chunk
    ref = ksm_ref(half.to(F64), None)
    assert (kappa_softmax(half) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_entropy_tail_terms_on_peaked_tied_and_masked_rows(path: str) -> None:
    g = gen(10)
    s = torch.randn(2, 2, 12, 16, generator=g) * 3
    s[0, 0, 0] = torch.tensor([40.0] + [0.0] * 15)  # tail mass ~1e-17: H ~ 1e-15
    s[0, 0, 1] = torch.tensor([25.0, 25.0] + [-5.0] * 14)  # exact tie at the max, p1 < ½
    s[0, 1, 2] = torch.tensor([9.0, 9.0, 9.0] + [0.0] * 13)
    s[1, 0, 3, 4] = 30.0  # p1 > ½ with a spread tail
    s[1, 1, 5] = 0.0  # uniform row: H = log 16
    mask = torch.rand(2, 2, 12, 16, generator=g) > 0.25
    mask[..., 0] = True
    mask[1, 1, 6] = False  # a row without attended keys
    v = torch.randn(2, 2, 16, 3, generator=g)
    for m in (None, mask):
        d = attention_diagnostics(None, None, v, m, scores=s)
        ref = entropy_ref(s, m)
        assert torch.allclose(d.entropy, ref, rtol=1e-6, atol=0)
    # The peaked row alone, against 40-digit arithmetic (float64 xlogy rounds p1 to 1 and
    # drops the −p1·log p1 = 6.4e-17 nats of the total 2.6e-15): a relative 1e-6.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    row = [mpmath.mpf(float(x)) for x in s[0, 0, 0]]
    z = mpmath.fsum(mpmath.exp(x) for x in row)
    ref1 = float(-mpmath.fsum((mpmath.exp(x) / z) * mpmath.log(mpmath.exp(x) / z) for x in row))
    assert 2e-15 < ref1 < 3e-15
    got1 = attention_diagnostics(None, None, v[:1, :1], scores=s[:1, :1, :1]).entropy.item()
    assert math.isclose(got1, ref1, rel_tol=1e-6)


def test_results_never_alias_the_reused_buffers() -> None:
    g = gen(11)
    q, k, v = (torch.randn(2, 3, 33, 8, generator=g) for _ in range(3))
    first = attention_diagnostics(q, k, v)
    names = ("kappa_score", "kappa_softmax", "entropy", "logit_max")
    kept = {name: getattr(first, name).clone() for name in names}
    q2, k2, v2 = (torch.randn(4, 2, 50, 8, generator=g) * 3 for _ in range(3))
    second = attention_diagnostics(q2, k2, v2, torch.rand(4, 2, 50, 50, generator=g) > 0.2)
    kappa_softmax(torch.randn(5, 40, 40, generator=g))
    for name, val in kept.items():
        assert torch.equal(getattr(first, name), val)
    # a fresh thread has fresh buffers: the same numbers
    import threading

    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(attention_diagnostics(q, k, v)))
    t.start()
    t.join()
    for name, val in kept.items():
        assert torch.equal(getattr(box[0], name), val)
    assert torch.isfinite(second.kappa_softmax).all()


@pytest.mark.parametrize("mask_kind", ["none", "per_head", "broadcast", "key_only"])
def test_row_blocks_of_a_large_matrix_are_exact(
    monkeypatch: pytest.MonkeyPatch, mask_kind: str, path: str
) -> None:
    monkeypatch.setattr(solver, "_BUF_ELEMS", 25)  # 11 keys: blocks of 2 rows of one matrix
    g = gen(13 + len(mask_kind))
    s = torch.randn(2, 3, 9, 11, generator=g) * 6
    mask = None
    if mask_kind == "per_head":
        mask = torch.rand(2, 3, 9, 11, generator=g) > 0.4
        mask[0, 1, 3] = False
    elif mask_kind == "broadcast":
        mask = torch.ones(1, 1, 9, 11, dtype=torch.bool).tril(1)
    elif mask_kind == "key_only":
        mask = (torch.rand(2, 1, 1, 11, generator=g) > 0.3) | (torch.arange(11) == 0)
    ref = ksm_ref(s, mask)
    assert (kappa_softmax(s, mask) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    d = attention_diagnostics(None, None, torch.randn(2, 3, 11, 4, generator=g), mask, scores=s)
    assert torch.allclose(d.kappa_softmax, ref, rtol=1e-12, atol=0)
    assert torch.allclose(d.entropy, entropy_ref(s, mask), rtol=1e-6, atol=1e-12)


"""Issue 15's faster paths keep the documented tolerances: the cache-blocked float32 pruning
pass of kappa_softmax / attention_diagnostics (several sub-chunks, masks sliced per chunk or
broadcast, near-ties float32 cannot separate), the all-finite shortcut, and the batched
spectra API — each against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_stability.diagnostics.softmax_solver as attention_mod
from lightning_stability.diagnostics import (
    attention_diagnostics,
    extreme_singular_values,
    kappa_softmax,
    kappa_v,
    kappa_v_many,
    singular_value_extremes_many,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ksm_ref(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """max_i λmax(Diag(p) − ppᵀ)·‖S_i‖/‖P_i‖ by float64 eigvalsh, attended keys only."""
    s = s.to(F64)
    flat = s.reshape(-1, *s.shape[-2:])
    m = None if mask is None else mask.expand(s.shape).reshape(flat.shape)
    out = torch.zeros(flat.shape[0], dtype=F64)
    for g in range(flat.shape[0]):
        for i in range(flat.shape[1]):
            row = flat[g, i] if m is None else flat[g, i][m[g, i]]
            if row.numel():
                p = torch.softmax(row, -1)
                lam = torch.linalg.eigvalsh(torch.diag(p) - torch.outer(p, p))[-1].item()
                out[g] = max(out[g].item(), lam * row.norm().item() / p.norm().item())
    return out.reshape(s.shape[:-2])


def entropy_ref(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    s = s.to(F64)
    flat = s.reshape(-1, *s.shape[-2:])
    m = None if mask is None else mask.expand(s.shape).reshape(flat.shape)
    out = torch.zeros(flat.shape[0], dtype=F64)
    for g in range(flat.shape[0]):
        rows = [flat[g, i] if m is None else flat[g, i][m[g, i]] for i in range(s.shape[-2])]
        probs = [torch.softmax(r, -1) for r in rows if r.numel()]
        hs = [-torch.special.xlogy(p, p).sum().item() for p in probs]
        out[g] = sum(hs) / len(hs) if hs else 0.0
    return out.reshape(s.shape[:-2])


@pytest.mark.parametrize("mask_kind", ["none", "per_head", "broadcast"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_blocked_pass_over_many_subchunks_is_exact(
    monkeypatch: pytest.MonkeyPatch, mask_kind: str, scale: float
) -> None:
    monkeypatch.setattr(attention_mod, "_BUF_ELEMS", 150)  # 1 head per sub-chunk: 6 sub-chunks
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
def test_realistic_sizes_match_eigvalsh(n: int) -> None:
    s = torch.randn(1, 2, n, n, generator=gen(n)) * 4
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


def test_batched_spectra_of_mixed_shapes_equal_one_by_one() -> None:
    g = gen(3)
    mats = [
        torch.randn(96, 96, generator=g),
        torch.randn(384, 96, generator=g),
        torch.randn(96, 384, generator=g),
        torch.randn(96, 96, generator=g),
        torch.randn(7, 5, generator=g) @ torch.diag(torch.tensor([1.0, 1e-1, 1e-3, 1e-5, 1e-6])),
    ]
    got = singular_value_extremes_many(mats)
    assert len(got) == len(mats)
    for m, (hi, lo) in zip(mats, got, strict=True):
        sv = torch.linalg.svdvals(m.to(F64))
        assert hi.dtype == F64 and hi.shape == () and lo.shape == ()
        assert torch.allclose(hi, sv[0], rtol=1e-12)
        assert torch.allclose(lo, sv[-1], rtol=1e-9)
    assert singular_value_extremes_many([]) == []


def test_batched_kappa_v_of_mixed_shapes_equals_one_by_one() -> None:
    g = gen(4)
    vs = [torch.randn(16, 4, 65, 24, generator=g), torch.randn(16, 4, 50, 24, generator=g)]
    vs.append(torch.randn(2, 3, 17, 8, generator=g).to(torch.bfloat16))
    vs.append(vs[0].clone())
    vs[3][0, 0, 5] = float("nan")
    keys = [None, torch.rand(16, 4, 50, generator=g) > 0.3, None, None]
    got = kappa_v_many(vs, key_masks=keys)
    for v, km, kv in zip(vs, keys, got, strict=True):
        assert torch.equal(kv, kappa_v(v, key_mask=km))
    with pytest.raises(ValueError, match="key_masks"):
        kappa_v_many(vs, key_masks=keys[:2])


def test_inputs_that_require_grad_give_the_detached_values() -> None:
    g = gen(5)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 2, 7, 7, generator=g) > 0.3
    d = attention_diagnostics(q, k, v, mask)
    ref = attention_diagnostics(q.detach(), k.detach(), v.detach(), mask)
    for name in ("kappa_score", "kappa_softmax", "kappa_v", "entropy", "logit_max"):
        assert torch.equal(getattr(d, name), getattr(ref, name))
    s = (q @ k.transpose(-1, -2)).requires_grad_(True)
    assert torch.equal(kappa_softmax(s, mask), kappa_softmax(s.detach(), mask))


# ---------------------------------------------------------------- issue 15, kappa_softmax part 2
def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of the private helper ``name`` (so a test proves its path ran)."""
    calls: list[int] = []
    inner = getattr(attention_mod, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(attention_mod, name, wrapped)
    return calls


@pytest.mark.parametrize("mask_kind", ["none", "per_head", "broadcast"])
@pytest.mark.parametrize("scale", [1.0, 8.0, 40.0])
def test_staged_pruning_and_batched_exact_solve_are_exact(
    monkeypatch: pytest.MonkeyPatch, mask_kind: str, scale: float
) -> None:
    # Force every stage on a small input: the top-2 block lower bound on the candidates (1b), the
    # bounds from the candidates' own softmax (1.5), and exact solves gathered 3 rows at a time.
    monkeypatch.setattr(attention_mod, "_STAGED_MIN_ELEMS", 0)
    monkeypatch.setattr(attention_mod, "_BLOCK_BOUND_MIN_ROWS", 0)
    monkeypatch.setattr(attention_mod, "_REFINE_MIN_ROWS", 0)
    monkeypatch.setattr(attention_mod, "_EXACT_ELEMS", 3 * 23)
    stage_1b = _counting(monkeypatch, "_block_lower_bound")
    stage_15 = _counting(monkeypatch, "_refine_rows")
    exact = _counting(monkeypatch, "_exact_rows")
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


def test_zero_tiny_and_mixed_rows() -> None:
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


def test_entropy_tail_terms_on_peaked_tied_and_masked_rows() -> None:
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


def test_logit_max_unmasked_two_reductions_match_float64() -> None:
    g = gen(12)
    q, k = torch.randn(2, 2, 9, 5, generator=g), torch.randn(2, 2, 11, 5, generator=g)
    k[1, 0] *= -40.0  # the largest |logit| is negative
    d = attention_diagnostics(q, k, torch.randn(2, 2, 11, 3, generator=g), scale=0.7)
    ref = ((q.to(F64) @ k.to(F64).transpose(-1, -2)) * 0.7).abs().flatten(-2).amax(-1)
    assert torch.allclose(d.logit_max, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mask_kind", ["none", "per_head", "broadcast", "key_only"])
def test_row_blocks_of_a_large_matrix_are_exact(monkeypatch: pytest.MonkeyPatch, mask_kind: str) -> None:
    monkeypatch.setattr(attention_mod, "_BUF_ELEMS", 25)  # 11 keys: blocks of 2 rows of one matrix
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


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inputs_are_left_untouched(dtype: torch.dtype) -> None:
    # float64 (and float32) inputs reach the helpers as views: nothing may write into them.
    g = gen(14)
    q, k, v = (torch.randn(2, 2, 10, 4, generator=g, dtype=dtype) for _ in range(3))
    s = torch.randn(2, 2, 10, 10, generator=g, dtype=dtype) * 5
    mask = torch.rand(2, 2, 10, 10, generator=g) > 0.3
    bias = torch.randn(1, 2, 10, 10, generator=g, dtype=dtype)
    before = [t.clone() for t in (q, k, v, s, bias)]
    attention_diagnostics(q, k, v, mask, bias=bias, softcap=3.0)
    attention_diagnostics(q, k, v, None, scores=s)
    kappa_softmax(s, mask)
    for t, b in zip((q, k, v, s, bias), before, strict=True):
        assert torch.equal(t, b)


def test_kappa_score_is_inf_when_qk_overflows_float32_with_finite_q_and_k() -> None:
    """Finite q, k whose scores overflow float32: kappa_score stays inf (never a 0 that a max
    over heads would hide)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 4, generator=g) for _ in range(3))
    d = attention_diagnostics(q * 1e18, k * 1e18, v)
    assert torch.isinf(d.kappa_score).all() and torch.isinf(d.kappa_softmax).all()
    ok = attention_diagnostics(q, k, v)
    assert (ok.kappa_score >= 1).all() and torch.isfinite(ok.kappa_score).all()


def test_scratch_buffers_survive_inference_mode_and_another_default_device() -> None:
    """A buffer first made under inference mode is not reused outside it (an inference tensor
    cannot be written there), and buffers live on the scores' device, not the default one.
    Run in a fresh thread: the scratch cache is per thread, so its first buffers are made here."""
    import threading

    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 64, 512, generator=g)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g) for _ in range(3))
    expected = kappa_softmax(s), attention_diagnostics(q, k, v).kappa_softmax
    got: list[object] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                inside = kappa_softmax(s), attention_diagnostics(q, k, v).kappa_softmax
            outside = kappa_softmax(s), attention_diagnostics(q, k, v).kappa_softmax
            got.extend([inside, outside])
        except Exception as err:  # "Inplace update to inference tensor outside InferenceMode"
            got.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert len(got) == 2, got
    for pair in got:
        assert torch.equal(pair[0], expected[0]) and torch.equal(pair[1], expected[1])  # type: ignore[index]
    torch.set_default_device("meta")
    try:
        assert torch.equal(kappa_softmax(s).cpu(), expected[0])
    finally:
        torch.set_default_device(None)

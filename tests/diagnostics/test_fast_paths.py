"""Issue 15's faster paths keep the documented tolerances: the cache-blocked float32 pruning
pass of kappa_softmax / attention_diagnostics (several sub-chunks, masks sliced per chunk or
broadcast, near-ties float32 cannot separate), the all-finite shortcut, and the batched
spectra API — each against an independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import lightning_stability.diagnostics.attention as attention_mod
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

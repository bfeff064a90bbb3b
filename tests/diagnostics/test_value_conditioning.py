"""kappa_v and kappa_v_many: σmax/σmin of the attended keys' V against float64 svdvals."""

from __future__ import annotations

import math

import pytest
import torch
from tests.diagnostics.conftest import F64, gen

from lightning_stability.diagnostics import (
    kappa_v,
    kappa_v_many,
)


def test_kappa_v_matches_svdvals_and_degenerate() -> None:
    v = torch.randn(2, 3, 6, 4, generator=gen(9))
    sv = torch.linalg.svdvals(v.double())
    assert torch.allclose(kappa_v(v), sv[..., 0] / (sv[..., -1] + 1e-6), rtol=1e-12)
    rank1 = torch.ones(5, 3)
    assert 1e5 < kappa_v(rank1).item() < math.inf  # large but finite thanks to the ridge
    assert kappa_v(torch.zeros(4, 3)).item() == 1.0
    assert kappa_v(rank1, ridge=0.0).item() == math.inf
    assert kappa_v(torch.randn(1, 4)).item() == 1.0 and kappa_v(torch.randn(4, 1)).item() == 1.0
    assert kappa_v(torch.tensor([[float("inf"), 1.0]])).item() == math.inf
    with pytest.raises(ValueError, match="ridge"):
        kappa_v(v, ridge=-1.0)


@pytest.mark.parametrize(("n", "d", "kept"), [(12, 4, 7), (12, 8, 5), (5, 8, 3), (6, 6, 6), (9, 4, 1)])
def test_kappa_v_drops_masked_rows(n: int, d: int, kept: int) -> None:
    g = gen(n * 100 + d * 10 + kept)
    v = torch.randn(3, n, d, generator=g)
    v[:, -1] *= 1e3  # the padded rows hold huge values: they must not count
    keys = torch.zeros(3, n, dtype=torch.bool)
    for b in range(3):
        keys[b, torch.randperm(n - 1, generator=g)[:kept]] = True
    got = kappa_v(v, key_mask=keys)
    for b in range(3):
        sv = torch.linalg.svdvals(v[b][keys[b]].double())  # min(kept, d) values, rows dropped
        assert math.isclose(got[b].item(), max(1.0, (sv[0] / (sv[-1] + 1e-6)).item()), rel_tol=1e-9)
    assert torch.equal(kappa_v(v, key_mask=torch.ones(n, dtype=torch.bool)), kappa_v(v))


def test_kappa_v_key_mask_ill_conditioned_and_degenerate() -> None:
    g = gen(3)
    u, _ = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=F64))
    v = u @ torch.diag(torch.tensor([1.0, 1e-1, 1e-3, 1e-5], dtype=F64))  # κ = 1e5: SVD fallback
    keys = torch.ones(10, dtype=torch.bool)
    keys[[2, 7]] = False
    sv = torch.linalg.svdvals(v[keys])
    assert math.isclose(kappa_v(v, key_mask=keys).item(), (sv[0] / (sv[-1] + 1e-6)).item(), rel_tol=1e-9)
    keys3 = torch.zeros(10, dtype=torch.bool)
    keys3[:3] = True  # 3 kept rows < d = 4: σmin is the 3rd singular value, not a 0
    sv3 = torch.linalg.svdvals(v[:3])
    assert math.isclose(kappa_v(v, key_mask=keys3).item(), (sv3[0] / (sv3[-1] + 1e-6)).item(), rel_tol=1e-9)
    assert kappa_v(v, key_mask=torch.zeros(10, dtype=torch.bool)).item() == 1.0
    v_inf = v.clone()
    v_inf[2, 0] = math.inf  # non-finite only in a masked row: ignored
    assert math.isfinite(kappa_v(v_inf, key_mask=keys).item())
    assert kappa_v(v_inf).item() == math.inf
    with pytest.raises(ValueError, match="key_mask"):
        kappa_v(v, key_mask=torch.ones(3, dtype=torch.bool))


def test_kappa_v_sigma_min_below_rounding_counts_as_zero() -> None:
    """Two equal token rows (a repeated token): σmin is rounding noise, κ = σmax/ridge exactly."""
    g = gen(8)
    v = torch.randn(6, 8, generator=g)
    v[3] = v[2]
    noisy = v.clone()
    noisy[3] = torch.nextafter(v[3], torch.full_like(v[3], math.inf))  # one ulp apart
    smax = torch.linalg.svdvals(v.double())[0].item()
    for x in (v, noisy):
        sv = torch.linalg.svdvals(x.double())
        assert sv[-1].item() <= math.sqrt(6) * 2**-24 * sv[0].item()  # below V's own rounding
        assert math.isclose(kappa_v(x).item(), max(1.0, sv[0].item() / 1e-6), rel_tol=1e-12)
    assert math.isclose(kappa_v(noisy).item(), smax / 1e-6, rel_tol=1e-6)
    # float64 input keeps a σmin of 1e-9 (far above float64 rounding)
    w = torch.diag(torch.tensor([1.0, 1e-9], dtype=F64))
    assert math.isclose(kappa_v(w).item(), 1.0 / (1e-9 + 1e-6), rel_tol=1e-12)


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


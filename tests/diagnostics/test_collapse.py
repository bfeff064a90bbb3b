"""Rank collapse and token similarity against float64 references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tests.conftest import PostLNBlock
from tests.diagnostics.conftest import F64, gen
from torch import nn

from lightning_stability.diagnostics import rank_collapse, token_similarity
from lightning_stability.diagnostics.collapse import collapse_statistics


def similarity_ref(x: torch.Tensor) -> float:
    """Mean of cos(x_i, x_j) over ordered pairs i ≠ j of tokens with non-zero norm (loops)."""
    toks = [t.to(F64) for t in x if t.norm() > 0]
    pairs = [(a, b) for a, b in itertools.permutations(toks, 2)]
    if not pairs:
        return 1.0
    return sum((a @ b / (a.norm() * b.norm())).item() for a, b in pairs) / len(pairs)


def collapse_ref(x: torch.Tensor) -> float:
    """‖X − 1x̄ᵀ‖_F/‖X‖_F written out token by token."""
    x = x.to(F64)
    mean = sum(x) / x.shape[0]
    num = sum(((t - mean) ** 2).sum() for t in x) ** 0.5
    den = (x**2).sum() ** 0.5
    return 0.0 if den == 0 else float(num / den)


def block_collapse(alpha: float, depth: int = 16) -> tuple[list[float], list[float]]:
    """Mean over examples of rank_collapse / token_similarity of every block output (forward hooks)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*(PostLNBlock(64, 4, alpha) for _ in range(depth)))
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach())) for b in blocks]
    try:
        with torch.no_grad():
            blocks(torch.randn(4, 32, 64, generator=gen(6)))
    finally:
        for h in handles:
            h.remove()
    return [rank_collapse(o).mean().item() for o in outs], [token_similarity(o).mean().item() for o in outs]


@pytest.mark.parametrize("shift", [0.0, 3.0, 100.0])
def test_against_loops(shift: float) -> None:
    x = torch.randn(3, 9, 5, generator=gen(1)) + shift  # a shared offset → tokens close to collapse
    sim, rc = token_similarity(x), rank_collapse(x)
    assert sim.dtype == F64 and sim.shape == (3,) and rc.shape == (3,)
    for b in range(3):
        assert sim[b].item() == pytest.approx(similarity_ref(x[b]), abs=1e-12)
        assert rc[b].item() == pytest.approx(collapse_ref(x[b]), abs=1e-12)


def test_mask_equals_dropping_tokens() -> None:
    x = torch.randn(4, 2, 7, 6, generator=gen(2))
    mask = torch.rand(4, 1, 7, generator=gen(3)) > 0.4
    mask[:, :, 0] = True
    x_bad = x.clone()
    x_bad[~mask.expand(4, 2, 7)] = float("nan")  # padding may hold anything
    sim, rc = token_similarity(x_bad, mask), rank_collapse(x_bad, mask)
    for b, h in itertools.product(range(4), range(2)):
        kept = x[b, h][mask[b, 0]]
        assert sim[b, h].item() == pytest.approx(similarity_ref(kept), abs=1e-12)
        assert rc[b, h].item() == pytest.approx(collapse_ref(kept), abs=1e-12)


def test_degenerate_inputs() -> None:
    same = torch.tensor([[1.0, 2.0]] * 4).unsqueeze(0)
    assert token_similarity(same).item() == pytest.approx(1.0, abs=1e-15)
    assert rank_collapse(same).item() == pytest.approx(0.0, abs=1e-15)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert token_similarity(opposite).item() == -1.0 and rank_collapse(opposite).item() == 1.0
    zero = torch.zeros(1, 5, 3)
    assert token_similarity(zero).item() == 1.0 and rank_collapse(zero).item() == 0.0
    one = torch.randn(2, 1, 4, generator=gen(4))
    assert torch.equal(token_similarity(one), torch.ones(2, dtype=F64))
    assert torch.equal(rank_collapse(one), torch.zeros(2, dtype=F64))
    inf = torch.randn(2, 3, 4, generator=gen(5))
    inf[1, 2, 0] = float("inf")
    assert torch.isinf(token_similarity(inf)[1]) and torch.isfinite(token_similarity(inf)[0])
    assert torch.isinf(rank_collapse(inf)[1]) and torch.isfinite(rank_collapse(inf)[0])
    with pytest.raises(ValueError, match="mask"):
        rank_collapse(inf, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 dims"):
        token_similarity(torch.ones(4))


def test_rank_collapse_names_a_post_ln_stack_with_too_small_a_residual() -> None:
    rc_small, sim_small = block_collapse(alpha=0.05)
    rc_ok, sim_ok = block_collapse(alpha=1.0)
    # Too small a skip scale: attention (token averaging) dominates, the tokens collapse within a
    # few blocks and stay collapsed; the standard scale keeps them apart through all 16 blocks.
    first = next(i for i, v in enumerate(rc_small) if v < 1e-3)
    assert first <= 4 and max(rc_small[first:]) < 1e-3 and min(sim_small[first:]) > 0.999
    assert min(rc_ok) > 0.3 and max(sim_ok) < 0.9
    assert rc_small[-1] < 1e-4 * rc_ok[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
def test_collapse_statistics_equal_the_two_functions(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 11, 6, generator=gen(2)) + 2.0).to(dtype)
    rank, sim = collapse_statistics(x)
    assert torch.equal(rank, rank_collapse(x)) and torch.equal(sim, token_similarity(x))
    # and the float64 definitions, written out
    x64 = x.double()
    centred = x64 - x64.mean(-2, keepdim=True)
    want = centred.flatten(1).norm(dim=1) / x64.flatten(1).norm(dim=1)
    assert torch.allclose(rank, want, rtol=1e-12, atol=0)
    u = x64 / x64.norm(dim=-1, keepdim=True)
    gram = u @ u.mT
    n = x.shape[1]
    assert torch.allclose(sim, (gram.sum((-2, -1)) - n) / (n * (n - 1)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_token_reaches_only_its_own_example(bad: float) -> None:
    x = torch.randn(3, 9, 5, generator=gen(3))
    clean_rank, clean_sim = collapse_statistics(x)
    x[1, 4, 2] = bad
    rank, sim = collapse_statistics(x)
    assert rank[1].item() == sim[1].item() == math.inf
    for b in (0, 2):  # the other examples' values are unchanged
        assert rank[b].item() == clean_rank[b].item() and sim[b].item() == clean_sim[b].item()
    assert torch.equal(rank, rank_collapse(x)) and torch.equal(sim, token_similarity(x))


def test_a_masked_non_finite_token_is_ignored() -> None:
    x = torch.randn(2, 7, 4, generator=gen(4))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3] = False
    x_bad = x.clone()
    x_bad[0, 3] = math.nan
    rank, sim = collapse_statistics(x_bad, mask)
    kept = torch.cat([x[0, :3], x[0, 4:]])[None]
    assert rank[0].item() == pytest.approx(rank_collapse(kept).item(), abs=1e-12)
    assert sim[0].item() == pytest.approx(token_similarity(kept).item(), abs=1e-12)


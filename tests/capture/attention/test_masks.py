"""Mask folding: causal keep-masks, boolean and additive masks, the MASK_GAP rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.capture.conftest import PaddedEncoder, run_captured_no_grad
from torch import Tensor

from lightning_stability.capture import (
    MASK_GAP,
    AttentionCall,
    call_diagnostics,
    causal_keep,
    fold_mask,
    keep_mask,
)


def alibi(n: int, heads: int) -> Tensor:
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
    dist = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp_max(0).float()
    return slopes[:, None, None] * dist  # (H, n, n), ≤ 0


def test_causal_keep_alignments() -> None:
    tl = causal_keep(2, 4)
    br = causal_keep(2, 4, "bottom_right")
    assert tl.tolist() == [[True, False, False, False], [True, True, False, False]]
    assert br.tolist() == [[True, True, True, False], [True, True, True, True]]
    # SDPA's is_causal is top-left: check against the kernel itself
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=tl), atol=1e-6)


def test_fold_mask_bool_float_and_bias() -> None:
    b = torch.tensor([[True, False], [True, True]])
    assert torch.equal(fold_mask(b).keep, b) and fold_mask(b).bias is None
    fmin = torch.finfo(torch.float32).min
    m = torch.tensor([[0.0, float("-inf"), fmin], [0.0, 0.0, 0.0]])
    keep, bias = fold_mask(m)
    assert keep is not None and keep.tolist() == [[True, False, False], [True, True, True]]
    assert bias is None  # pure 0/-inf/finfo.min
    m2 = torch.tensor([[0.5, float("-inf")], [-2.0, 0.0]])
    keep, bias = fold_mask(m2)
    assert keep is not None and bias is not None
    assert bias.tolist() == [[0.5, 0.0], [-2.0, 0.0]]
    assert fold_mask(torch.zeros(3, 3)) == (None, None)
    assert torch.equal(fold_mask(torch.zeros(3, 3), is_causal=True, n_q=3, n_k=3).keep, causal_keep(3, 3))
    # bf16 finfo.min and fp16 min in an fp32 mask are both "masked"
    m3 = torch.tensor([torch.finfo(torch.bfloat16).min, float(torch.finfo(torch.float16).min), -1.0])
    assert keep_mask(m3).tolist() == [False, False, True]  # type: ignore[union-attr]
    # combined with causal
    keep = keep_mask(torch.tensor([True, True, False]), is_causal=True, n_q=3, n_k=3)
    assert keep is not None and keep.tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, False],
    ]
    with pytest.raises(ValueError):
        fold_mask(None, is_causal=True)


def test_fold_mask_causal_bias_lower_right() -> None:
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    assert torch.equal(fold_mask(causal_lower_right(2, 5)).keep, causal_keep(2, 5, "bottom_right"))
    assert torch.equal(fold_mask(causal_upper_left(2, 5)).keep, causal_keep(2, 5, "top_left"))


def test_fold_mask_rule_masks_and_biases() -> None:
    fmin = torch.finfo(torch.float32).min
    for value in (-1e4, -100.0, fmin, float(torch.finfo(torch.bfloat16).min), -math.inf):
        m = torch.tensor([[0.0, value, 0.0], [value, 0.0, 0.0]])
        keep, bias = fold_mask(m)
        assert keep is not None and keep.tolist() == [[True, False, True], [False, True, True]], value
        assert bias is None
    # genuine biases stay bias: ALiBi (n = 64, 8 heads), a T5-like and a Swin-like table
    a = alibi(64, 8)
    keep, bias = fold_mask(a)
    assert keep is None and bias is not None and torch.equal(bias, a)
    table = (torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)) * 5).clamp(-12, 12)
    parts = fold_mask(table)
    assert parts.keep is None and parts.bias is not None and torch.equal(parts.bias, table)
    # Swin's fused form: relative-position bias + (-100) shift mask in one tensor
    shift = torch.zeros(4, 16, 16)
    shift[:, :, 8:] = -100.0
    keep, bias = fold_mask(table + shift)
    assert keep is not None and torch.equal(keep, (shift == 0).expand_as(keep))
    assert bias is not None and torch.equal(bias[keep], table[keep])
    # a fully padded query row (every entry -1e4) is fully masked, not a uniform row of bias -1e4
    keep, _ = fold_mask(torch.tensor([[-1e4, -1e4], [0.0, -1e4]]))
    assert keep is not None and keep.tolist() == [[False, False], [True, False]]
    # the boundary is MASK_GAP below max(0, row max)
    edge = torch.tensor([[1.0, 1.0 - MASK_GAP, 1.0 - MASK_GAP + 1e-3]])
    keep = fold_mask(edge).keep
    assert keep is not None and keep.tolist() == [[True, False, True]]
    # why not "weight exactly 0 in float32": exp(-100) is a float32 subnormal, not 0
    assert torch.softmax(torch.tensor([0.0, -100.0]), -1)[1].item() > 0


def test_minus_1e4_padding_equals_boolean_mask() -> None:
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    x = torch.randn(2, 10, 32)
    attn = torch.ones(2, 10)
    attn[1, 6:] = 0  # four padded keys
    additive = ((1.0 - attn) * -1e4)[:, None, None, :]  # older transformers' extended mask
    boolean = attn.bool()[:, None, None, :]
    _, c_add, _ = run_captured_no_grad(model, lambda: model(x, additive))
    _, c_bool, _ = run_captured_no_grad(model, lambda: model(x, boolean))
    for ca, cb in zip(c_add, c_bool, strict=True):
        assert ca.bias is None and ca.keep is not None and torch.equal(ca.keep, cb.keep)
        da, db = call_diagnostics(ca), call_diagnostics(cb)
        for name in ("kappa_softmax", "kappa_score", "kappa_v", "entropy", "logit_max"):
            assert torch.allclose(getattr(da, name), getattr(db, name), rtol=1e-6), name
        assert 0.1 < da.kappa_softmax.max().item() < 5.0
        # what the former rule (only entries <= fp16 min are masks) reported: -1e4 as a bias
        old = call_diagnostics(
            AttentionCall(ca.name, ca.q, ca.k, ca.v, None, additive.expand(2, 1, 10, 10), ca.scale)
        )
        assert old.kappa_softmax[1].max().item() > 1e3 * da.kappa_softmax[1].max().item()


"""Attention written out by hand (softmax(q @ kᵀ · scale + mask) @ v), traced without an adapter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.capture.conftest import (
    assert_matches,
    linear64,
    ref_diagnostics,
    run_captured_no_grad,
)
from torch import Tensor, nn

from lightning_stability.capture import (
    AttentionCall,
    call_diagnostics,
    call_probabilities,
    fold_mask,
)
from lightning_stability.diagnostics import kappa_softmax


class NanoAttention(nn.Module):
    """nanoGPT's manual CausalSelfAttention path."""

    def __init__(self, dim: int = 32, heads: int = 4, block: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def reference(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        b, t, c = x.shape
        q, k, v = linear64(x, self.c_attn).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        keep = torch.ones(t, t, dtype=torch.bool).tril()
        s = q @ k.mT / math.sqrt(c // self.heads)
        return q, k, v, s, keep


class TimmAttention(nn.Module):
    """timm ``Attention`` with ``fused_attn`` off."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    def reference(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        b, n, _ = x.shape
        qkv = linear64(x, self.qkv).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, q @ k.mT * self.scale, None


class ManualBlock(nn.Module):
    def __init__(self, attn: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def window_partition(x: Tensor, w: int) -> Tensor:
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def shift_mask(size: int, w: int, shift: int) -> Tensor:
    """Swin's shifted-window attention mask (nW, N, N) with 0 / -100 entries."""
    img = torch.zeros(1, size, size, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, w).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowAttention(nn.Module):
    """Swin's ``WindowAttention`` (non-fused path): relative position bias table + shift mask."""

    def __init__(self, dim: int = 32, w: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.w, self.num_heads = w, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads) * 2.0)
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * w - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(0.0)

    def bias(self) -> Tensor:
        n = self.w * self.w
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj(x)


class ManualBertSelfAttention(nn.Module):
    """Older transformers BERT eager path written out: scores + extended mask (-1e4) → softmax."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, extended_mask: Tensor) -> Tensor:
        b, n, c = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(c // self.heads)
        scores = scores + extended_mask
        probs = nn.functional.softmax(scores, dim=-1)
        return torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, n, c)


@pytest.mark.parametrize("kind", ["nanogpt", "timm"])
def test_manual_attention_captured_without_adapter(kind: str) -> None:
    torch.manual_seed(1)
    make = NanoAttention if kind == "nanogpt" else TimmAttention
    model = nn.Sequential(ManualBlock(make()), ManualBlock(make())).eval()
    with torch.no_grad():
        for blk in model:  # larger logits than the default init, so the softmax is not flat
            blk.attn.c_attn.weight.mul_(3) if kind == "nanogpt" else blk.attn.qkv.weight.mul_(3)
    x = torch.randn(2, 12, 32)
    inputs: list[Tensor] = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for blk in model]
    with torch.no_grad():
        base = model(x)
        inputs.clear()
    out, calls, n = run_captured_no_grad(model, lambda: model(x))
    for h in hooks:
        h.remove()
    assert torch.equal(out, base)  # bit-identical
    assert n == 2 and [c.name for c in calls] == ["0.attn", "1.attn"]
    for blk, call, xin in zip(model, calls, inputs, strict=True):
        q, k, v, s, keep = blk.attn.reference(xin)
        assert call.scores is not None and call.q is not None and call.k is not None
        assert call.bias is None and call.softcap is None
        if keep is None:
            assert call.keep is None
        else:
            assert call.keep is not None
            assert torch.equal(call.keep.expand(2, 4, 12, 12), keep.expand(2, 4, 12, 12))
        assert_matches(call_diagnostics(call), ref_diagnostics(q, k, v, s, keep))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_swin_like_window_attention() -> None:
    torch.manual_seed(2)
    size, w = 8, 4
    attn = WindowAttention(w=w)
    model = nn.Sequential()
    model.add_module("attn", attn)
    model.eval()
    mask = shift_mask(size, w, w // 2)  # (nW=4, 16, 16)
    x = torch.randn(2, size, size, 32)
    shifted = torch.roll(x, shifts=(-2, -2), dims=(1, 2))
    windows = window_partition(shifted, w)  # (2·4, 16, 32)
    with torch.no_grad():
        base = attn(windows, mask)
    out, calls, n = run_captured_no_grad(model, lambda: attn(windows, mask))
    assert torch.equal(out, base) and n == 1
    call = calls[0]
    assert call.name == "attn" and call.q is not None and call.scores is not None
    keep = (mask == 0).repeat(2, 1, 1).unsqueeze(1)  # (8, 1, 16, 16)
    assert call.keep is not None and torch.equal(call.keep, keep.expand(8, 4, 16, 16))
    # reference: scores with the relative-position bias, the -100 entries not attended
    qkv = linear64(windows, attn.qkv).reshape(8, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = q * attn.scale @ k.mT + attn.bias().double().detach()
    d = call_diagnostics(call)
    assert_matches(d, ref_diagnostics(q, k, v, s, keep))
    # the same windows with -100 taken as bias (the former rule) inflate kappa_softmax
    s_bias = s + mask.double().repeat(2, 1, 1).unsqueeze(1)
    as_bias = kappa_softmax(s_bias)
    assert as_bias.max().item() > 10 * d.kappa_softmax.max().item()
    # fused form (one SDPA attn_mask = bias + shift mask) folds to the same keep-mask and bias
    fused = attn.bias().detach().unsqueeze(0) + mask.repeat(2, 1, 1).unsqueeze(1)
    parts = fold_mask(fused)
    assert parts.keep is not None and torch.equal(parts.keep, keep.expand(8, 4, 16, 16))


def test_untraced_scores_and_in_place_ops() -> None:
    """atan between matmul and softmax breaks the trace: scores only, kappa_score unknown."""

    class Odd(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            s = torch.atan(q @ k.transpose(-2, -1)) * 4.0
            s[..., 0] = -1e9  # an in-place mask on an untraced tensor
            return torch.matmul(s.softmax(-1), v)

    class InPlace(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            s = torch.matmul(q, k.transpose(-2, -1))
            s *= 0.5
            s += torch.zeros(1, 1, 1, 6).index_fill_(-1, torch.tensor([5]), -1e4)
            return torch.bmm(s.softmax(-1).flatten(0, 1), v.flatten(0, 1)).view(v.shape)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    _, calls, n = run_captured_no_grad(Odd(), lambda: Odd()(q, k, v))
    assert n == 1 and calls[0].q is None and calls[0].k is None and calls[0].keep is not None
    assert not calls[0].keep[..., 0].any() and calls[0].keep[..., 1:].all()
    d = call_diagnostics(calls[0])
    assert d.kappa_score.isnan().all()
    s = torch.atan(q.double() @ k.double().mT) * 4.0
    keep = torch.ones(6, dtype=torch.bool)
    keep[0] = False
    ref = ref_diagnostics(q.double(), k.double(), v.double(), s, keep.expand(1, 2, 6, 6))
    del ref["kappa_score"]
    assert_matches(d, ref)
    # 4-D matmul traced through in-place *= and +=; the V matmul is a bmm over flattened heads:
    # not the 4-D pattern, so nothing is recorded (documented limitation)
    _, calls, n = run_captured_no_grad(InPlace(), lambda: InPlace()(q, k, v))
    assert n == 0


class SoftCapped(nn.Module):
    """``c·tanh(q kᵀ·scale/c)`` written out by hand (litgpt's order, or the cap multiplied first
    and the scale folded in), then a mask and optionally a bias added."""

    def __init__(
        self, scale: float, cap: float, bias: Tensor | None = None, litgpt_order: bool = True
    ) -> None:
        super().__init__()
        self.scale, self.cap, self.bias, self.litgpt_order = scale, cap, bias, litgpt_order

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.litgpt_order:
            s = torch.tanh(q @ k.transpose(-2, -1) * self.scale / self.cap) * self.cap
        else:
            s = self.cap * (q @ k.transpose(-2, -1)).mul(self.scale / self.cap).tanh()
        s[..., 0] = -1e9  # an in-place mask after the cap
        if self.bias is not None:
            s = s + self.bias
        return torch.matmul(s.softmax(-1), v)


@pytest.mark.parametrize("litgpt_order", [True, False])
def test_soft_capping_written_out_is_traced(litgpt_order: bool) -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) * 3 for _ in range(3))
    keep = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    keep[..., 0] = False
    logits = q.double() @ k.double().mT * 0.5
    module = SoftCapped(0.5, 2.0, litgpt_order=litgpt_order)
    out, calls, n = run_captured_no_grad(module, lambda: module(q, k, v))
    call = calls[0]
    assert n == 1 and call.scores is None and call.bias is None and call.keep is not None
    assert call.softcap == pytest.approx(2.0) and call.scale == pytest.approx(0.5)
    assert torch.equal(call.keep.expand_as(keep), keep)
    assert float(logits.abs().amax()) > 4.0  # the cap bites
    capped = 2.0 * torch.tanh(logits / 2.0)
    assert torch.allclose(call_probabilities(call) @ v.double(), out.double(), rtol=1e-5, atol=1e-6)
    ref = ref_diagnostics(q.double(), k.double(), v.double(), capped, keep)
    ref["logit_max"] = logits.abs().masked_fill(~keep, 0.0).amax((-2, -1))  # before the cap
    assert_matches(call_diagnostics(call), ref)
    # a bias added after the cap is not a bias of the logits: the record keeps the scores alone
    biased = SoftCapped(0.5, 2.0, torch.randn(6, 6, generator=g), litgpt_order)
    _, calls, _ = run_captured_no_grad(biased, lambda: biased(q, k, v))
    assert calls[0].q is None and calls[0].softcap is None and calls[0].scores is not None


def test_manual_record_sdpa_fields_reproduce_scores() -> None:
    """scale·q kᵀ + bias of a traced record equals its scores on attended entries (Swin-like)."""
    torch.manual_seed(7)
    attn = WindowAttention(w=4)
    mask = shift_mask(8, 4, 2)
    windows = window_partition(torch.randn(1, 8, 8, 32), 4)
    _, calls, _ = run_captured_no_grad(attn, lambda: attn(windows, mask))
    call = calls[0]
    assert call.q is not None and call.k is not None and call.bias is not None and call.scores is not None
    keep = call.keep
    assert keep is not None
    s = call.scale * call.q.double() @ call.k.double().mT + call.bias.double()
    assert (s - call.scores.double()).abs()[keep].max().item() < 1e-5
    d_scores = call_diagnostics(call)
    d_fields = call_diagnostics(AttentionCall(call.name, call.q, call.k, call.v, keep, call.bias, call.scale))
    for name in ("kappa_softmax", "kappa_score", "kappa_v", "entropy", "logit_max"):
        assert torch.allclose(getattr(d_scores, name), getattr(d_fields, name), rtol=1e-5), name


def test_dropout_on_probabilities_record_is_before_dropout() -> None:
    """Dropout active on the probabilities (training mode): the record is the pre-dropout P."""
    torch.manual_seed(8)
    attn = NanoAttention(dropout=0.5).train()
    x = torch.randn(2, 12, 32)
    _, calls, n = run_captured_no_grad(attn, lambda: attn(x))
    assert n == 1
    q, k, v, s, keep = attn.reference(x)
    assert_matches(call_diagnostics(calls[0]), ref_diagnostics(q, k, v, s, keep))


def test_manual_minus_1e4_padding_is_masked() -> None:
    torch.manual_seed(9)
    attn = ManualBertSelfAttention()
    with torch.no_grad():
        attn.query.weight.mul_(4)
        attn.key.weight.mul_(4)
    x = torch.randn(2, 10, 32)
    am = torch.ones(2, 10)
    am[1, 7:] = 0
    ext = (1.0 - am)[:, None, None, :] * -10000.0
    _, calls, n = run_captured_no_grad(attn, lambda: attn(x, ext))
    assert n == 1
    call = calls[0]
    keep = am.bool()[:, None, None, :].expand(2, 4, 10, 10)
    assert call.keep is not None and torch.equal(call.keep.expand(2, 4, 10, 10), keep)
    def heads(t: Tensor) -> Tensor:
        return t.view(2, 10, 4, 8).permute(0, 2, 1, 3)

    q, k, v = (heads(linear64(x, lin)) for lin in (attn.query, attn.key, attn.value))
    s = q @ k.mT / math.sqrt(8)  # the -1e4 entries are masked, not part of S
    d = call_diagnostics(call)
    assert_matches(d, ref_diagnostics(q, k, v, s, keep))
    as_bias = kappa_softmax(s + ext.double())  # what the former rule measured for example 1
    assert as_bias[1].max().item() > 100 * d.kappa_softmax[1].max().item()


def test_nan_scores_are_flagged_not_masked() -> None:
    class NaNAttention(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            s = q @ k.transpose(-2, -1)
            s = s + torch.tensor([0.0, float("nan"), 0.0, 0.0])
            return s.softmax(-1) @ v

    q, k, v = (torch.randn(1, 1, 4, 2, generator=torch.Generator().manual_seed(i)) for i in range(3))
    _, calls, _ = run_captured_no_grad(NaNAttention(), lambda: NaNAttention()(q, k, v))
    assert calls[0].keep is None  # the NaN key is not silently dropped
    assert call_diagnostics(calls[0]).kappa_softmax.item() == math.inf
    keep = fold_mask(torch.tensor([0.0, float("nan"), -math.inf])).keep
    assert keep is not None and keep.tolist() == [True, True, False]


"""AttentionCapture: every captured call must reproduce the real attention, and be neutral."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stability.capture import (
    AttentionCall,
    AttentionCapture,
    causal_keep,
    fold_mask,
    keep_mask,
    observe_attention,
)

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def reference(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """softmax(scale·qkᵀ + bias, masked by keep) @ v in float64, and the rows with a kept key."""
    q, k, v = call.q.double(), call.k.double(), call.v.double()
    s = call.scale * q @ k.transpose(-1, -2)
    if call.bias is not None:
        s = s + call.bias.double()
    valid = torch.ones(s.shape[:-1], dtype=torch.bool)
    if call.keep is not None:
        keep = call.keep.expand(s.shape)
        s = s.masked_fill(~keep, float("-inf"))
        valid = keep.any(-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, valid


def heads_from(x: Tensor, n_heads: int) -> Tensor:
    """(B, n, H·d) → (B, H, n, d)."""
    b, n, hd = x.shape
    return x.reshape(b, n, n_heads, hd // n_heads).transpose(1, 2)


def assert_reproduces(call: AttentionCall, real: Tensor, atol: float = ATOL) -> None:
    """``real`` is the attention output (B, H, n_q, d_v); compare at rows with a kept key."""
    ref, valid = reference(call)
    assert ref.shape == real.shape, (ref.shape, real.shape)
    assert valid.any()
    diff = (ref - real.double()).abs().amax(-1)  # (B, H, n_q)
    assert float(diff[valid.expand(diff.shape)].max()) < atol


def record_inputs(module: nn.Module, store: list[Tensor]) -> Any:
    """Forward pre-hook collecting the first positional input (the heads' concatenated output)."""
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach()))


def no_leftovers(model: nn.Module) -> None:
    assert torch.overrides._get_current_function_mode_stack() == []
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_always_called


# ----------------------------------------------------------------------------------------------
# mask folding
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# hand-written SDPA models and the adapter
# ----------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.hd = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.hd)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-LN ViT-like block."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, kv_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))


class Tiny(nn.Module):
    def __init__(self, depth: int = 2, **kw: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(**kw) for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        for blk in self.blocks:
            x = blk(x, mask, causal)
        return x


def run_captured(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, list[AttentionCall], int]:
    calls: list[AttentionCall] = []
    with AttentionCapture(model, calls.append) as cap:
        out = fn()
    return out, calls, cap.calls


@pytest.mark.parametrize(
    ("kv_heads", "mask_kind"),
    [(None, None), (None, "causal"), (None, "float"), (2, None), (2, "bool")],
)
def test_sdpa_block_reproduces(kv_heads: int | None, mask_kind: str | None) -> None:
    torch.manual_seed(0)
    model = Tiny(kv_heads=kv_heads).eval()
    x = torch.randn(2, 7, 32)
    mask: Tensor | None = None
    causal = mask_kind == "causal"
    if mask_kind == "float":  # additive bias plus -inf entries, per head
        mask = torch.randn(2, 4, 7, 7)
        mask[..., 3] = float("-inf")
    elif mask_kind == "bool":
        mask = torch.rand(2, 1, 7, 7) > 0.3
        mask[..., 0] = True
    base = model(x, mask, causal)
    inputs: list[Tensor] = []
    handles = [record_inputs(b.attn.proj, inputs) for b in model.blocks]
    out, calls, n = run_captured(model, lambda: model(x, mask, causal))
    for h in handles:
        h.remove()
    assert torch.equal(out, base)
    assert n == 2 and [c.name for c in calls] == ["blocks.0.attn", "blocks.1.attn"]
    for call, real in zip(calls, inputs, strict=True):
        assert call.q.shape == (2, 4, 7, 8) and call.k.shape == (2, 4, 7, 8)
        assert call.scale == pytest.approx(1 / math.sqrt(8))
        assert (call.bias is not None) == (mask_kind == "float")
        assert (call.keep is None) == (mask_kind is None)
        assert not call.q.requires_grad
        assert_reproduces(call, heads_from(real, 4))
    no_leftovers(model)


def test_sdpa_positional_args_3d_and_lower_right() -> None:
    from torch.nn.attention.bias import causal_lower_right

    class M(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            a = F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], None, 0.0, True, scale=0.3)  # 3-D
            b = F.scaled_dot_product_attention(q, k, v, causal_lower_right(q.shape[-2], k.shape[-2]))
            return a, b

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5)
    (a, b), calls, _ = run_captured(M(), lambda: M()(q, k, v))
    assert calls[0].q.shape == (2, 1, 4, 8) and calls[0].scale == 0.3
    assert_reproduces(calls[0], a.unsqueeze(1))
    assert calls[1].keep is not None and calls[1].keep[-1].all()  # last query sees every key
    assert_reproduces(calls[1], b)


class ExplicitSoftmaxAttention(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        observe_attention(q, k, v, mask, scale=0.5)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ v


def test_observe_attention_adapter() -> None:
    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("attn", ExplicitSoftmaxAttention())
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.rand(1, 1, 5, 5) > 0.4
    mask[..., 0] = True
    observe_attention(q, k, v, mask)  # inactive: a no-op
    out, calls, n = run_captured(model, lambda: model.attn(q, k, v, mask))
    assert n == 1 and calls[0].name == "attn" and calls[0].k.shape == (1, 4, 5, 8)
    assert_reproduces(calls[0], out)


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention and nn.TransformerEncoder
# ----------------------------------------------------------------------------------------------


def mha_out_from(call: AttentionCall, mha: nn.MultiheadAttention, batch_first: bool) -> Tensor:
    """Recompose the MHA module output from the captured call (fp64)."""
    o, _ = reference(call)  # (B, H, L, d)
    b, h, n, d = o.shape
    o = o.transpose(1, 2).reshape(b, n, h * d)
    y = F.linear(o, mha.out_proj.weight.double(), mha.out_proj.bias.double())
    return y if batch_first else y.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_direct(batch_first: bool, need_weights: bool) -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    b, n = 2, 6
    x = torch.randn(b, n, 32) if batch_first else torch.randn(n, b, 32)
    kpm = torch.zeros(b, n)
    kpm[1, -2:] = float("-inf")  # right padding of example 1 (float, like attn_mask)
    attn_mask = torch.randn(n, n)  # float additive bias
    attn_mask[0, 3] = float("-inf")

    def fwd() -> tuple[Tensor, Tensor | None]:
        return mha(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)

    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            base = fwd()
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        (out, w), calls, n_calls = run_captured(mha, fwd)
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch.equal(out, base[0])
    assert n_calls == 1 and calls[0].name == ""
    call = calls[0]
    assert call.q.shape == (b, 4, n, 8) and call.bias is not None and call.keep is not None
    assert not call.keep[1, :, :, -2:].any() and call.keep[0, 0, 0, 3].item() is False
    assert torch.allclose(mha_out_from(call, mha, batch_first), out.double(), atol=ATOL)
    if need_weights:
        assert w is not None
        ref_p = torch.softmax(
            (
                call.scale * call.q.double() @ call.k.double().transpose(-1, -2) + call.bias.double()
            ).masked_fill(~call.keep, float("-inf")),
            -1,
        )
        assert torch.allclose(ref_p.mean(1), w.double(), atol=ATOL)
    no_leftovers(mha)


def test_mha_separate_kv_dims_bias_kv_zero_attn_bool_3d_mask() -> None:
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=24, add_bias_kv=True, add_zero_attn=True)
    mha.eval()
    q, k, v = torch.randn(5, 2, 32), torch.randn(7, 2, 16), torch.randn(7, 2, 24)
    mask3 = torch.rand(2 * 4, 5, 7) > 0.7  # bool, True = NOT allowed
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        (out, _), calls, _ = run_captured(
            mha, lambda: mha(q, k, v, attn_mask=mask3, key_padding_mask=kpm, need_weights=False)
        )
        base, _ = mha(q, k, v, attn_mask=mask3, key_padding_mask=kpm, need_weights=False)
    assert torch.equal(out, base)  # no fast path for kdim != embed_dim anyway
    call = calls[0]
    assert call.k.shape == (2, 4, 9, 8) and call.v.shape == (2, 4, 9, 8)  # +bias_k +zero column
    assert call.keep is not None and call.keep[..., -2:].all()  # the two extra keys are attended
    assert torch.allclose(mha_out_from(call, mha, False), out.double(), atol=ATOL)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("padding", [True, False])
def test_transformer_encoder(norm_first: bool, padding: bool) -> None:
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    n, b = 6, 2
    x = torch.randn(n, b, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(n)
    kpm = None
    if padding:
        kpm = torch.zeros(b, n)
        kpm[1, -2:] = float("-inf")
    attn_outs: list[Tensor] = []
    handles = [
        enc.layers[i].self_attn.register_forward_hook(lambda m, a, o: attn_outs.append(o[0].detach()))
        for i in range(2)
    ]

    def fwd() -> Tensor:
        return enc(x, mask=causal, src_key_padding_mask=kpm, is_causal=True)

    with torch.no_grad():
        out, calls, n_calls = run_captured(enc, fwd)
        for h in handles:
            h.remove()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            base = fwd()
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.equal(out, base)
    assert n_calls == 2 and [c.name for c in calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    for i, call in enumerate(calls):
        assert call.keep is not None
        expect = causal_keep(n, n)
        assert torch.equal(call.keep.expand(b, 4, n, n)[0, 0], expect)
        if padding:
            assert not call.keep.expand(b, 4, n, n)[1, :, :, -2:].any()
        assert torch.allclose(
            mha_out_from(call, enc.layers[i].self_attn, False), attn_outs[i].double(), atol=ATOL
        )
    no_leftovers(enc)


def test_fast_path_disabled_while_active() -> None:
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _, calls, _ = run_captured(layer, lambda: layer(x))
        assert len(calls) == 1 and calls[0].name == "self_attn"
        _, calls, _ = run_captured(mha, lambda: mha(x, x, x))
        assert len(calls) == 1
    assert torch.backends.mha.get_fastpath_enabled()
    # and a flag the user had turned off stays off
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            run_captured(mha, lambda: mha(x, x, x))
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


# ----------------------------------------------------------------------------------------------
# autocast, cleanup, nesting
# ----------------------------------------------------------------------------------------------


def test_autocast_bf16() -> None:
    torch.manual_seed(7)
    model = Tiny().eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    inputs: list[Tensor] = []
    handle = record_inputs(model.blocks[0].attn.proj, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(x)
        out, calls, _ = run_captured(model, lambda: model(x))
        (mout, _), mcalls, _ = run_captured(mha, lambda: mha(x, x, x, need_weights=False))
    handle.remove()
    assert torch.equal(out, base)
    assert calls[0].q.dtype == torch.bfloat16 and mcalls[0].q.dtype == torch.bfloat16
    assert_reproduces(calls[0], heads_from(inputs[1], 4).float(), atol=3e-2)
    assert torch.allclose(mha_out_from(mcalls[0], mha, True), mout.double(), atol=5e-2)


def test_cleanup_after_exception_and_nesting() -> None:
    import transformers.modeling_utils as mu

    iface = mu.AttentionInterface
    lookup = vars(iface)["get_interface"]
    global_before = dict(iface._global_mapping)
    local_before = dict(mu.ALL_ATTENTION_FUNCTIONS._local_mapping)

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Tiny(depth=1)

        def forward(self, x: Tensor) -> Tensor:
            self.inner(x)
            raise RuntimeError("boom")

    model = Boom()
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), AttentionCapture(model, lambda c: seen.append(c.name)):
        assert vars(iface)["get_interface"] is not lookup
        assert not torch.backends.mha.get_fastpath_enabled()
        model(torch.randn(1, 3, 32))
    assert seen == ["inner.blocks.0.attn"]
    no_leftovers(model)
    assert vars(iface)["get_interface"] is lookup
    assert iface._global_mapping == global_before and "eager" not in mu.ALL_ATTENTION_FUNCTIONS
    assert mu.ALL_ATTENTION_FUNCTIONS._local_mapping == local_before
    assert torch.backends.mha.get_fastpath_enabled()

    # nested captures both see the call; the callback's own SDPA is not recorded
    outer: list[AttentionCall] = []

    def inner_cb(c: AttentionCall) -> None:
        F.scaled_dot_product_attention(c.q, c.k, c.v)

    with AttentionCapture(model.inner, outer.append) as a, AttentionCapture(model.inner, inner_cb) as b:
        model.inner(torch.randn(1, 3, 32))
    assert a.calls == b.calls == 1 and len(outer) == 1 and outer[0].name == "blocks.0.attn"
    no_leftovers(model)
    assert vars(iface)["get_interface"] is lookup and iface._global_mapping == global_before


def test_eager_lookup_delegates_to_the_models_own_default() -> None:
    """A model file whose eager function has another name still gets exactly that function."""
    import transformers.modeling_utils as mu

    used: list[str] = []

    def simple_eager(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, **kw: Any):
        used.append("simple")
        w = torch.softmax(q @ k.transpose(-1, -2) * kw["scaling"] + mask, -1)
        return (w @ v).transpose(1, 2), w

    class Attn(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
            fn = mu.ALL_ATTENTION_FUNCTIONS.get_interface("eager", simple_eager)
            return fn(self, q, k, v, mask, dropout=0.0, scaling=0.25)[0]

    model = nn.Sequential()
    model.add_module("attn", Attn())
    q = torch.randn(1, 2, 4, 8)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1] = torch.finfo(torch.float32).min
    mask[..., 2] = 0.7
    base = model.attn(q, q, q, mask)
    out, calls, _ = run_captured(model, lambda: model.attn(q, q, q, mask))
    assert torch.equal(out, base) and used == ["simple", "simple"]
    call = calls[0]
    assert call.name == "attn" and call.scale == 0.25 and call.keep is not None and call.bias is not None
    assert not call.keep[..., 1].any() and torch.all(call.bias[..., 2] == 0.7)
    assert_reproduces(call, out.transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# transformers models (built from small configs, no download)
# ----------------------------------------------------------------------------------------------


def _padding(kind: str | None, b: int = 2, n: int = 8) -> Tensor | None:
    if kind is None:
        return None
    mask = torch.ones(b, n, dtype=torch.long)
    if kind == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return mask


def _hf_model(family: str, impl: str) -> tuple[nn.Module, str, Callable[[int], str], int]:
    """(model, expected call-name pattern, out-proj name for layer i, heads)."""
    import transformers as tr

    if family == "gpt2":
        cfg: Any = tr.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
        )
        return (
            tr.GPT2Model._from_config(cfg, attn_implementation=impl),
            "h.{}.attn",
            "h.{}.attn.c_proj".format,
            4,
        )
    if family == "llama":
        cfg = tr.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        return (
            tr.LlamaModel._from_config(cfg, attn_implementation=impl),
            "layers.{}.self_attn",
            "layers.{}.self_attn.o_proj".format,
            4,
        )
    if family == "bert":
        cfg = tr.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=64,
            max_position_embeddings=16,
        )
        return (
            tr.BertModel._from_config(cfg, attn_implementation=impl, add_pooling_layer=False),
            "encoder.layer.{}.attention.self",
            "encoder.layer.{}.attention.output.dense".format,
            4,
        )
    cfg = tr.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_channels=3,
    )
    return (
        tr.ViTModel._from_config(cfg, attn_implementation=impl, add_pooling_layer=False),
        "layers.{}.attention",
        "layers.{}.attention.o_proj".format,
        4,
    )


HF_CASES = [
    (fam, impl, pad)
    for impl in ("sdpa", "eager")
    for fam, pad in [
        ("gpt2", None),
        ("gpt2", "left"),
        ("gpt2", "right"),
        ("llama", None),
        ("llama", "left"),
        ("llama", "right"),
        ("bert", "right"),
        ("vit", None),
    ]
]


@pytest.mark.parametrize(("family", "impl", "pad"), HF_CASES)
def test_transformers_models(family: str, impl: str, pad: str | None) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(8)
    model, pattern, proj_name, heads = _hf_model(family, impl)
    model.eval()
    assert model.config._attn_implementation == impl
    if family == "vit":
        kwargs: dict[str, Any] = {"pixel_values": torch.randn(2, 3, 8, 8)}
    else:
        kwargs = {"input_ids": torch.randint(1, 64, (2, 8))}
        if pad is not None:
            kwargs["attention_mask"] = _padding(pad)
    mods = dict(model.named_modules())
    inputs: list[Tensor] = []
    with torch.no_grad():
        base = model(**kwargs).last_hidden_state
        handles = [record_inputs(mods[proj_name(i)], inputs) for i in range(2)]
        out, calls, n = run_captured(model, lambda: model(**kwargs).last_hidden_state)
        for h in handles:
            h.remove()
    assert torch.equal(out, base)
    assert n == 2 and [c.name for c in calls] == [pattern.format(0), pattern.format(1)]
    for call, real in zip(calls, inputs, strict=True):
        assert call.q.shape[1] == heads and call.k.shape[1] == heads
        if family in ("gpt2", "llama"):
            assert call.keep is not None  # causal everywhere
            assert not call.keep.expand(call.q.shape[0], heads, 8, 8)[0].triu(1).any()
        if pad == "left":
            assert call.keep is not None and not call.keep.expand(2, heads, 8, 8)[1, :, :, :3].any()
        assert_reproduces(call, heads_from(real, heads))
    no_leftovers(model)


def _gqa_model(family: str, impl: str) -> tuple[nn.Module, str]:
    """A 2-layer GQA decoder (4 query heads on 2 key/value heads) and its layer-0 output projection."""
    import transformers as tr

    if family == "llama":
        model, _, proj_name, _ = _hf_model("llama", impl)
        return model, proj_name(0)
    common = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 64}
    if family == "falcon":
        cfg: Any = tr.FalconConfig(**common, new_decoder_architecture=True, num_kv_heads=2, bias=True)
        return tr.FalconModel._from_config(cfg, attn_implementation=impl), "h.0.self_attention.dense"
    cfg = tr.Qwen2Config(**common, intermediate_size=64, num_key_value_heads=2)
    return tr.Qwen2Model._from_config(cfg, attn_implementation=impl), "layers.0.self_attn.o_proj"


@pytest.mark.parametrize("pad", ["left", None])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "falcon", "qwen2"])
def test_gqa_decode_step(family: str, impl: str, pad: str | None) -> None:
    """One decode step (a single query token) of a GQA model: each recorded query row is its head's.

    transformers' sdpa path hands SDPA the query packed onto the key/value heads,
    ``(B, H_kv, n_rep, d)``, when it cannot use ``enable_gqa`` (a padding mask); without a mask it
    passes ``enable_gqa=True`` instead. Either way the call must hold one row per query head, each
    paired with its group's key, so that it reproduces the model's own attention output.
    """
    pytest.importorskip("transformers")
    torch.manual_seed(9)
    model, proj_name = _gqa_model(family, impl)
    model.eval()
    heads = 4
    ids, mask = torch.randint(1, 64, (2, 6)), _padding(pad, 2, 6)
    with torch.no_grad():
        past = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        step: dict[str, Any] = {"input_ids": torch.randint(1, 64, (2, 1)), "past_key_values": past}
        if mask is not None:
            step["attention_mask"] = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        inputs: list[Tensor] = []
        handle = record_inputs(dict(model.named_modules())[proj_name], inputs)
        _, calls, _ = run_captured(model, lambda: model(**step))
        handle.remove()
    call = calls[0]
    assert call.q.shape == (2, heads, 1, 8) and call.k.shape == (2, heads, 7, 8)
    if pad == "left":
        assert call.keep is not None and not call.keep.expand(2, heads, 1, 7)[1, :, :, :3].any()
    assert_reproduces(call, heads_from(inputs[0], heads))
    no_leftovers(model)

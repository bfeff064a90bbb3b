"""SDPA, nn.MultiheadAttention and transformers calls normalised into AttentionCall records
that reproduce the model's own attention output (float64 reference)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.capture.conftest import (
    ATOL,
    Tiny,
    assert_reproduces,
    heads_from,
    mha_out_from,
    no_leftovers,
    record_inputs,
    run_captured,
)
from torch import Tensor, nn

from lightning_stability.capture import (
    causal_keep,
)


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


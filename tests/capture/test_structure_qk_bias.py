"""QKProjection's query/key biases: split like the weights, read off the model's own forward; one
implementation shared by the diagnostics and the guard's QK-clip (:func:`qk_params`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.capture.test_structure_weights import _SDPAQK
from torch import nn

from lightning_stability.capture.stacks import is_attention_name
from lightning_stability.capture.structure import model_blocks
from lightning_stability.mitigations import attention_module, qk_params

transformers = pytest.importorskip("transformers")
D, H = 32, 4


def _build(family: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    common = {"hidden_size": D, "num_attention_heads": H, "num_hidden_layers": 1, "vocab_size": 60}
    if family == "gpt2":
        cfg: Any = transformers.GPT2Config(n_embd=D, n_head=H, n_layer=1, vocab_size=60)
        model = transformers.GPT2Model._from_config(cfg, attn_implementation="sdpa")
        return model, model.h[0].attn
    if family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(**common, intermediate_size=64)
        model = transformers.GPTNeoXModel._from_config(cfg, attn_implementation="sdpa")
        return model, model.layers[0].attention
    if family == "falcon_gqa":
        cfg = transformers.FalconConfig(**common, new_decoder_architecture=True, num_kv_heads=2, bias=True)
        model = transformers.FalconModel._from_config(cfg, attn_implementation="sdpa")
        return model, model.h[0].self_attention
    cfg = transformers.LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2, attention_bias=True)
    model = transformers.LlamaModel._from_config(cfg, attn_implementation="sdpa")
    return model, model.layers[0].self_attn


def _model_biases(model: nn.Module, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and k the model hands to SDPA for a zero input at position 0: its biases, per head.

    With random biases (the init zeroes some) and rotary at position 0 the identity,
    ``q_h = b_Q^h`` and ``k_j = b_K^j``, split by the model's own code.
    """
    with torch.no_grad():
        for m in attention.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.normal_()

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        zero = torch.zeros(1, 1, D)
        return ((zero, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": zero})

    mode = _SDPAQK()
    handle = attention.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with mode, torch.no_grad():
            zeros = torch.zeros(1, 1, dtype=torch.long)
            model(input_ids=zeros, position_ids=zeros)
    finally:
        handle.remove()
    # q arrives as (1, H, 1, d_head), or, where transformers packs a single query token's heads
    # onto the key/value heads (its `pack_gqa`), as (1, H_kv, H / H_kv, d_head); k as (1, H_kv, 1,
    # d_head). Flattening the one example reads the heads in the model's order either way.
    q, k = mode.calls[0]
    return q[0].reshape(-1), k[0].reshape(-1)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon_gqa", "llama_bias"])
def test_qk_biases_are_split_like_the_models_own_forward(family: str) -> None:
    model, attention = _build(family)
    model.eval()
    (block,) = model_blocks(model)
    (proj,) = block.qk
    b_q, b_k = _model_biases(model, attention)
    got_q, got_k = proj.b_q(), proj.b_k()
    assert got_q is not None and got_k is not None
    torch.testing.assert_close(got_q, b_q, rtol=1e-6, atol=1e-6)
    if got_k.numel() != b_k.numel():  # Falcon hands SDPA its K/V heads already repeated per query head
        got_k = got_k.reshape(-1, D // H).repeat_interleave(b_k.numel() // got_k.numel(), 0).reshape(-1)
    torch.testing.assert_close(got_k, b_k, rtol=1e-6, atol=1e-6)


def test_qk_params_are_the_diagnostics_rows_and_refuse_copies() -> None:
    for family in ("gpt2", "llama_bias"):  # contiguous rows: views, writable in place
        model, _ = _build(family)
        (block,) = model_blocks(model)
        (proj,) = block.qk
        params = qk_params(block, proj)
        for got, want in ((params.w_q, proj.w_q()), (params.w_k, proj.w_k()), (params.b_q, proj.b_q())):
            assert got is not None and want is not None and torch.equal(got, want)
        with torch.no_grad():
            assert params.b_k is not None
            params.b_k.mul_(2.0)  # a view: the model's own bias changes
        assert torch.equal(params.b_k, proj.b_k())  # type: ignore[arg-type]
    model, _ = _build("gpt_neox")  # per-head [q_h|k_h|v_h]: no single view holds a head's q rows
    (block,) = model_blocks(model)
    with pytest.raises(ValueError, match="is a copy, not a view"):
        qk_params(block, block.qk[0])


def test_attention_module_uses_the_structure_rule() -> None:
    layer = nn.TransformerDecoderLayer(8, 2)
    name, _ = attention_module(layer)  # type: ignore[misc]
    assert name == "self_attn" and is_attention_name(name)
    assert not is_attention_name("linear1") and is_attention_name("MultiheadAttention")

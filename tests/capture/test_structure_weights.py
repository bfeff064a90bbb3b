"""Weights found inside blocks: fused QKV layouts, W_O, MoE experts, and what is missing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_stability import diagnostics as D
from lightning_stability.capture.structure import (
    MISSING_FFN,
    MISSING_QK,
    MISSING_WO,
    model_blocks,
    moe_kappa_eff,
    structure_notes,
    structure_warnings,
)

transformers = pytest.importorskip("transformers")


class _SDPAQK(TorchFunctionMode):
    """Records the q and k every ``F.scaled_dot_product_attention`` receives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **(kwargs or {}))


def _kappa_per_head(w_q_heads: list[torch.Tensor], w_k_heads: list[torch.Tensor]) -> torch.Tensor:
    """Independent reference: κ over the d_head leading singular values of the d×d W_Q^hᵀ W_K^h."""
    out = []
    for wq, wk in zip(w_q_heads, w_k_heads, strict=True):
        s = torch.linalg.svdvals(wq.T @ wk)
        out.append(s[0] / s[wq.shape[0] - 1])
    return torch.stack(out)


def _model_qk(
    model: nn.Module, attention: nn.Module, d: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per query head, ``W_Q^h`` and the ``W_K`` head it uses, read from the model's own forward.

    The attention module's input is replaced by the identity (token i = e_i), biases are
    zero and every position id is 0 (rotary = identity), so the q/k the model hands to SDPA
    are ``W_Q^h e_i`` and ``W_K^h e_i``: the weights, split by the model's own code.
    """
    for m in attention.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        basis = torch.eye(d, dtype=torch.float64).unsqueeze(0)
        if args:
            return (basis, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": basis}

    mode = _SDPAQK()
    handle = attention.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with mode, torch.no_grad():
            zeros = torch.zeros(1, d, dtype=torch.long)
            model(input_ids=zeros, position_ids=zeros)
    finally:
        handle.remove()
    q, k = mode.calls[0]  # the first layer's call: (1, H, d, d_head), (1, H_kv, d, d_head)
    heads, kv = q.shape[1], k.shape[1]
    return [q[0, h].T for h in range(heads)], [k[0, h // (heads // kv)].T for h in range(heads)]


def _family(name: str) -> tuple[nn.Module, Callable[[nn.Module], nn.Module]]:
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 60}
    if name == "gpt2":
        cfg: Any = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=60)
        model = transformers.GPT2Model._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m.h[0].attn
    if name == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(**common, intermediate_size=64)
        model = transformers.GPTNeoXModel._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m.layers[0].attention
    if name == "phi3":
        cfg = transformers.Phi3Config(**common, intermediate_size=64, num_key_value_heads=2, pad_token_id=0)
        model = transformers.Phi3Model._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m.layers[0].self_attn
    falcon = {
        "falcon_gqa": {"new_decoder_architecture": True, "num_kv_heads": 2},
        "falcon_mqa": {"multi_query": True},
        "falcon_mha": {"multi_query": False},
    }[name]
    cfg = transformers.FalconConfig(**common, **falcon)
    model = transformers.FalconModel._from_config(cfg, attn_implementation="sdpa")
    return model, lambda m: m.h[0].self_attention


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "falcon_gqa", "falcon_mqa", "falcon_mha"])
def test_fused_qkv_per_head_kappa_matches_the_models_own_split(family: str) -> None:
    model, attention_of = _family(family)
    model = model.double().eval()
    proj = model_blocks(model)[0].qk[0]
    w_q, w_k = proj.pair()
    got = D.kappa_wkwq(w_q, w_k, proj.n_heads or 4)
    expected = _kappa_per_head(*_model_qk(model, attention_of(model), 32))
    assert got.shape == expected.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("family", ["gpt_neox", "falcon_gqa"])
def test_contiguous_thirds_would_be_wrong_for_interleaved_layouts(family: str) -> None:
    model, attention_of = _family(family)
    model = model.double().eval()
    expected = _kappa_per_head(*_model_qk(model, attention_of(model), 32))
    fused = attention_of(model).query_key_value.weight.detach()
    q_rows = 32
    k_rows = (fused.shape[0] - q_rows) // 2
    w_k = fused[q_rows : q_rows + k_rows]
    w_k = w_k.reshape(-1, 8, 32).repeat_interleave(32 // k_rows, 0).reshape(32, 32)
    naive = D.kappa_wkwq(fused[:q_rows], w_k, 4)
    assert ((naive - expected).abs() / expected).max() > 0.05


def test_multihead_attention_in_proj_matches_torch_own_projection() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1).double()
    mha = model.layers[0].self_attn
    nn.init.zeros_(mha.in_proj_bias)
    proj = model_blocks(model)[0].qk[0]
    assert (proj.n_heads, proj.n_kv_heads) == (4, 4)
    x = torch.eye(16, dtype=torch.float64)
    q, k, _ = F._in_projection_packed(x, x, x, mha.in_proj_weight, mha.in_proj_bias)  # torch's own split
    q_heads = [q.view(16, 4, 4)[:, h].T for h in range(4)]
    k_heads = [k.view(16, 4, 4)[:, h].T for h in range(4)]
    torch.testing.assert_close(
        D.kappa_wkwq(*proj.pair(), 4), _kappa_per_head(q_heads, k_heads), rtol=1e-8, atol=0
    )


def test_gpt2_cross_attention_takes_q_from_q_attn_and_k_from_the_first_half_of_c_attn() -> None:
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=60, add_cross_attention=True)
    model = transformers.GPT2Model(cfg)
    qk = {p.name: p for p in model_blocks(model)[0].qk}
    cross = model.h[0].crossattention
    proj = qk["h.0.crossattention"]
    assert torch.equal(proj.w_q(), cross.q_attn.weight.t())
    assert torch.equal(proj.w_k(), cross.c_attn.weight.t()[:32])


# ----------------------------------------------------------------- W_O
def _distilbert() -> nn.Module:
    return transformers.DistilBertModel(
        transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    )


def _t5() -> nn.Module:
    return transformers.T5Model(
        transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=60
        )
    )


def _bart() -> nn.Module:
    return transformers.BartModel(
        transformers.BartConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=60,
        )
    )


def _whisper() -> nn.Module:
    return transformers.WhisperModel(
        transformers.WhisperConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=60,
            num_mel_bins=8,
            max_source_positions=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_distilbert, {"transformer.layer.0": ["transformer.layer.0.attention.out_lin"]}),
        (lambda: _family("gpt_neox")[0], {"layers.0": ["layers.0.attention.dense"]}),
        (lambda: _family("falcon_gqa")[0], {"h.0": ["h.0.self_attention.dense"]}),
        (
            _t5,
            {
                "encoder.block.0": ["encoder.block.0.layer.0.SelfAttention.o"],
                "decoder.block.0": [
                    "decoder.block.0.layer.0.SelfAttention.o",
                    "decoder.block.0.layer.1.EncDecAttention.o",
                ],
            },
        ),
        (
            _bart,
            {
                "encoder.layers.0": ["encoder.layers.0.self_attn.out_proj"],
                "decoder.layers.0": [
                    "decoder.layers.0.self_attn.out_proj",
                    "decoder.layers.0.encoder_attn.out_proj",
                ],
            },
        ),
        (
            _whisper,
            {
                "encoder.layers.0": ["encoder.layers.0.self_attn.out_proj"],
                "decoder.layers.0": [
                    "decoder.layers.0.self_attn.out_proj",
                    "decoder.layers.0.encoder_attn.out_proj",
                ],
            },
        ),
    ],
)
def test_wo_is_found_in_every_family(build, expected) -> None:  # type: ignore[no-untyped-def]
    model = build()
    blocks = {b.name: b for b in model_blocks(model)}
    for name, wo in expected.items():
        block = blocks[name]
        assert list(block.wo) == wo
        for full, fn in block.wo.items():
            assert fn() is model.get_submodule(full).weight
        assert block.missing == []
    assert structure_warnings(list(blocks.values())) == []


class _OddBlock(nn.Module):
    """Attention whose projections have unusual names: nothing must be invented."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.Module()
        self.attn.mix_in = nn.Linear(8, 24)
        self.attn.mix_out = nn.Linear(8, 8)


def test_missing_weights_are_listed_and_worded_once() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList(_OddBlock() for _ in range(2))
    blocks = model_blocks(model)
    assert [b.missing for b in blocks] == [[MISSING_WO, MISSING_QK, MISSING_FFN]] * 2
    assert structure_warnings(blocks) == [
        "layers.0, layers.1: no attention output projection W_O found: wo_norm/kappa_wo are not measured",
        "layers.0, layers.1: no query/key projections found: kappa_wkwq is not measured",
        "layers.0, layers.1: no FFN weights found: kappa_eff is not measured",
    ]


class _OddFused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(8, 20)  # neither 3 equal parts nor declared heads
        self.attn.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)


def test_fused_weight_of_unknown_layout_is_skipped_with_a_warning() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([_OddFused()])
    (block,) = model_blocks(model)
    assert block.qk == [] and block.missing == [MISSING_QK]
    assert (
        "layers.0.attn.qkv: fused QKV of 20 rows, layout unknown; kappa_wkwq skipped"
        in structure_warnings([block])
    )


# ----------------------------------------------------------------- MoE
def test_mixtral_experts_are_kept_apart_and_the_router_excluded() -> None:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        vocab_size=60,
    )
    model = transformers.MixtralModel(cfg)
    (block,) = model_blocks(model)
    experts = model.layers[0].mlp.experts
    assert block.ffn == {} and block.missing == []
    assert len(block.experts) == 3
    for e, weights in enumerate(block.experts):
        got = {name.rsplit(".", 1)[-1].split("[")[0]: fn() for name, fn in weights.items()}
        assert set(got) == {"gate", "up", "down_proj"}
        assert torch.equal(got["gate"], experts.gate_up_proj[e][:24])
        assert torch.equal(got["up"], experts.gate_up_proj[e][24:])
        assert torch.equal(got["down_proj"], experts.down_proj[e])
    assert not any("gate." in n or "router" in n for w in block.experts for n in w)
    assert structure_notes([block]) == [
        "layers.0.mlp: mixture of 3 experts; kappa_eff = dense FFN + max over experts of the expert's sum of "
        "kappa(W), router excluded"
    ]
    # the rule, against float64 condition numbers computed here
    kappas = [[D.condition_number(fn()) for fn in w.values()] for w in block.experts]
    ref = max(
        sum(float(torch.linalg.cond(m.detach().double())) for m in (g[:24], g[24:], dn))
        for g, dn in zip(experts.gate_up_proj, experts.down_proj, strict=True)
    )
    assert float(moe_kappa_eff([], kappas)) == pytest.approx(ref, rel=1e-6)


class _MoEWithShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.moe = nn.Module()
        self.moe.gate = nn.Linear(8, 4)
        self.moe.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(4))
        self.moe.shared_expert = nn.Linear(8, 8)


def test_module_list_experts_router_and_shared_expert() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList(_MoEWithShared() for _ in range(2))
    block = model_blocks(model)[1]
    assert list(block.ffn) == ["layers.1.moe.shared_expert"]
    assert [list(w) for w in block.experts] == [
        [f"layers.1.moe.experts.{e}.0", f"layers.1.moe.experts.{e}.1"] for e in range(4)
    ]


@pytest.mark.parametrize("family", ["gpt_neox", "falcon_gqa", "phi3"])
def test_probe_kappa_wkwq_is_the_max_of_the_models_own_per_head_values(family: str) -> None:
    from lightning_stability.capture import StabilityProbe, compose_report

    model, attention_of = _family(family)
    model = model.eval()
    probe = StabilityProbe(model)
    ids = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    raw = probe.measure((), {"input_ids": ids}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    report = compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)
    got = report.blocks[0].kappa_wkwq  # the probe as it is: float32 weights, heads from the call
    expected = _kappa_per_head(*_model_qk(model.double(), attention_of(model), 32)).max().item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_phi3_fused_gate_up_counts_as_gate_and_up() -> None:
    model, _ = _family("phi3")
    block = model_blocks(model)[0]
    mlp = model.layers[0].mlp
    assert list(block.ffn) == [
        "layers.0.mlp.gate_up_proj.gate",
        "layers.0.mlp.gate_up_proj.up",
        "layers.0.mlp.down_proj",
    ]
    gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, -1)
    assert torch.equal(block.ffn["layers.0.mlp.gate_up_proj.gate"](), gate)
    assert torch.equal(block.ffn["layers.0.mlp.gate_up_proj.up"](), up)


class _HeadsBlock(nn.Module):
    """nanoGPT-lecture style: per-head modules with a fused ``qkv`` under a name without "attn"."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.heads = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(16, 24)}) for _ in range(2))
        self.ffwd = nn.Linear(16, 16)


def test_a_fused_qkv_is_attention_whatever_its_parent_is_called() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList(_HeadsBlock() for _ in range(2))
    block = model_blocks(model)[0]
    assert [p.name for p in block.qk] == ["blocks.0.heads.0.qkv", "blocks.0.heads.1.qkv"]
    assert list(block.ffn) == ["blocks.0.ffwd"]  # the qkv weights are not counted in kappa_eff
    w = model.blocks[0].heads[0]["qkv"].weight
    assert torch.equal(block.qk[0].w_q(), w[:8]) and torch.equal(block.qk[0].w_k(), w[8:16])

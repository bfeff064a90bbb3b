"""Weights found inside blocks: fused QKV layouts and their biases, W_O, MoE experts, what is
missing, and the blocks' stacks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.capture.conftest import (
    SDPAQK,
    NanoGPT,
    bart_stacks,
    fused_family,
    kappa_per_head_ref,
    model_qk,
    probe_blocks,
)
from torch import nn

from lightning_stability import diagnostics as D
from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.capture.stacks import (
    is_attention_name,
)
from lightning_stability.capture.structure import (
    MISSING_FFN,
    MISSING_QK,
    MISSING_WO,
    model_blocks,
    moe_kappa_eff,
    structure_notes,
    structure_warnings,
    unattended_blocks,
)
from lightning_stability.mitigations import attention_module, qk_params

transformers = pytest.importorskip("transformers")

DIM, H = 32, 4


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


class _OddBlock(nn.Module):
    """Attention whose projections have unusual names: nothing must be invented."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.Module()
        self.attn.mix_in = nn.Linear(8, 24)
        self.attn.mix_out = nn.Linear(8, 8)


class _OddFused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(8, 20)  # neither 3 equal parts nor declared heads
        self.attn.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)


class _MoEWithShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.moe = nn.Module()
        self.moe.gate = nn.Linear(8, 4)
        self.moe.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(4))
        self.moe.shared_expert = nn.Linear(8, 8)


class _HeadsBlock(nn.Module):
    """nanoGPT-lecture style: per-head modules with a fused ``qkv`` under a name without "attn"."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.heads = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(16, 24)}) for _ in range(2))
        self.ffwd = nn.Linear(16, 16)


def _build(family: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    common = {"hidden_size": DIM, "num_attention_heads": H, "num_hidden_layers": 1, "vocab_size": 60}
    if family == "gpt2":
        cfg: Any = transformers.GPT2Config(n_embd=DIM, n_head=H, n_layer=1, vocab_size=60)
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
        zero = torch.zeros(1, 1, DIM)
        return ((zero, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": zero})

    mode = SDPAQK()
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


pytestmark = pytest.mark.filterwarnings("ignore:.*enable_nested_tensor")


class _MaybeAttention(nn.Module):
    def __init__(self, d: int, use_attention: bool) -> None:
        super().__init__()
        self.use_attention = use_attention
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm(x)).unsqueeze(1).chunk(3, -1)
        if self.use_attention:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # attention the capture cannot see: 3-D scores through einsum
            p = torch.einsum("bqd,bkd->bqk", q.squeeze(1), k.squeeze(1)).div(4).softmax(-1)
            y = torch.einsum("bqk,bkd->bqd", p, v.squeeze(1)).unsqueeze(1)
        return x + self.attn.proj(y.squeeze(1))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "falcon_gqa", "falcon_mqa", "falcon_mha"])
def test_fused_qkv_per_head_kappa_matches_the_models_own_split(family: str) -> None:
    model, attention_of = fused_family(family)
    model = model.double().eval()
    proj = model_blocks(model)[0].qk[0]
    w_q, w_k = proj.pair()
    got = D.kappa_wkwq(w_q, w_k, proj.n_heads or 4)
    expected = kappa_per_head_ref(*model_qk(model, attention_of(model), 32))
    assert got.shape == expected.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("family", ["gpt_neox", "falcon_gqa"])
def test_contiguous_thirds_would_be_wrong_for_interleaved_layouts(family: str) -> None:
    model, attention_of = fused_family(family)
    model = model.double().eval()
    expected = kappa_per_head_ref(*model_qk(model, attention_of(model), 32))
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
        D.kappa_wkwq(*proj.pair(), 4), kappa_per_head_ref(q_heads, k_heads), rtol=1e-8, atol=0
    )


def test_gpt2_cross_attention_takes_q_from_q_attn_and_k_from_the_first_half_of_c_attn() -> None:
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=60, add_cross_attention=True)
    model = transformers.GPT2Model(cfg)
    qk = {p.name: p for p in model_blocks(model)[0].qk}
    cross = model.h[0].crossattention
    proj = qk["h.0.crossattention"]
    assert torch.equal(proj.w_q(), cross.q_attn.weight.t())
    assert torch.equal(proj.w_k(), cross.c_attn.weight.t()[:32])


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_distilbert, {"transformer.layer.0": ["transformer.layer.0.attention.out_lin"]}),
        (lambda: fused_family("gpt_neox")[0], {"layers.0": ["layers.0.attention.dense"]}),
        (lambda: fused_family("falcon_gqa")[0], {"h.0": ["h.0.self_attention.dense"]}),
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


def test_fused_weight_of_unknown_layout_is_skipped_with_a_warning() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([_OddFused()])
    (block,) = model_blocks(model)
    assert block.qk == [] and block.missing == [MISSING_QK]
    assert (
        "layers.0.attn.qkv: fused QKV of 20 rows, layout unknown; kappa_wkwq skipped"
        in structure_warnings([block])
    )


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

    model, attention_of = fused_family(family)
    model = model.eval()
    probe = StabilityProbe(model)
    ids = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    raw = probe.measure((), {"input_ids": ids}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    report = compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)
    got = report.blocks[0].kappa_wkwq  # the probe as it is: float32 weights, heads from the call
    expected = kappa_per_head_ref(*model_qk(model.double(), attention_of(model), 32)).max().item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_phi3_fused_gate_up_counts_as_gate_and_up() -> None:
    model, _ = fused_family("phi3")
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


def test_a_fused_qkv_is_attention_whatever_its_parent_is_called() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList(_HeadsBlock() for _ in range(2))
    block = model_blocks(model)[0]
    assert [p.name for p in block.qk] == ["blocks.0.heads.0.qkv", "blocks.0.heads.1.qkv"]
    assert list(block.ffn) == ["blocks.0.ffwd"]  # the qkv weights are not counted in kappa_eff
    w = model.blocks[0].heads[0]["qkv"].weight
    assert torch.equal(block.qk[0].w_q(), w[:8]) and torch.equal(block.qk[0].w_k(), w[8:16])


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
        got_k = got_k.reshape(-1, DIM // H).repeat_interleave(b_k.numel() // got_k.numel(), 0).reshape(-1)
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


def test_pattern_blocks_are_described_with_their_parent_as_stack() -> None:
    model = NanoGPT()
    blocks = model_blocks(model, ["transformer.h.*"])
    assert [(b.index, b.name, b.stack) for b in blocks] == [
        (i, f"transformer.h.{i}", "transformer.h") for i in range(3)
    ]


def test_warning_for_a_block_that_never_sees_attention_while_its_siblings_do() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.Sequential(*[_MaybeAttention(16, use_attention=i != 1) for i in range(3)])
    model.forward = model.layers.forward  # type: ignore[method-assign]
    probe, _, report = probe_blocks(model, torch.randn(2, 5, 16))
    attended = {i for i, b in enumerate(report.blocks) if b.kappa_softmax is not None}
    assert attended == {0, 2}
    assert unattended_blocks(probe.blocks, attended) == [
        "block 1 (layers.1) never sees attention while 2 of 3 blocks of stack layers do"
    ]
    assert unattended_blocks(probe.blocks, {0, 1, 2}) == []
    assert (
        unattended_blocks(probe.blocks, set()) == []
    )  # none at all: the monitor's "no attention found" warning


def test_unattended_is_judged_per_stack() -> None:
    blocks = model_blocks(bart_stacks())
    # encoder saw attention, decoder saw none: each stack is uniform, so no sibling warning
    assert unattended_blocks(blocks, {0, 1}) == []
    assert unattended_blocks(blocks, {0, 1, 2, 4}) == [
        "block 3 (decoder.layers.1) never sees attention while 2 of 3 blocks of stack decoder.layers do"
    ]


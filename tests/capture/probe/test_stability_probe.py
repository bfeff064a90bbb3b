"""The two-pass probe end to end on real model families (hand-written, torch.nn, transformers):
complete reports, references that stay copies, the same random stream in both passes."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from tests.capture.conftest import Net, probe_input, run_probe, small, vit
from torch import nn

from lightning_stability import diagnostics as D
from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.capture.side_forward import fastpath_disabled
from lightning_stability.metrics import RawKey
from lightning_stability.stability_report import StabilityReport

transformers = pytest.importorskip("transformers")


def run_family(model: nn.Module, args=(), kwargs=None, dtype=torch.bfloat16, **probe_kw) -> StabilityReport:  # type: ignore[no-untyped-def]
    probe = StabilityProbe(model, **probe_kw)
    raw = probe.measure(tuple(args), dict(kwargs or {}), lambda: torch.autocast("cpu", dtype=dtype))
    keys, vec = raw.flat()
    values = dict(zip(keys, vec.tolist(), strict=True))
    report = compose_report(probe, raw, values, step=0)
    assert raw.attention_calls == len(probe.blocks)
    return report


def assert_complete(report: StabilityReport, n_blocks: int, wkwq: bool = True) -> None:
    assert len(report.blocks) == n_blocks
    assert report.dtype == "bfloat16"
    for block in report.blocks:
        names = [
            "kappa_score",
            "kappa_softmax",
            "kappa_v",
            "wo_norm",
            "kappa_eff",
            "c_ln",
            "rho_ln",
            "predictor",
            "r_block",
            "r_block_median",
            "r_block_mean_token",
            "r_local",
            "r_attention_local",
            "attn_logit_max",
            "amax",
            "attention_entropy",
        ]
        names += ["kappa_wkwq"] if wkwq else []
        for name in names:
            value = getattr(block, name)
            assert value is not None and math.isfinite(value), (block.name, name, value)
        assert block.kappa_score >= 1 - 1e-9 and block.kappa_v >= 1 - 1e-9
        assert 0 < block.r_block < 0.1
        assert 0 < block.r_local < 0.1 and 0 < block.r_attention_local < 0.1
    assert report.worst_block in [b.name for b in report.blocks]
    assert report.fp16_headroom is not None and report.fp16_headroom > 0 and report.amax_module is not None


def gpt2(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = small("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50)
    return transformers.GPT2Model._from_config(cfg, attn_implementation=impl).eval()


def llama(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = small(
        "LlamaConfig",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=32,
    )
    return transformers.LlamaModel._from_config(cfg, attn_implementation=impl).eval()


def bert(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = small(
        "BertConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=32,
    )
    return transformers.BertModel._from_config(cfg, attn_implementation=impl).eval()


IDS = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))


PAD = torch.ones(3, 10, dtype=torch.long)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)


class _NanoBlock(nn.Module):
    """nanoGPT-lecture style: heads in a ModuleList, blocks in an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.heads = nn.ModuleList(_Head() for _ in range(2))
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.proj(torch.cat([head(h) for head in self.heads], -1))


class _MoEBlock(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + sum(e(h) for e in self.experts) / len(self.experts)


class _RMSModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_MoEBlock(experts=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def run_probe_nocheck(model: nn.Module, args: tuple) -> StabilityReport:  # type: ignore[type-arg]
    probe = StabilityProbe(model)
    raw = probe.measure(args, {}, contextlib.nullcontext)
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)


@pytest.mark.parametrize("family", [gpt2, llama, bert])
@pytest.mark.parametrize("padding", [False, True])
def test_text_models_sdpa_and_eager_agree(family, padding) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"input_ids": IDS, "attention_mask": PAD if padding else None}
    reports = {impl: run_family(family(impl), kwargs=kwargs) for impl in ("sdpa", "eager")}
    for report in reports.values():
        assert_complete(report, 2)
    for a, b in zip(reports["sdpa"].blocks, reports["eager"].blocks, strict=True):
        # same weights, same inputs: the exact-FP32 diagnostics cannot depend on the kernel
        for name in ("kappa_score", "kappa_softmax", "kappa_v", "attention_entropy", "rho_ln", "kappa_eff"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-4), name


def test_vit_sdpa_and_eager_agree() -> None:
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = (run_family(vit(impl), kwargs={"pixel_values": pixels}) for impl in ("sdpa", "eager"))
    assert_complete(a, 2)
    assert a.blocks[0].kappa_softmax == pytest.approx(b.blocks[0].kappa_softmax, rel=1e-4)


def test_llama_gated_mlp_gqa_weights_against_float64() -> None:
    model = llama("sdpa")
    report = run_family(model, kwargs={"input_ids": IDS})
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        kappa = sum(
            D.condition_number(m.weight.double()).item() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )
        assert report.blocks[i].kappa_eff == pytest.approx(kappa, rel=1e-4)
        s = torch.linalg.svdvals(layer.self_attn.o_proj.weight.double())
        assert report.blocks[i].wo_norm == pytest.approx(s[0].item(), rel=1e-5)
        # K/V heads shared by 2 query heads: W_K repeated per query head
        w_q = layer.self_attn.q_proj.weight.double()
        w_k = layer.self_attn.k_proj.weight.double().reshape(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
        ref = max(
            (lambda s: (s[0] / s[7]).item())(
                torch.linalg.svdvals(w_q[h * 8 : (h + 1) * 8].T @ w_k[h * 8 : (h + 1) * 8])
            )
            for h in range(4)
        )
        assert report.blocks[i].kappa_wkwq == pytest.approx(ref, rel=1e-3)


def test_gpt2_conv1d_weights_against_float64() -> None:
    model = gpt2("sdpa")
    report = run_family(model, kwargs={"input_ids": IDS})
    for i, block in enumerate(model.h):
        kappa = sum(D.condition_number(m.weight.double()).item() for m in (block.mlp.c_fc, block.mlp.c_proj))
        assert report.blocks[i].kappa_eff == pytest.approx(kappa, rel=1e-4)
        assert report.blocks[i].wo_norm == pytest.approx(
            torch.linalg.svdvals(block.attn.c_proj.weight.double())[0].item(), rel=1e-5
        )


@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_transformer_encoder_seq_first(norm_first: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(7, 3, 32)  # (n, B, d)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    report = run_family(model, args=(x,), kwargs={"mask": causal, "src_key_padding_mask": pad})
    assert_complete(report, 2)
    # the mismatch is the one a plain bf16-autocast forward shows at the block outputs
    with torch.no_grad(), fastpath_disabled():
        ref = model.layers[0](x, src_mask=causal, src_key_padding_mask=pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = model.layers[0](x, src_mask=causal, src_key_padding_mask=pad)
    expected = ((lp.double() - ref.double()).norm() / ref.double().norm()).item()
    assert report.blocks[0].r_block == pytest.approx(expected, rel=1e-4)


def test_block_patterns_override_detection() -> None:
    model = gpt2("sdpa")
    probe = StabilityProbe(model, blocks=["h.1"])
    assert [b.name for b in probe.blocks] == ["h.1"]


def test_block_detection_prefers_layers_with_norms_over_heads_and_experts() -> None:
    from lightning_stability.capture import find_blocks

    nano = nn.Sequential(nn.Linear(16, 16), nn.Sequential(*[_NanoBlock() for _ in range(2)]))
    assert [n for n, _ in find_blocks(nano)] == ["1.0", "1.1"]
    moe = nn.Module()
    moe.layers = nn.ModuleList(_MoEBlock(experts=8) for _ in range(2))
    assert [n for n, _ in find_blocks(moe)] == ["layers.0", "layers.1"]


def test_rmsnorm_eps_none_uses_the_training_dtype_eps() -> None:
    torch.manual_seed(0)
    model = _RMSModel().to(torch.bfloat16)  # bf16-true: nn.RMSNorm(eps=None) uses finfo(bf16).eps
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    report = run_probe_nocheck(model, (x,))
    with torch.no_grad():
        var = x.double().square().mean(-1).median().item()  # RMS layer: mean square of block 0's input
    expected = var / torch.finfo(torch.bfloat16).eps * 16 * 2.0**-7
    assert report.blocks[0].rho_ln == pytest.approx(expected, rel=1e-2)  # bf16 input rounding


def test_residual_gain_power_iteration_is_not_recorded_as_attention_calls() -> None:
    model = gpt2("sdpa")
    probe = StabilityProbe(model, residual_gain_iters=3)
    raw = probe.measure((), {"input_ids": IDS}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert raw.attention_calls == 2  # one per layer, none from the JVP/VJP block calls
    assert {RawKey("residual_gain", i) for i in (0, 1)} <= set(raw.values)  # reduced across ranks too


def test_reference_is_a_copy_when_the_model_scales_the_stream_in_place() -> None:
    torch.manual_seed(0)
    model = Net(in_place=True)
    report = run_probe(model, probe_input())
    plain = Net()
    plain.load_state_dict(model.state_dict())
    expected = run_probe(plain, probe_input())  # the same arithmetic without the in-place scaling
    for got in report.blocks:
        assert got.r_block is not None and 5e-4 < got.r_block < 2e-2, got.r_block  # not ≈ 1
        assert got.r_local is not None and got.r_local < 2e-2
    # block 0 sees the very same inputs in both models; later blocks see a halved stream
    assert report.blocks[0].r_block == pytest.approx(expected.blocks[0].r_block, rel=1e-12)
    assert report.blocks[0].r_local == pytest.approx(expected.blocks[0].r_local, rel=1e-12)


@pytest.mark.parametrize("kw", [{"sdpa_dropout": 0.2}, {"weights_dropout": 0.2}], ids=["sdpa", "F.dropout"])
def test_dropout_inside_attention_gets_the_same_stream_in_both_passes(kw: dict[str, float]) -> None:
    torch.manual_seed(0)
    model = Net(**kw)
    rng = torch.get_rng_state()
    report = run_probe(model, probe_input())
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's stream is untouched
    torch.manual_seed(0)
    calm = Net()  # the same weights, no dropout: the error scale to expect
    calm.load_state_dict(model.state_dict())
    baseline = run_probe(calm, probe_input())
    for got, ref in zip(report.blocks, baseline.blocks, strict=True):
        assert got.r_block is not None and got.r_block < 3 * ref.r_block + 1e-3, (got.r_block, ref.r_block)
        assert got.r_local is not None and got.r_local < 3 * ref.r_local + 1e-3, (got.r_local, ref.r_local)
    # the same probe twice: the same masks, the same numbers
    again = run_probe(model, probe_input())
    assert [b.r_block for b in again.blocks] == [b.r_block for b in report.blocks]


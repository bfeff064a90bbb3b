"""The probe's weight diagnostics from the structure found: W_O (or its absence), MoE κ_eff, κ(W_Kᵀ W_Q)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.capture.test_structure_weights import _family, _kappa_per_head, _model_qk
from torch import nn

from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.capture.probe import predictor_warnings
from lightning_stability.capture.structure import MISSING_WO, structure_warnings
from lightning_stability.stability_report import StabilityReport

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def measure(
    model: nn.Module, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> StabilityReport:
    probe = StabilityProbe(model)
    raw = probe.measure(args, dict(kwargs or {}), lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)


def cond64(w: torch.Tensor) -> float:
    s = torch.linalg.svdvals(w.detach().double())
    return (s[0] / s[-1]).item()


# ------------------------------------------------------------------------------ W_O
def test_distilbert_out_lin_is_w_o_and_enters_the_predictor() -> None:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(dim=32, n_heads=4, n_layers=2, hidden_dim=64, vocab_size=60)
    model = transformers.DistilBertModel._from_config(cfg, attn_implementation="sdpa").eval()
    report = measure(model, kwargs={"input_ids": IDS})
    for i, layer in enumerate(model.transformer.layer):
        b = report.blocks[i]
        wo = torch.linalg.svdvals(layer.attention.out_lin.weight.double())[0].item()
        assert b.wo_norm == pytest.approx(wo, rel=1e-5)
        assert b.kappa_eff == pytest.approx(
            cond64(layer.ffn.lin1.weight) + cond64(layer.ffn.lin2.weight), rel=1e-4
        )
        assert b.kappa_softmax is not None and b.kappa_score is not None and b.kappa_v is not None
        attention = b.kappa_softmax * (1 + b.kappa_score) * b.kappa_v * wo  # SPEC §4, float64 ‖W_O‖₂
        assert b.predictor == pytest.approx(attention + b.kappa_eff + b.c_ln, rel=1e-5)
    assert predictor_warnings(StabilityProbe(model).blocks) == []


class _UnnamedOutAttention(nn.Module):
    """Multi-head attention whose output projection has a name no family uses (``mixer``)."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.mixer = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.mixer(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _NoWoBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _UnnamedOutAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NoWoModel(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_NoWoBlock() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_missing_w_o_leaves_the_attention_term_out_instead_of_assuming_one() -> None:
    torch.manual_seed(0)
    model = NoWoModel()
    probe = StabilityProbe(model)
    assert all(MISSING_WO in b.missing for b in probe.blocks)
    report = measure(model, (torch.randn(2, 5, 16),))
    for i, b in enumerate(report.blocks):
        assert b.wo_norm is None
        # the attention term's factors are measured; only W_O is unknown
        assert b.kappa_softmax is not None and b.kappa_score is not None and b.kappa_v is not None
        mlp = model.layers[i].mlp
        assert b.kappa_eff == pytest.approx(cond64(mlp[0].weight) + cond64(mlp[2].weight), rel=1e-4)
        assert b.predictor == b.kappa_eff + b.c_ln  # no κ_softmax(1+κ_score)κ_V·1 added
        with_one = b.kappa_softmax * (1 + b.kappa_score) * b.kappa_v
        assert b.predictor < b.kappa_eff + b.c_ln + with_one  # what ‖W_O‖ = 1 would have given
    (line,) = predictor_warnings(probe.blocks)
    assert line.startswith(
        "layers.0, layers.1: no W_O found, so the combined predictor of these blocks leaves out"
    )
    assert "not computed with ||W_O|| = 1" in line
    assert any("no attention output projection W_O found" in w for w in structure_warnings(probe.blocks))


# ------------------------------------------------------------------------------ MoE
def test_mixtral_kappa_eff_is_the_moe_rule_against_float64() -> None:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        vocab_size=60,
    )
    model = transformers.MixtralModel._from_config(cfg, attn_implementation="sdpa").eval()
    report = measure(model, kwargs={"input_ids": IDS})
    for i, layer in enumerate(model.layers):
        experts = layer.mlp.experts
        # per expert: gate and up halves of gate_up_proj (the forward's chunk(2)) and down_proj
        per_expert = [
            cond64(gu[:24]) + cond64(gu[24:]) + cond64(dn)
            for gu, dn in zip(experts.gate_up_proj, experts.down_proj, strict=True)
        ]
        assert report.blocks[i].kappa_eff == pytest.approx(max(per_expert), rel=1e-4)
        assert report.blocks[i].kappa_eff < sum(per_expert)  # not every expert summed


def test_dense_ffn_beside_experts_is_added_to_the_worst_expert() -> None:
    """A shared (dense) expert plus routed experts in a ModuleList: Σ κ(dense) + max_e Σ κ(expert e)."""

    class Moe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(16, 3)
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)) for _ in range(3)
            )
            self.shared_expert = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            top = self.gate(x).argmax(-1, keepdim=True)
            routed = torch.stack([e(x) for e in self.experts], -1)
            return self.shared_expert(x) + routed.gather(-1, top.unsqueeze(-1).expand(*x.shape, 1)).squeeze(
                -1
            )

    class MoeBlock(_NoWoBlock):
        def __init__(self) -> None:
            super().__init__()
            self.attn.out_proj = self.attn.mixer  # W_O found this time
            self.mlp = Moe()  # type: ignore[assignment]

    torch.manual_seed(0)
    model = NoWoModel()
    model.layers = nn.ModuleList(MoeBlock() for _ in range(2))
    report = measure(model, (torch.randn(2, 5, 16),))
    for i, layer in enumerate(model.layers):
        moe = layer.mlp
        worst = max(cond64(e[0].weight) + cond64(e[1].weight) for e in moe.experts)
        assert report.blocks[i].kappa_eff == pytest.approx(cond64(moe.shared_expert.weight) + worst, rel=1e-4)


# ------------------------------------------------------------------------ κ(W_Kᵀ W_Q)
def _llama() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=60,
    )
    model = transformers.LlamaModel._from_config(cfg, attn_implementation="sdpa")
    return model, lambda m: m.layers[0].self_attn


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "falcon_gqa", "falcon_mqa", "phi3"])
def test_kappa_wkwq_from_qkprojection_pair_against_float64_per_head(family: str) -> None:
    model, attention_of = _llama() if family == "llama_gqa" else _family(family)
    model = model.eval()
    got = measure(model, kwargs={"input_ids": IDS}).blocks[0].kappa_wkwq
    # independent: per query head, W_Q^h and the W_K head it uses, read off the model's own forward
    expected = _kappa_per_head(*_model_qk(model.double(), attention_of(model), 32))
    assert got == pytest.approx(expected.max().item(), rel=1e-4)

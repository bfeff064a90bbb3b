"""Weight spectra: ‖W_O‖₂, κ_eff (MoE rule), κ(W_Kᵀ W_Q) against float64, reused only while a
weight is bitwise unchanged, within the batch budget."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from tests.capture.conftest import (
    Net,
    NoWoBlock,
    NoWoModel,
    cond64,
    fused_family,
    kappa_per_head_ref,
    measure_model,
    measure_with,
    model_qk,
    probe_input,
    weights,
)
from torch import nn

from lightning_stability.capture import StabilityProbe
from lightning_stability.capture.probe import predictor_warnings
from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.probe.spectra import weight_statistics


def fresh(model: nn.Module, x: torch.Tensor) -> list[tuple[float | None, ...]]:
    """The weight metrics recomputed from scratch (a probe that never reuses)."""
    return weights(measure_with(StabilityProbe(model), x))


class _LargestFloat64(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the largest float64 tensor any op creates under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel() * 8)
        return out


transformers = pytest.importorskip("transformers")


IDS = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))


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


def test_reuse_is_off_by_default_and_keeps_nothing() -> None:
    torch.manual_seed(0)
    probe = StabilityProbe(Net(depth=2))
    measure_with(probe, probe_input())
    measure_with(probe, probe_input())
    assert probe.spectra.hits == 0 and probe.spectra.misses > 0 and not probe.spectra._kept


def test_unchanged_weights_are_reused_with_the_same_numbers() -> None:
    torch.manual_seed(0)
    model = Net(depth=2)
    probe = StabilityProbe(model, reuse_weight_spectra=True)
    first = weights(measure_with(probe, probe_input()))
    misses = probe.spectra.misses
    assert probe.spectra.hits == 0 and misses == 2 * 4  # per block: W_O, fc1, fc2, the Q/K pair
    # another batch: the weights' numbers do not change
    second = weights(measure_with(probe, probe_input(seed=1)))
    assert probe.spectra.hits == misses and probe.spectra.misses == misses
    assert second == first == fresh(model, probe_input())
    assert all(v is not None and math.isfinite(v) for row in first for v in row)


def test_a_write_through_data_is_seen_although_the_version_counter_is_not_bumped() -> None:
    torch.manual_seed(0)
    model = Net(depth=2)
    probe = StabilityProbe(model, reuse_weight_spectra=True)
    before = weights(measure_with(probe, probe_input()))
    fc1 = model.blocks[1].mlp[0].weight
    version = fc1._version
    with torch.no_grad():
        fc1.data.add_(torch.randn(fc1.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    assert fc1._version == version  # a version-counter key would have reused the stale spectrum
    after = weights(measure_with(probe, probe_input()))
    assert probe.spectra.hits == 2 * 4 - 1  # everything but fc1 of block 1
    assert after == fresh(model, probe_input())
    assert after[0] == before[0] and after[1][1] != before[1][1]  # only block 1's kappa_eff moved


def test_an_optimizer_step_recomputes_every_trained_weight() -> None:
    torch.manual_seed(0)
    model = Net(depth=2)
    for p in model.blocks[0].parameters():  # block 0 frozen: its spectra stay reusable
        p.requires_grad_(False)
    probe = StabilityProbe(model, reuse_weight_spectra=True)
    measure_with(probe, probe_input())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(probe_input()).square().mean().backward()
    opt.step()
    hits = probe.spectra.hits
    after = weights(measure_with(probe, probe_input()))
    assert probe.spectra.hits - hits == 4  # block 0's four; block 1's were all recomputed
    assert after == fresh(model, probe_input())


def test_weight_spectra_copies_stay_within_the_batch_budget(monkeypatch: Any) -> None:
    """A large model's weights are not stacked into one float64 copy: with a budget of two
    weights, no float64 tensor of the weight work is larger, and every value is unchanged
    (also when reusing kept spectra across measurements)."""
    from lightning_stability.capture.probe import spectra as spectra_module
    from lightning_stability.diagnostics import linear

    torch.manual_seed(0)
    model = Net(depth=6, d=32)
    x = probe_input()
    heads = {b: 4 for b in range(6)}
    expected = weights(measure_with(StabilityProbe(model), x))  # default budget: each shape in one call
    weight_bytes = 32 * 32 * 8
    with _LargestFloat64() as whole:
        probe = StabilityProbe(model)
        weight_statistics(probe.blocks, heads, probe.spectra, RawMeasurement())
    assert whole.largest >= 6 * weight_bytes  # the test can fail: one stack of six weights

    budget = 2 * weight_bytes
    monkeypatch.setattr(linear, "BATCH_BYTES", budget)
    monkeypatch.setattr(spectra_module, "BATCH_BYTES", budget)
    with _LargestFloat64() as bounded:
        probe = StabilityProbe(model)
        weight_statistics(probe.blocks, heads, probe.spectra, RawMeasurement())
    assert 0 < bounded.largest <= budget
    assert weights(measure_with(StabilityProbe(model), x)) == expected
    reusing = StabilityProbe(model, reuse_weight_spectra=True)
    assert weights(measure_with(reusing, x)) == weights(measure_with(reusing, x)) == expected
    assert reusing.spectra.hits == reusing.spectra.misses > 0  # the second measurement reused all


def test_distilbert_out_lin_is_w_o_and_enters_the_predictor() -> None:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(dim=32, n_heads=4, n_layers=2, hidden_dim=64, vocab_size=60)
    model = transformers.DistilBertModel._from_config(cfg, attn_implementation="sdpa").eval()
    report = measure_model(model, kwargs={"input_ids": IDS})
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
    report = measure_model(model, kwargs={"input_ids": IDS})
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

    class MoeBlock(NoWoBlock):
        def __init__(self) -> None:
            super().__init__()
            self.attn.out_proj = self.attn.mixer  # W_O found this time
            self.mlp = Moe()  # type: ignore[assignment]

    torch.manual_seed(0)
    model = NoWoModel()
    model.layers = nn.ModuleList(MoeBlock() for _ in range(2))
    report = measure_model(model, (torch.randn(2, 5, 16),))
    for i, layer in enumerate(model.layers):
        moe = layer.mlp
        worst = max(cond64(e[0].weight) + cond64(e[1].weight) for e in moe.experts)
        assert report.blocks[i].kappa_eff == pytest.approx(cond64(moe.shared_expert.weight) + worst, rel=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "falcon_gqa", "falcon_mqa", "phi3"])
def test_kappa_wkwq_from_qkprojection_pair_against_float64_per_head(family: str) -> None:
    model, attention_of = _llama() if family == "llama_gqa" else fused_family(family)
    model = model.eval()
    got = measure_model(model, kwargs={"input_ids": IDS}).blocks[0].kappa_wkwq
    # independent: per query head, W_Q^h and the W_K head it uses, read off the model's own forward
    expected = kappa_per_head_ref(*model_qk(model.double(), attention_of(model), 32))
    assert got == pytest.approx(expected.max().item(), rel=1e-4)


def _with_spectrum(s: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """An ``(m, len(s))`` float64 matrix ``U diag(s) Vᵀ`` with random orthonormal ``U``, ``V``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, s.shape[0], generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(s.shape[0], s.shape[0], generator=g, dtype=torch.float64)).Q
    return (u * s) @ v.mT


@pytest.fixture
def iterative(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small weights on the iterative routes (LU for square, Krylov σmax, mixed σmin)."""
    from lightning_stability.diagnostics import extremal

    for name in ("SQUARE_MIN_N", "KRYLOV_MIN_N", "MIXED_MIN_N"):
        monkeypatch.setattr(extremal, name, 16)


def test_certified_singular_values_are_within_the_tolerance_of_float64(iterative: None) -> None:
    """``singular_values`` (the certified default) against float64 ``svdvals`` on random and
    trained-like ill-conditioned weights (square Gaussian, a power law with a few tiny values,
    κ = 1e4 log-spaced, wide and tall, float32 and bfloat16): each σ within RTOL relative, κ
    within 2·RTOL; the exact option within 1e-9; a non-finite weight ``[inf, 0]`` in both."""
    from lightning_stability.capture.probe.spectra import WeightSpectra, singular_values
    from lightning_stability.diagnostics.extremal import RTOL

    g = torch.Generator().manual_seed(3)
    power = torch.arange(1, 97, dtype=torch.float64) ** -0.6
    power[-3:] *= 1e-3
    mats = [
        torch.randn(96, 96, generator=g) * 0.02,
        _with_spectrum(power, 96, seed=4).float(),
        _with_spectrum(torch.logspace(0, -4, 64, dtype=torch.float64), 160, seed=5).mT.contiguous(),
        (torch.randn(160, 64, generator=g) * 0.02).bfloat16(),
        _with_spectrum(torch.logspace(0, -2, 96, dtype=torch.float64), 96, seed=6),
    ]
    bad = torch.randn(40, 24, generator=g)
    bad[3, 5] = math.nan
    for exact, tol in ((False, RTOL), (True, 1e-9)):
        got = singular_values([*mats, bad], WeightSpectra(exact=exact))
        for w, s in zip(mats, got, strict=False):
            ref = torch.linalg.svdvals(w.double())
            assert s.dtype == torch.float64
            assert (s[0] - ref[0]).abs() <= tol * ref[0], (exact, s, ref[[0, -1]])
            assert (s[1] - ref[-1]).abs() <= tol * ref[-1], (exact, s, ref[[0, -1]])
            kappa = s[0] / s[1]
            assert (kappa - ref[0] / ref[-1]).abs() <= 2.01 * tol * ref[0] / ref[-1]
        assert got[-1].tolist() == [math.inf, 0.0]


def test_probe_certified_and_exact_weight_terms_agree_on_a_llama(iterative: None) -> None:
    """The probe's weight terms with the default (certified) spectra and with
    ``weight_spectra="exact"`` on a transformers Llama built from a config, its W_O made
    ill-conditioned as trained ones are: within 2e-5 relative, both of float64 references."""
    model, _ = _llama()
    with torch.no_grad():
        wo = model.layers[1].self_attn.o_proj.weight
        power = torch.arange(1, 33, dtype=torch.float64) ** -0.8
        power[-1] *= 1e-3
        wo.copy_(_with_spectrum(power, 32, seed=7).float())
    certified = weights(measure_with(StabilityProbe(model), IDS))
    exact = weights(measure_with(StabilityProbe(model, weight_spectra="exact"), IDS))
    for row_c, row_e, layer in zip(certified, exact, model.layers, strict=True):
        for name, c, e in zip(("wo_norm", "kappa_eff", "kappa_wkwq"), row_c, row_e, strict=True):
            assert c is not None and e is not None
            assert abs(c - e) <= 2e-5 * e, (name, c, e)
        o = layer.self_attn.o_proj.weight
        assert abs(row_c[0] - torch.linalg.svdvals(o.double())[0].item()) <= 1e-5 * row_c[0]
        mlp = layer.mlp
        ref_eff = sum(cond64(p.weight) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        assert abs(row_c[1] - ref_eff) <= 2e-5 * ref_eff
        assert abs(row_e[1] - ref_eff) <= 1e-9 * ref_eff

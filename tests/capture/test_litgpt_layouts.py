"""litgpt's models read as litgpt's forward reads them: blocks, fused ``[q | k | v]`` with
``n_query_groups`` key/value heads, the per-group layout of its older ``attn`` weight, and
Gemma-2's soft-capped attention logits; every value against a float64 recomputation from
the model's own queries and keys."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stability import diagnostics as D
from lightning_stability.capture import (
    AttentionCall,
    AttentionCapture,
    StabilityProbe,
    call_diagnostics,
    call_probabilities,
    compose_report,
    find_norms,
    model_blocks,
    structure_warnings,
    unattended_blocks,
)
from lightning_stability.capture.probe.spectra import WeightSpectra, wkwq_conditions

litgpt_config = pytest.importorskip("litgpt.config")
litgpt_model = pytest.importorskip("litgpt.model")

F64 = torch.float64

#: name -> (litgpt config, query heads per key/value head): MHA, GQA and MQA families
FAMILIES = {
    "pythia-14m": 1,  # GPT-NeoX: LayerNorm, parallel residual
    "Llama-3.2-1B": 2,  # GQA, RoPE, RMSNorm, gated MLP
    "gemma-2-2b": 2,  # GQA, soft-capped logits, sliding window every other layer
    "Mistral-7B-v0.1": 2,  # GQA, sliding window
    "Qwen2.5-0.5B": 2,  # GQA with a QKV bias
    "phi-2": 1,  # partial rotary, LayerNorm
    "Phi-3-mini-4k-instruct": 1,
    "falcon-7b": 4,  # multi-query: one key/value head
}
N_HEAD, HEAD_SIZE, N_EMBD = 4, 8, 32


def build(name: str, **overrides: Any) -> nn.Module:
    """litgpt's ``GPT`` for config ``name``, scaled down (random init, no weights)."""
    base = litgpt_config.Config.from_name(name)
    kw: dict[str, Any] = dict(
        n_layer=2, n_embd=N_EMBD, n_head=N_HEAD, head_size=HEAD_SIZE, intermediate_size=64,
        padded_vocab_size=64, vocab_size=64, block_size=32, n_query_groups=N_HEAD // FAMILIES[name],
    )
    if base.sliding_window_size is not None:
        kw["sliding_window_size"] = 4
    kw.update(overrides)
    torch.manual_seed(0)
    return litgpt_model.GPT(litgpt_config.Config.from_name(name, **kw)).eval()


def own_qk(attn: nn.Module) -> tuple[Tensor, Tensor]:
    """``W_Q^h`` and the key weight query head ``h`` attends with, ``(H, hs, C)`` float64 each,
    read from litgpt's own forward: the queries and keys it hands to its attention kernel (keys
    already repeated to their query heads) for the inputs ``e_1 … e_C`` minus those for 0, with
    the rotary embedding at angle 0."""
    cfg = attn.config
    seen: list[tuple[Tensor, Tensor]] = []

    def kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        seen.append((q.detach(), k.detach()))
        return torch.zeros_like(q).transpose(1, 2)

    attn.scaled_dot_product_attention = kernel  # the instance attribute shadows the method
    try:
        c = cfg.n_embd
        cos = torch.ones(1, c, cfg.rope_n_elem, dtype=F64)
        sin = torch.zeros(1, c, cfg.rope_n_elem, dtype=F64)
        with torch.no_grad():
            attn(torch.eye(c, dtype=F64)[None], cos, sin)
            attn(torch.zeros(1, c, c, dtype=F64), cos, sin)
    finally:
        del attn.scaled_dot_product_attention
    (q, k), (q0, k0) = seen
    return (q - q0)[0].mT, (k - k0)[0].mT  # (H, hs, C): row j of head h = W^h e_j … transposed


def kappa_per_head(w_q: Tensor, w_k: Tensor) -> Tensor:
    """κ of ``W_Q^hᵀ W_K^h`` over its ``hs`` leading singular values, per head (float64)."""
    out = []
    for qh, kh in zip(w_q, w_k, strict=True):
        s = torch.linalg.svdvals(qh.mT @ kh)[: qh.shape[0]]
        out.append((s[0] / s[-1]).item())
    return torch.tensor(out, dtype=F64)


def measure(model: nn.Module, idx: Tensor) -> tuple[StabilityProbe, Any]:
    probe = StabilityProbe(model)
    raw = probe.measure((idx,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    return probe, (raw, compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_blocks_weights_and_norms_are_found(name: str) -> None:
    model = build(name)
    cfg = model.config
    blocks = model_blocks(model)
    assert [b.name for b in blocks] == ["transformer.h.0", "transformer.h.1"]
    for b in blocks:
        assert b.missing == [] and b.warnings == [] and b.notes == []
        assert list(b.wo) == [f"{b.name}.attn.proj"]
        (proj,) = b.qk
        assert (proj.name, proj.layout) == (f"{b.name}.attn.qkv", "contiguous [Q|K|V]")
        assert (proj.n_heads, proj.n_kv_heads) == (cfg.n_head, cfg.n_query_groups)
        assert all(n.startswith(f"{b.name}.mlp.") for n in b.ffn)
        assert len(b.ffn) == (3 if cfg.mlp_class_name in ("LLaMAMLP", "GemmaMLP") else 2)
    assert structure_warnings(blocks) == []
    norms = find_norms(model)
    per_block = 4 if name == "gemma-2-2b" else (1 if cfg.shared_attention_norm else 2)
    assert len(norms) == 2 * per_block + 1  # + the final norm
    rms = cfg.norm_class_name == "RMSNorm"
    assert all(n.rms == rms and n.eps_attr == "eps" for n in norms)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_block_is_measured(name: str) -> None:
    model = build(name)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    probe, (raw, report) = measure(model, idx)
    assert raw.attention_calls == 2
    assert unattended_blocks(probe.blocks, [0, 1]) == []
    for block in report.blocks:
        for metric in ("kappa_score", "kappa_softmax", "kappa_v", "attn_logit_max", "kappa_wkwq",
                       "wo_norm", "kappa_eff", "c_ln", "r_block", "r_local", "r_attention_local"):
            value = getattr(block, metric)
            assert value is not None and math.isfinite(value), (metric, value)


@pytest.mark.parametrize("name", ["pythia-14m", "Llama-3.2-1B", "gemma-2-2b", "Qwen2.5-0.5B", "falcon-7b"])
def test_kappa_wkwq_pairs_each_query_head_with_its_groups_key(name: str) -> None:
    model = build(name).double()
    w_q, w_k = own_qk(model.transformer.h[0].attn)
    expected = kappa_per_head(w_q, w_k)
    blocks = model_blocks(model)
    got = wkwq_conditions(blocks, {0: N_HEAD, 1: N_HEAD}, WeightSpectra())[0][0]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)
    per = FAMILIES[name]
    for h in range(N_HEAD):  # query head h attends with key group h // per
        assert torch.equal(w_k[h], w_k[h - h % per])
    if 1 < per < N_HEAD:  # pairing head h with group h % groups (tiling, not grouping) differs
        tiled = w_k[:: per].repeat(per, 1, 1)
        assert not torch.allclose(kappa_per_head(w_q, tiled), expected, rtol=1e-3)
    # the probe logs the maximum over heads of the same numbers (float32 model)
    _, (_, report) = measure(build(name), torch.randint(0, 64, (1, 8)))
    assert report.blocks[0].kappa_wkwq == pytest.approx(expected.max().item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# litgpt's older fused weight: ``attn.attn`` laid out per key/value group as [q … q | k | v]
# ----------------------------------------------------------------------------------------------
@dataclass
class LegacyConfig:
    n_embd: int = N_EMBD
    n_head: int = N_HEAD
    n_query_groups: int = 2
    head_size: int = HEAD_SIZE


class LegacyAttention(nn.Module):
    """The attention of litgpt releases before ``qkv``: one Linear ``attn`` whose output is viewed
    as ``(n_query_groups, q_per_kv + 2, head_size)`` per token."""

    def __init__(self, config: LegacyConfig) -> None:
        super().__init__()
        self.config = config
        groups, hs = config.n_query_groups, config.head_size
        self.attn = nn.Linear(config.n_embd, (config.n_head + 2 * groups) * hs)
        self.proj = nn.Linear(config.n_head * hs, config.n_embd)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        cfg = self.config
        per = cfg.n_head // cfg.n_query_groups
        qkv = self.attn(x).view(b, t, cfg.n_query_groups, per + 2, cfg.head_size).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((per, 1, 1), dim=2)
        shape = (b, cfg.n_query_groups, per, t, cfg.head_size)
        return tuple(z.expand(shape).reshape(b, cfg.n_head, t, cfg.head_size) for z in (q, k, v))  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class LegacyBlock(nn.Module):
    def __init__(self, config: LegacyConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd)
        self.attn = LegacyAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 64), nn.GELU(), nn.Linear(64, config.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_older_per_group_layout_is_split_as_its_forward_splits_it(groups: int) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(*(LegacyBlock(LegacyConfig(n_query_groups=groups)) for _ in range(2))).double()
    (block, _) = model_blocks(model)
    (proj,) = block.qk
    assert (proj.name, proj.layout) == ("0.attn.attn", "per K/V group [q..q|k|v]")
    assert (proj.n_heads, proj.n_kv_heads) == (4, groups)
    attn = model[0].attn
    with torch.no_grad():
        q, k, _ = attn.heads(torch.eye(N_EMBD, dtype=F64)[None])
        q0, k0, _ = attn.heads(torch.zeros(1, N_EMBD, N_EMBD, dtype=F64))
    expected = kappa_per_head((q - q0)[0].mT, (k - k0)[0].mT)
    torch.testing.assert_close(D.kappa_wkwq(*proj.pair(), 4), expected, rtol=1e-8, atol=0)
    # the query and key biases come out of the same rows
    b_q, b_k = proj.b_q(), proj.b_k()
    assert b_q is not None and b_k is not None
    torch.testing.assert_close(b_q, q0[0, :, 0].reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(b_k.reshape(groups, -1), k0[0, :: 4 // groups, 0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Gemma-2: logits soft-capped as the model computes them
# ----------------------------------------------------------------------------------------------
def run_captured(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, list[AttentionCall]]:
    calls: list[AttentionCall] = []
    with torch.no_grad(), AttentionCapture(model, calls.append):
        out = fn()
    return out, calls


def test_gemma2_soft_capped_scores_reproduce_litgpt_attention() -> None:
    cap = 0.5
    model = build("gemma-2-2b", attention_logit_softcapping=cap)
    with torch.no_grad():  # logits of order 1–10 so that the cap bites
        for block in model.transformer.h:
            block.attn.qkv.weight[: 2 * N_EMBD].mul_(20)
    seen: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for block in model.transformer.h:
        attn = block.attn
        original = attn.scaled_dot_product_attention

        def kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, run: Any = original) -> Any:
            y = run(q, k, v, mask)
            seen.append((q.detach(), k.detach(), v.detach(), y.detach()))
            return y

        attn.scaled_dot_product_attention = kernel
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(idx)
    seen.clear()
    out, calls = run_captured(model, lambda: model(idx))
    assert torch.equal(out, base) and len(calls) == 2 == len(seen)
    cfg = model.config
    scale = 1.0 / math.sqrt(cfg.attention_scores_scalar or cfg.head_size)
    sliding = [bool(i) for i in cfg.sliding_window_indices[:2]]
    assert sliding == [True, False]
    for call, (q, k, v, y), window in zip(calls, seen, sliding, strict=True):
        assert call.name.endswith(".attn") and call.softcap == pytest.approx(cap, rel=1e-12)
        assert call.scale == pytest.approx(scale, rel=1e-12) and call.scores is None and call.bias is None
        assert call.q is not None and call.k is not None and call.keep is not None
        assert torch.equal(call.q, q) and torch.equal(call.k, k) and torch.equal(call.v, v)
        # the keys each query may attend: causal, and within the window on sliding layers
        i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
        want = (j <= i) & ((i - j < 4) if window else True)
        assert torch.equal(call.keep.expand(2, 4, 10, 10), want.expand(2, 4, 10, 10))
        # litgpt's own logits, capped, reproduce its output through the record's probabilities
        logits = scale * q.double() @ k.double().mT
        capped = cap * torch.tanh(logits / cap)
        real = y.double().transpose(1, 2)
        torch.testing.assert_close(call_probabilities(call) @ v.double(), real, rtol=1e-5, atol=1e-5)
        uncapped = AttentionCall(call.name, call.q, call.k, call.v, call.keep, None, call.scale)
        assert (call_probabilities(uncapped) @ v.double() - real).abs().amax() > 1e-2
        assert float(logits.abs().amax()) > 3 * cap  # the cap bites
        d = call_diagnostics(call)
        keep = want.expand(2, 4, 10, 10)
        close = dict(rtol=2e-5, atol=0.0)
        torch.testing.assert_close(d.kappa_softmax, D.kappa_softmax(capped, keep), **close)
        torch.testing.assert_close(d.kappa_score, D.kappa_score(q.double(), k.double(), keep), **close)
        # the logit maximum is taken before the cap, as for transformers' Gemma-2 record
        top = logits.abs().masked_fill(~keep, 0).amax((-2, -1))
        torch.testing.assert_close(d.logit_max, top, **close)

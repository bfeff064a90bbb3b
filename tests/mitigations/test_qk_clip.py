"""QK-clip against float64 recomputations: offending heads to τ, the rest bitwise untouched."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import Block as PreLNBlock
from torch import Tensor, nn

from lightning_stability.capture.structure import describe_block
from lightning_stability.mitigations import QKClip, clip_block_qk, qk_clip_, qk_clip_factors, qk_params

D, H, N = 32, 4, 7


class SeparateQK(nn.Module):
    """Attention with separate q/k/v projections (biases), optionally fewer K/V heads."""

    def __init__(self, d: int = D, heads: int = H, kv_heads: int = H) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, kv_heads * self.dh)
        self.v_proj = nn.Linear(d, kv_heads * self.dh)
        self.o_proj = nn.Linear(d, d)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.dh).transpose(1, 2)
        return q, k.repeat_interleave(self.heads // self.kv_heads, 1)

    def forward(self, x: Tensor) -> Tensor:
        q, k = self.qk(x)
        b, n, _ = x.shape
        v = self.v_proj(x).view(b, n, self.kv_heads, self.dh).transpose(1, 2)
        v = v.repeat_interleave(self.heads // self.kv_heads, 1)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class Layer(nn.Module):
    def __init__(self, kv_heads: int = H) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.self_attn = SeparateQK(kv_heads=kv_heads)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.self_attn(self.norm(x))


def head_max_logits(q: Tensor, k: Tensor) -> list[float]:
    """max over examples, queries and keys of |q·kᵀ/√d_h| per head, in float64."""
    q, k = q.double(), k.double()
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return logits.abs().amax(dim=(0, 2, 3)).tolist()


def split_heads(t: Tensor, heads: int) -> Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def separate_logits(layer: Layer, x: Tensor) -> list[float]:
    return head_max_logits(*layer.self_attn.qk(layer.norm(x)))


def gpt2_setup() -> tuple[nn.Module, Callable[[nn.Module, Tensor], list[float]]]:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=D, n_head=H, n_layer=1, n_positions=16, vocab_size=11)
    block = transformers.GPT2Model(config).h[0]

    def logits(block: nn.Module, x: Tensor) -> list[float]:
        q, k, _ = block.attn.c_attn(block.ln_1(x)).split(D, dim=-1)
        return head_max_logits(split_heads(q, H), split_heads(k, H))

    return block, logits


def mha_setup() -> tuple[nn.Module, Callable[[nn.Module, Tensor], list[float]]]:
    layer = nn.TransformerEncoderLayer(
        D, H, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
    )

    def logits(layer: nn.Module, x: Tensor) -> list[float]:
        attn = layer.self_attn
        q, k, _ = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return head_max_logits(split_heads(q, H), split_heads(k, H))

    return layer, logits


def separate_setup() -> tuple[nn.Module, Callable[[nn.Module, Tensor], list[float]]]:
    return Layer(), separate_logits  # type: ignore[return-value]


SETUPS = {"separate-q-k": separate_setup, "gpt2-conv1d-c_attn": gpt2_setup, "mha-in_proj": mha_setup}


def qk_snapshot(block: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qk_clip_brings_offending_heads_to_tau_others_bitwise(setup: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module, logits = SETUPS[setup]()
    module = module.to(dtype)
    info = describe_block(0, "block", module)
    assert len(info.qk) == 1
    params = qk_params(info, info.qk[0])
    with torch.no_grad():  # make heads 0 and 2 large by construction
        for t in (params.w_q, params.w_k):
            t[: D // H].mul_(6.0)
            t[2 * D // H : 3 * D // H].mul_(4.0)
    x = torch.randn(2, N, D, dtype=torch.float64)
    with torch.no_grad():
        before = logits(module.double(), x)
        module.to(dtype)
    tau = sorted(before)[1] * 1.5  # between the small heads and the large ones
    offending = [h for h, s in enumerate(before) if s > tau]
    assert offending == [0, 2], before
    snapshot = qk_snapshot(module)
    clipped = clip_block_qk(info, before, tau)
    assert clipped == {info.qk[0].name: [0, 2]}
    with torch.no_grad():
        after = logits(module.double(), x)
    rel = 1e-12 if dtype == torch.float64 else 1e-6  # float32 weights: one rounding per entry
    for h in range(H):
        if h in offending:
            assert after[h] == pytest.approx(tau, rel=rel)
        else:
            assert after[h] == before[h]  # exactly: these rows were not touched
    module.to(dtype)
    # other heads' rows, V and everything else: bitwise unchanged
    params = qk_params(info, info.qk[0])
    old = describe_block(0, "block", _with_params(module, snapshot)).qk[0]
    for new_t, old_t in ((params.w_q, old.w_q()), (params.w_k, old.w_k())):
        for h in (1, 3):
            rows = slice(h * D // H, (h + 1) * D // H)
            assert torch.equal(new_t[rows], old_t[rows])
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed <= {
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "self_attn.in_proj_weight",
        "self_attn.in_proj_bias",
    }
    assert changed


def _with_params(module: nn.Module, snapshot: dict[str, Tensor]) -> nn.Module:
    import copy

    twin = copy.deepcopy(module)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(snapshot[n])
    return twin


def test_qk_clip_value_rows_untouched_for_fused_projection() -> None:
    torch.manual_seed(0)
    layer, _ = mha_setup()
    v_before = layer.self_attn.in_proj_weight[2 * D :].detach().clone()
    vb_before = layer.self_attn.in_proj_bias[2 * D :].detach().clone()
    clip_block_qk(describe_block(0, "b", layer), [10.0], 1.0)
    assert torch.equal(layer.self_attn.in_proj_weight[2 * D :], v_before)
    assert torch.equal(layer.self_attn.in_proj_bias[2 * D :], vb_before)


def test_qk_clip_grouped_query_scales_query_only() -> None:
    torch.manual_seed(0)
    layer = Layer(kv_heads=2).double()
    x = torch.randn(2, N, D, dtype=torch.float64)
    info = describe_block(0, "b", layer)
    k_before = layer.self_attn.k_proj.weight.detach().clone()
    with torch.no_grad():
        before = separate_logits(layer, x)
    tau = before[1] * 0.5
    clip_block_qk(info, before, tau)
    with torch.no_grad():
        after = separate_logits(layer, x)
    assert after == pytest.approx([min(tau, s) for s in before], rel=1e-12)
    assert torch.equal(layer.self_attn.k_proj.weight, k_before)  # shared keys left alone


def test_qk_clip_one_factor_applies_to_all_heads() -> None:
    torch.manual_seed(0)
    layer = Layer().double()
    x = torch.randn(2, N, D, dtype=torch.float64)
    with torch.no_grad():
        before = separate_logits(layer, x)
    block_max = max(before)
    clip_block_qk(describe_block(0, "b", layer), [block_max], block_max / 3)
    with torch.no_grad():
        after = separate_logits(layer, x)
    assert after == pytest.approx([s / 3 for s in before], rel=1e-12)
    assert max(after) == pytest.approx(block_max / 3, rel=1e-12)


def test_qk_clip_factors_and_bad_factors() -> None:
    assert qk_clip_factors([200.0, 100.0, math.inf, 0.0], 100.0) == [0.5, 1.0, 1.0, 1.0]
    layer = Layer()
    info = describe_block(0, "b", layer)
    params = qk_params(info, info.qk[0])
    with pytest.raises(ValueError, match="factors"):
        qk_clip_(params, [0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="multiple"):
        qk_clip_(params, [0.5, 1.0, 1.0])


def test_qk_clip_object_records_what_it_did_and_restore_undoes_nothing() -> None:
    torch.manual_seed(0)
    block = describe_block(0, "b", PreLNBlock(D, H))
    clip = QKClip(block, tau=100.0)
    before = {n: p.detach().clone() for n, p in block.module.named_parameters()}
    assert clip.apply([150.0, 20.0, 120.0, 3.0]) == {"b.attn.qkv": [0, 2]}
    assert clip.apply([50.0] * H) == {"b.attn.qkv": []}  # nothing past τ: nothing recorded
    assert clip.factors == [pytest.approx(100.0 / 150.0)]
    after = {n: p.detach().clone() for n, p in block.module.named_parameters()}
    clip.restore()  # QK-clip changes weights for good
    assert all(torch.equal(p, after[n]) for n, p in block.module.named_parameters())
    assert not torch.equal(after["attn.qkv.weight"], before["attn.qkv.weight"])
    twin = QKClip(block)
    twin.load_state_dict(clip.state_dict())
    assert twin.factors == clip.factors


def test_armed_qk_clip_clips_by_each_training_forward_and_disarms() -> None:
    torch.manual_seed(0)
    block = describe_block(0, "b", PreLNBlock(D, H))
    with torch.no_grad():  # head 1 large by construction
        w = block.module.attn.qkv.weight
        w[D // H : 2 * D // H].mul_(8.0)
        w[D + D // H : D + 2 * D // H].mul_(8.0)
    x = torch.randn(2, N, D)

    def logits() -> list[float]:
        with torch.no_grad():
            z = block.module.norm1(x)
            q, k, _ = block.module.attn.qkv(z).reshape(2, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return head_max_logits(q, k)

    before = logits()
    tau = sorted(before)[-2] * 1.5  # only head 1 above
    clip = QKClip(block, tau=tau)
    assert clip.clip_watched() is None  # not armed: nothing watched
    clip.arm()
    assert clip.armed
    with torch.no_grad():
        block.module(x)  # no gradients: not a training forward
    assert clip.clip_watched() is None
    block.module(x).sum().backward()  # the training forward
    maxima, clipped = clip.clip_watched()  # type: ignore[misc]
    assert maxima == pytest.approx(before, rel=1e-5)
    assert clipped == {"b.attn.qkv": [1]} and clip.watched_clips == 1
    after = logits()
    assert after[1] == pytest.approx(tau, rel=1e-5)
    assert [after[h] for h in (0, 2, 3)] == [before[h] for h in (0, 2, 3)]
    block.module(x).sum().backward()  # at τ now: nothing rescaled
    _, clipped = clip.clip_watched()  # type: ignore[misc]
    assert clipped == {"b.attn.qkv": []} and clip.watched_clips == 1
    # a reduction across processes sees the local maxima and decides what is used
    block.module(x).sum().backward()
    assert clip.clip_watched(lambda m: None) is None
    clip.restore()  # stops watching; weights stay
    assert not clip.armed and not block.module._forward_pre_hooks
    assert logits() == after
    twin = QKClip(block, tau=tau)
    twin.load_state_dict(clip.state_dict())
    assert twin.watched_clips == 1 and not twin.armed  # a record puts no hook on the block
    with pytest.raises(ValueError, match="no query/key"):
        QKClip(describe_block(0, "mlp", nn.Sequential(nn.Linear(D, D)))).arm()

"""Issue 11's signals — r_local, worst_block, attn_logit_max, amax, fp16_headroom,
r_block_mean_token — on a model with one block made fragile by construction, against
recomputations with plain hooks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.capture.test_probe_correctness import Net, _x, run_probe
from torch import nn

FRAGILE = 1


@pytest.fixture(scope="module")
def fragile() -> nn.Module:
    """4 pre-LN blocks; block 1's Q and K rows scaled ×9.5 so its attention logits reach ~150."""
    torch.manual_seed(0)
    model = Net(depth=4)
    with torch.no_grad():
        model.blocks[FRAGILE].attn.qkv.weight[:64] *= 9.5
    return model


def _outputs(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Every module's first output, with plain forward hooks (float64 model, or BF16 autocast)."""
    outs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, o.detach().clone()))
        for n, m in model.named_modules()
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_fragile_block_is_named_by_r_local_not_by_r_block(fragile: nn.Module) -> None:
    report = run_probe(fragile, _x(n=32))
    r_local = [b.r_local for b in report.blocks]
    r_block = [b.r_block for b in report.blocks]
    others = [r for i, r in enumerate(r_local) if i != FRAGILE]
    assert r_local[FRAGILE] > 3 * max(others), r_local
    assert report.worst_block == f"blocks.{FRAGILE}" and report.worst_block_index == FRAGILE
    assert report.metrics()["stability/worst_block"] == FRAGILE
    # the propagated error keeps growing after the fragile block: its largest value is elsewhere
    assert max(range(4), key=lambda i: r_block[i]) != FRAGILE and r_block[-1] > r_block[FRAGILE]
    att = [b.r_attention_local for b in report.blocks]
    assert att[FRAGILE] > 3 * max(a for i, a in enumerate(att) if i != FRAGILE)
    assert all(b.r_ffn_local is not None and b.r_ffn_local < 2e-2 for b in report.blocks)


def test_logit_max_amax_headroom_equal_a_float64_recomputation(fragile: nn.Module) -> None:
    x = _x(n=32)
    report = run_probe(fragile, x, log_per_head=True)
    ref = copy.deepcopy(fragile).double()
    outs = _outputs(ref, x.double())
    for i, block in enumerate(report.blocks):
        qkv = outs[f"blocks.{i}.attn.qkv"]
        b, n, _ = qkv.shape
        q, k, _v = qkv.reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).abs()  # (B, H, n, n)
        per_head = logits.amax((0, 2, 3))
        assert block.per_head["attn_logit_max"] == pytest.approx(per_head.tolist(), rel=1e-5)
        assert block.attn_logit_max == pytest.approx(per_head.max().item(), rel=1e-5)
        inside = [t.abs().max().item() for name, t in outs.items() if name.startswith(f"blocks.{i}")]
        assert block.amax == pytest.approx(max(inside), rel=1e-5)
    assert 140 < report.blocks[FRAGILE].attn_logit_max < 170
    assert report.attn_logit_max == report.blocks[FRAGILE].attn_logit_max
    top_name, top = max(((n, t.abs().max().item()) for n, t in outs.items()), key=lambda kv: kv[1])
    assert report.amax_module == top_name
    assert report.fp16_headroom == pytest.approx(math.log2(65504 / top), abs=1e-5)


def test_r_local_and_mean_token_equal_a_plain_hook_recomputation(fragile: nn.Module) -> None:
    x = _x(n=32)
    report = run_probe(fragile, x)
    exact = _outputs(fragile, x)
    low = _outputs(fragile, x, autocast=True)
    for i, block in enumerate(report.blocks):
        # teacher forcing by hand: block i in BF16 autocast on its exact FP32 input
        x_in = exact["embed"] if i == 0 else exact[f"blocks.{i - 1}"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = fragile.blocks[i](x_in).float()
        want = ((y - exact[f"blocks.{i}"]).double().norm() / exact[f"blocks.{i}"].double().norm()).item()
        assert block.r_local == pytest.approx(want, rel=1e-5)
        # the sub-layers on their exact inputs (the outputs of the FP32 norms before them)
        for name, sub, norm in (("r_attention_local", "attn", "norm1"), ("r_ffn_local", "mlp", "norm2")):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = getattr(fragile.blocks[i], sub)(exact[f"blocks.{i}.{norm}"]).float()
            ref = exact[f"blocks.{i}.{sub}"].double()
            assert getattr(block, name) == pytest.approx(((y - ref).norm() / ref.norm()).item(), rel=1e-5)
        diff = (low[f"blocks.{i}"].float() - exact[f"blocks.{i}"]).double()
        per_token = diff.norm(dim=-1) / exact[f"blocks.{i}"].double().norm(dim=-1)
        assert block.r_block_mean_token == pytest.approx(per_token.mean().item(), rel=1e-5)
        assert block.r_block_median == pytest.approx(per_token.flatten().median().item(), rel=1e-5)
    assert report.r_block_mean_token == report.blocks[-1].r_block_mean_token

"""AttentionCapture and observe_attention: what is installed while active and removed after."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.capture.conftest import (
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
    AttentionCall,
    AttentionCapture,
    observe_attention,
)


class ExplicitSoftmaxAttention(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        observe_attention(q, k, v, mask, scale=0.5)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ v


def test_observe_attention_adapter() -> None:
    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("attn", ExplicitSoftmaxAttention())
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.rand(1, 1, 5, 5) > 0.4
    mask[..., 0] = True
    observe_attention(q, k, v, mask)  # inactive: a no-op
    out, calls, n = run_captured(model, lambda: model.attn(q, k, v, mask))
    assert n == 1 and calls[0].name == "attn" and calls[0].k.shape == (1, 4, 5, 8)
    assert_reproduces(calls[0], out)


def test_fast_path_disabled_while_active() -> None:
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _, calls, _ = run_captured(layer, lambda: layer(x))
        assert len(calls) == 1 and calls[0].name == "self_attn"
        _, calls, _ = run_captured(mha, lambda: mha(x, x, x))
        assert len(calls) == 1
    assert torch.backends.mha.get_fastpath_enabled()
    # and a flag the user had turned off stays off
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            run_captured(mha, lambda: mha(x, x, x))
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_autocast_bf16() -> None:
    torch.manual_seed(7)
    model = Tiny().eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    inputs: list[Tensor] = []
    handle = record_inputs(model.blocks[0].attn.proj, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(x)
        out, calls, _ = run_captured(model, lambda: model(x))
        (mout, _), mcalls, _ = run_captured(mha, lambda: mha(x, x, x, need_weights=False))
    handle.remove()
    assert torch.equal(out, base)
    assert calls[0].q.dtype == torch.bfloat16 and mcalls[0].q.dtype == torch.bfloat16
    assert_reproduces(calls[0], heads_from(inputs[1], 4).float(), atol=3e-2)
    assert torch.allclose(mha_out_from(mcalls[0], mha, True), mout.double(), atol=5e-2)


def test_cleanup_after_exception_and_nesting() -> None:
    import transformers.modeling_utils as mu

    iface = mu.AttentionInterface
    lookup = vars(iface)["get_interface"]
    global_before = dict(iface._global_mapping)
    local_before = dict(mu.ALL_ATTENTION_FUNCTIONS._local_mapping)

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Tiny(depth=1)

        def forward(self, x: Tensor) -> Tensor:
            self.inner(x)
            raise RuntimeError("boom")

    model = Boom()
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), AttentionCapture(model, lambda c: seen.append(c.name)):
        assert vars(iface)["get_interface"] is not lookup
        assert not torch.backends.mha.get_fastpath_enabled()
        model(torch.randn(1, 3, 32))
    assert seen == ["inner.blocks.0.attn"]
    no_leftovers(model)
    assert vars(iface)["get_interface"] is lookup
    assert iface._global_mapping == global_before and "eager" not in mu.ALL_ATTENTION_FUNCTIONS
    assert mu.ALL_ATTENTION_FUNCTIONS._local_mapping == local_before
    assert torch.backends.mha.get_fastpath_enabled()

    # nested captures both see the call; the callback's own SDPA is not recorded
    outer: list[AttentionCall] = []

    def inner_cb(c: AttentionCall) -> None:
        F.scaled_dot_product_attention(c.q, c.k, c.v)

    with AttentionCapture(model.inner, outer.append) as a, AttentionCapture(model.inner, inner_cb) as b:
        model.inner(torch.randn(1, 3, 32))
    assert a.calls == b.calls == 1 and len(outer) == 1 and outer[0].name == "blocks.0.attn"
    no_leftovers(model)
    assert vars(iface)["get_interface"] is lookup and iface._global_mapping == global_before


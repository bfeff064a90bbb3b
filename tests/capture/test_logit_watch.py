"""HeadLogitWatch: each head's largest logit of a module's training forwards, against float64 references."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TinyTransformer
from torch import Tensor, nn

from lightning_stability.capture import logit_watch
from lightning_stability.capture.logit_watch import HeadLogitWatch

D, H = 32, 4


def head_max(q: Tensor, k: Tensor, scale: float, causal: bool) -> list[float]:
    """max over examples, query rows and attended keys of |scale·q·kᵀ| per head, in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)).abs() * scale
    if causal:
        n_q, n_k = s.shape[-2:]
        keep = torch.ones(n_q, n_k, dtype=torch.bool).tril()
        s = s.masked_fill(~keep, 0.0)
    return s.amax(dim=(0, 2, 3)).tolist()


def tiny_reference(model: TinyTransformer, block: int, x: Tensor) -> list[float]:
    """The tiny model's block ``block``: q and k recomputed from its qkv projection (non-causal SDPA)."""
    seen: list[list[float]] = []

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        z = args[0].detach()
        b, n, d = z.shape
        q, k, _ = module.qkv(z).reshape(b, n, 3, H, d // H).permute(2, 0, 3, 1, 4)
        seen.append(head_max(q, k, 1 / math.sqrt(d // H), causal=False))

    handle = model.blocks[block].attn.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def test_training_forward_is_watched_and_unchanged() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(d=D, heads=H)
    with torch.no_grad():  # head 2 of block 1 large by construction
        w = model.blocks[1].attn.qkv.weight
        w[2 * D // H : 3 * D // H].mul_(5.0)
        w[D + 2 * D // H : D + 3 * D // H].mul_(5.0)
    x = torch.randn(5, 6, 8)
    y = torch.randint(0, 3, (5,))
    ref = tiny_reference(model, 1, x)
    assert max(ref) == ref[2]

    def step() -> tuple[Tensor, list[Tensor]]:
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = step()
    with HeadLogitWatch(model.blocks[1]) as watch:
        watched_loss, watched_grads = step()
        got = watch.take()
        assert watch.forwards == 0  # reset by take
    assert got is not None and got.dtype == torch.float64
    assert got.tolist() == pytest.approx(ref, rel=1e-6)
    # a neutral observer: the same loss and gradients, bitwise
    assert torch.equal(plain_loss, watched_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, watched_grads, strict=True))
    # no hook outlives the context
    assert not model.blocks[1]._forward_pre_hooks and not model.blocks[1]._forward_hooks


def test_forwards_without_gradients_or_in_eval_mode_are_not_watched() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(d=D, heads=H)
    x = torch.randn(3, 6, 8)
    with HeadLogitWatch(model.blocks[0]) as watch:
        with torch.no_grad():
            model(x)  # a what-if loss or the monitor's side forward
        model.eval()
        model(x)  # validation
        assert watch.take() is None and watch.forwards == 0
        model.train()
        model(x)
        model(x * 3.0)  # two forwards before one step (gradient accumulation): their maximum
        assert watch.forwards == 2
        got = watch.take()
    assert got is not None
    both = [
        max(a, b) for a, b in zip(tiny_reference(model, 0, x), tiny_reference(model, 0, x * 3.0), strict=True)
    ]
    assert got.tolist() == pytest.approx(both, rel=1e-6)


def test_a_failure_never_reaches_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = TinyTransformer(d=D, heads=H)
    x = torch.randn(3, 6, 8)
    with HeadLogitWatch(model.blocks[0]) as watch:
        model(x)
        assert watch.heads == H
        watch.take()

        def broken(call: Any) -> Tensor:
            raise RuntimeError("boom")

        monkeypatch.setattr(logit_watch, "call_head_logit_max", broken)
        out = model(x)  # the forward completes
        assert watch.error == "RuntimeError: boom"
        assert watch.take() is None  # never a stale number
    assert torch.isfinite(out).all()


class ManualCausal(nn.Module):
    """nanoGPT's hand-written attention: ``softmax(masked_fill(q kᵀ·scale)) @ v``."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        return tuple(t.view(b, n, H, D // H).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qk(x)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(n, n).tril() == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, n, D))


def test_hand_written_causal_attention_is_read_from_its_scores() -> None:
    torch.manual_seed(0)
    attn = ManualCausal()
    x = torch.randn(2, 7, D) * 3.0
    with torch.no_grad():
        q, k, _ = attn.qk(x)
    ref = head_max(q, k, 1 / math.sqrt(D // H), causal=True)
    with HeadLogitWatch(attn) as watch:
        attn(x).sum().backward()
        got = watch.take()
    assert got is not None and got.tolist() == pytest.approx(ref, rel=1e-6)


def test_llama_grouped_query_attention_with_rope() -> None:
    """A transformers Llama layer (RoPE, 2 K/V heads for 4 query heads, causal): the reference applies
    the model's own rotary embedding to its q/k projections and repeats the K/V heads."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    cfg = transformers.LlamaConfig(
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    layer = model.model.layers[1]
    seen: list[list[float]] = []

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = kwargs["hidden_states"].detach()
        cos, sin = kwargs["position_embeddings"]
        b, n, _ = h.shape
        q = module.q_proj(h).view(b, n, -1, D // H).transpose(1, 2)
        k = module.k_proj(h).view(b, n, -1, D // H).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        seen.append(head_max(q, repeat_kv(k, H // 2), module.scaling, causal=True))

    x = torch.randint(0, 50, (3, 9))
    handle = layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with HeadLogitWatch(layer) as watch:
            model(x, labels=x).loss.backward()
            got = watch.take()
    finally:
        handle.remove()
    assert got is not None and got.tolist() == pytest.approx(seen[0], rel=1e-5)


def test_a_compiled_forward_is_not_watched_and_never_breaks() -> None:
    """Traced by ``torch.compile`` with the watch's hooks on (a run resumed armed), the hooks do nothing but
    say why: the forward compiles once, without the capture, and gives the unwatched model's output."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(2, 6, 8)
    expected = model(x)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with HeadLogitWatch(model.blocks[0]) as watch:
        outs = [compiled(x) for _ in range(3)]
    assert watch.error == logit_watch.COMPILED and watch.take() is None
    assert counter.frame_count == 1  # traced once, not at every forward
    for out in outs:
        torch.testing.assert_close(out, expected)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch._dynamo.reset()

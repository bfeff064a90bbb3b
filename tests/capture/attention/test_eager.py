"""transformers' eager attention through the attention-interface lookup."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from tests.capture.conftest import (
    assert_matches,
    assert_reproduces,
    linear64,
    ref_diagnostics,
    run_captured,
    run_captured_no_grad,
)
from torch import Tensor, nn

from lightning_stability.capture import (
    AttentionCall,
    call_diagnostics,
)
from lightning_stability.diagnostics import AttentionDiagnostics


def test_eager_lookup_delegates_to_the_models_own_default() -> None:
    """A model file whose eager function has another name still gets exactly that function."""
    import transformers.modeling_utils as mu

    used: list[str] = []

    def simple_eager(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, **kw: Any):
        used.append("simple")
        w = torch.softmax(q @ k.transpose(-1, -2) * kw["scaling"] + mask, -1)
        return (w @ v).transpose(1, 2), w

    class Attn(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
            fn = mu.ALL_ATTENTION_FUNCTIONS.get_interface("eager", simple_eager)
            return fn(self, q, k, v, mask, dropout=0.0, scaling=0.25)[0]

    model = nn.Sequential()
    model.add_module("attn", Attn())
    q = torch.randn(1, 2, 4, 8)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1] = torch.finfo(torch.float32).min
    mask[..., 2] = 0.7
    base = model.attn(q, q, q, mask)
    out, calls, _ = run_captured(model, lambda: model.attn(q, q, q, mask))
    assert torch.equal(out, base) and used == ["simple", "simple"]
    call = calls[0]
    assert call.name == "attn" and call.scale == 0.25 and call.keep is not None and call.bias is not None
    assert not call.keep[..., 1].any() and torch.all(call.bias[..., 2] == 0.7)
    assert_reproduces(call, out.transpose(1, 2))


def test_transformers_eager_not_double_counted() -> None:
    tr = pytest.importorskip("transformers")
    cfg = tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    model = tr.GPT2Model._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 8))
    _, calls, n = run_captured_no_grad(model, lambda: model(input_ids=ids))
    assert n == 2 and all(c.scores is None and c.q is not None for c in calls)
    assert [c.name for c in calls] == ["h.0.attn", "h.1.attn"]


def test_t5_eager_equals_sdpa_and_float64() -> None:
    tr = pytest.importorskip("transformers")
    cfg = tr.T5Config(
        d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, vocab_size=64,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    torch.manual_seed(4)
    ids = torch.randint(1, 64, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, -3:] = 0
    results: dict[str, list[AttentionDiagnostics]] = {}
    state: dict[str, Tensor] | None = None
    refs: list[dict[str, Tensor]] = []
    for impl in ("eager", "sdpa"):
        model = tr.T5EncoderModel._from_config(cfg, attn_implementation=impl).eval()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        seen: list[tuple[Tensor, Tensor]] = []

        def hook(m: nn.Module, args: Any, kwargs: Any, out: Any, seen: list[Any] = seen) -> None:
            seen.append((kwargs.get("hidden_states", args[0] if args else None).detach(), out[1].detach()))

        mods = [blk.layer[0].SelfAttention for blk in model.encoder.block]
        handles = [mod.register_forward_hook(hook, with_kwargs=True) for mod in mods]
        _, calls, n = run_captured_no_grad(model, lambda model=model: model(input_ids=ids, attention_mask=am))
        for h in handles:
            h.remove()
        assert n == 2
        results[impl] = [call_diagnostics(c) for c in calls]
        if impl == "eager":
            keep = am.bool()[:, None, None, :].expand(2, 4, 8, 8)
            for mod, (hid, pos_bias) in zip(mods, seen, strict=True):
                def heads(t: Tensor) -> Tensor:
                    return t.view(2, 8, 4, 8).transpose(1, 2)

                q, k, v = (heads(linear64(hid, lin)) for lin in (mod.q, mod.k, mod.v))
                s = q @ k.mT + pos_bias.double()  # T5: no 1/sqrt(d) scaling
                refs.append(ref_diagnostics(q, k, v, s, keep))
    for de, ds, ref in zip(results["eager"], results["sdpa"], refs, strict=True):
        assert_matches(de, ref)
        assert_matches(ds, ref)


def test_gemma2_softcap_enters_the_record() -> None:
    tr = pytest.importorskip("transformers")
    cfg = tr.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, query_pre_attn_scalar=8,
        attn_logit_softcapping=0.5, sliding_window=4, max_position_embeddings=32,
    )
    torch.manual_seed(5)
    model = tr.Gemma2Model._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # logits of order 1–10, so that the 0.5 cap bites
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    ids = torch.randint(1, 64, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, :2] = 0
    outs: list[Tensor] = []
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: outs.append(a[0].detach()))
        for layer in model.layers
    ]
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=am).last_hidden_state
    outs.clear()
    out, calls, n = run_captured_no_grad(
        model, lambda: model(input_ids=ids, attention_mask=am).last_hidden_state
    )
    for h in handles:
        h.remove()
    assert torch.equal(out, base) and n == 2
    for call, real in zip(calls, outs, strict=True):
        assert call.softcap == 0.5 and call.q is not None and call.k is not None and call.keep is not None
        q, k, v = call.q.double(), call.k.double(), call.v.double()
        logits = call.scale * q @ k.mT
        s = 0.5 * torch.tanh(logits / 0.5)
        keep = call.keep.expand(2, 4, 8, 8)
        # the record reproduces the model's attention output (softcap included)
        p = torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)
        o = (p @ v).transpose(1, 2).reshape(2, 8, 32)
        rows = keep.any(-1).any(1)  # (2, 8) query rows with a kept key
        assert (o - real.double()).abs().amax(-1)[rows].max().item() < 1e-5
        d = call_diagnostics(call)
        ref = ref_diagnostics(q, k, v, s, keep)
        ref["logit_max"] = logits.abs().masked_fill(~keep, 0.0).amax((-2, -1))  # before the cap
        assert_matches(d, ref)
        # without the cap the numbers differ: the cap matters here
        plain = call_diagnostics(
            AttentionCall(call.name, call.q, call.k, call.v, call.keep, None, call.scale)
        )
        assert not torch.allclose(plain.kappa_softmax, d.kappa_softmax, rtol=1e-2)


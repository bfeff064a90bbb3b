"""``measure`` on Gemma-2 from transformers and from litgpt: ``attn_logit_max`` is the logit the
softmax sees, after the model's soft-capping ``c·tanh(s/c)``, equal to a float64 recomputation
from the model's own queries and keys (read independently of the capture) over the attended keys."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_stability import measure

F64 = torch.float64
CAP = 2.0


def capped_max(q: Tensor, k: Tensor, scale: float, keep: Tensor) -> Tensor:
    """Per head and example ``max |c·tanh(scale·q·kᵀ/c)|`` over attended keys, float64 ``(B, H)``;
    and the same before the cap (to see that the cap bites)."""
    logits = scale * q.to(F64) @ k.to(F64).mT
    capped = CAP * torch.tanh(logits / CAP)
    return capped.abs().masked_fill(~keep, 0).amax((-2, -1)), logits.abs().masked_fill(~keep, 0).amax()


def window_keep(n: int, window: int | None) -> Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = j <= i
    return keep & (i - j < window) if window is not None else keep


def check_report(report: Any, per_block: list[Tensor]) -> None:
    """Each block's ``attn_logit_max`` and its per-head values against the float64 references."""
    for block, ref in zip(report.blocks, per_block, strict=True):
        assert block.attn_logit_max <= CAP
        assert block.attn_logit_max == pytest.approx(float(ref.amax()), rel=1e-5)
        heads = torch.tensor(block.per_head["attn_logit_max"], dtype=F64)
        torch.testing.assert_close(heads, ref.amax(0), rtol=1e-5, atol=0.0)
    assert report.attn_logit_max == max(b.attn_logit_max for b in report.blocks)


def test_transformers_gemma2_logit_max_is_taken_after_the_cap() -> None:
    tr = pytest.importorskip("transformers")
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb, repeat_kv

    cfg = tr.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, query_pre_attn_scalar=8,
        attn_logit_softcapping=CAP, sliding_window=4, max_position_embeddings=32,
    )
    torch.manual_seed(5)
    model = tr.Gemma2Model._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # logits well past the cap
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[nn.Module, Tensor, tuple[Tensor, Tensor]]] = []

    def grab(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append((module, kwargs["hidden_states"].detach(), kwargs["position_embeddings"]))

    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    refs = []
    for attn, x, (cos, sin) in seen:  # the model's own projections and rotary embedding, in float64
        b, n, _ = x.shape
        q = (x.to(F64) @ attn.q_proj.weight.to(F64).T).view(b, n, -1, 8).transpose(1, 2)
        k = (x.to(F64) @ attn.k_proj.weight.to(F64).T).view(b, n, -1, 8).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos.to(F64), sin.to(F64))
        k = repeat_kv(k, attn.num_key_value_groups)
        ref, uncapped = capped_max(q, k, attn.scaling, window_keep(n, attn.sliding_window))
        assert uncapped > 3 * CAP  # the cap bites
        refs.append(ref)
    assert [a.sliding_window for a, _, _ in seen] == [4, None]
    report = measure(model, {"input_ids": ids}, log_per_head=True)
    check_report(report, refs)


def test_litgpt_gemma2_logit_max_is_taken_after_the_cap() -> None:
    config = pytest.importorskip("litgpt.config")
    litgpt_model = pytest.importorskip("litgpt.model")
    cfg = config.Config.from_name(
        "gemma-2-2b", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8,
        intermediate_size=64, padded_vocab_size=64, vocab_size=64, block_size=32,
        sliding_window_size=4, attention_logit_softcapping=CAP,
    )
    torch.manual_seed(0)
    model = litgpt_model.GPT(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.qkv.weight[: 2 * cfg.n_embd].mul_(20)
    seen: list[tuple[Tensor, Tensor]] = []
    for block in model.transformer.h:  # the queries and keys litgpt hands to its attention kernel

        def kernel(
            q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
            run: Any = block.attn.scaled_dot_product_attention,
        ) -> Any:
            seen.append((q.detach(), k.detach()))
            return run(q, k, v, mask)

        block.attn.scaled_dot_product_attention = kernel
    idx = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(idx)
    for block in model.transformer.h:
        del block.attn.scaled_dot_product_attention  # litgpt's own method again
    scale = 1.0 / math.sqrt(cfg.attention_scores_scalar or cfg.head_size)
    windows = [4 if cfg.sliding_window_indices[i] else None for i in range(2)]
    refs = []
    for (q, k), window in zip(seen, windows, strict=True):
        ref, uncapped = capped_max(q, k, scale, window_keep(10, window))
        assert uncapped > 3 * CAP
        refs.append(ref)
    report = measure(model, idx, log_per_head=True)
    check_report(report, refs)

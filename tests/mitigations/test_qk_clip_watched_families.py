"""QK-clip by the training forward's own per-head maxima, on models this project did not write.

For each family (transformers GPT-2, Llama, BERT, ViT built from configs, eager and SDPA attention,
and the scenarios' own GPT), one head of block 0 is made large; an armed :class:`QKClip` watches a
training forward, clips by what it saw, and the next training forward on the same batch must find
that head's maximum at ``τ`` (float tolerance) while every other head is untouched bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_stability.capture.logit_watch import HeadLogitWatch
from lightning_stability.capture.structure import model_blocks
from lightning_stability.mitigations import QKClip, qk_params

H, D = 4, 32
GROW = 6.0  # head 1's query and key rows (and biases): its logits by 36
SCEN_DIR = Path(__file__).resolve().parents[2] / "examples" / "scenarios"


def _hf(name: str, impl: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common: dict[str, Any] = {"hidden_size": D, "num_attention_heads": H, "num_hidden_layers": 2}
    ids = torch.randint(0, 60, (3, 10))
    if name == "gpt2":
        cfg: Any = transformers.GPT2Config(
            n_embd=D, n_head=H, n_layer=2, vocab_size=60, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
        )
        model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)
        return model, lambda m: m(ids, labels=ids).loss
    if name == "llama":
        cfg = transformers.LlamaConfig(**common, intermediate_size=64, vocab_size=60)
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
        return model, lambda m: m(ids, labels=ids).loss
    drop = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if name == "bert":
        cfg = transformers.BertConfig(**common, **drop, intermediate_size=64, vocab_size=60)
        model = transformers.BertForMaskedLM._from_config(cfg, attn_implementation=impl)
        return model, lambda m: m(ids, labels=ids).loss
    cfg = transformers.ViTConfig(
        **common, **drop, intermediate_size=64, image_size=8, patch_size=2, num_channels=1
    )
    model = transformers.ViTForImageClassification._from_config(cfg, attn_implementation=impl)
    pixels, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 0])
    return model, lambda m: m(pixel_values=pixels, labels=labels).loss


def _scenario_gpt() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    if str(SCEN_DIR) not in sys.path:
        sys.path.insert(0, str(SCEN_DIR))
    import gpt

    torch.manual_seed(0)
    model = gpt.ScenarioGPT(vocab_size=60, d_model=D, n_layers=2, n_heads=H, max_len=16)
    ids = torch.randint(0, 60, (3, 10))
    return model, lambda m: nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten())


FAMILIES = [(f, impl) for f in ("gpt2", "llama", "bert", "vit") for impl in ("eager", "sdpa")]


def _watched(clip: QKClip, model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> Tensor:
    model.zero_grad()
    loss(model).backward()
    watch = clip.watch
    assert watch is not None and watch.error is None
    got = watch.take()
    assert got is not None and got.shape == (H,)
    return got


def _qk_rows(clip: QKClip) -> list[list[Tensor]]:
    """Per head, copies of every query/key weight and bias row block of the block."""
    out: list[list[Tensor]] = [[] for _ in range(H)]
    for proj in clip.block.qk:
        p = qk_params(clip.block, proj)
        for t in (p.w_q, p.w_k, p.b_q, p.b_k):
            if t is not None:
                for h, rows in enumerate(t.chunk(H, dim=0)):
                    out[h].append(rows.detach().clone())
    return out


@pytest.mark.parametrize(("family", "impl"), [*FAMILIES, ("scenario_gpt", "sdpa")])
def test_next_training_forward_finds_the_clipped_head_at_tau(family: str, impl: str) -> None:
    model, loss = _scenario_gpt() if family == "scenario_gpt" else _hf(family, impl)
    model.train()
    block = model_blocks(model)[0]
    with torch.no_grad():  # head 1 of block 0 large: its logits by GROW²
        for proj in block.qk:
            p = qk_params(block, proj)
            for t in (p.w_q, p.w_k, p.b_q, p.b_k):
                if t is not None:
                    t.chunk(H, dim=0)[1].mul_(GROW)
    clip = QKClip(block, tau=1.0)
    clip.arm()
    try:
        before = _watched(clip, model, loss)
        others = max(v for h, v in enumerate(before.tolist()) if h != 1)
        assert before[1] > 4 * others  # the grown head stands out
        clip.tau = float(before[1]) / 2  # head 1 above τ, every other head below
        rows = _qk_rows(clip)
        done = clip.clip_by(before)
        assert done is not None and all(heads == [1] for heads in done[1].values())
        after = _watched(clip, model, loss)
    finally:
        clip.disarm()
    assert float(after[1]) == pytest.approx(clip.tau, rel=1e-5)
    for h in (0, 2, 3):  # untouched: same weights bit for bit, same maxima
        assert float(after[h]) == float(before[h])
        for old, new in zip(rows[h], _qk_rows(clip)[h], strict=True):
            assert torch.equal(old, new)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _qk_normed(family: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    """Models normalizing queries and keys after their projection: transformers Qwen3, litgpt ``norm_qk``."""
    ids = torch.randint(0, 60, (3, 10))
    torch.manual_seed(0)
    if family == "qwen3":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.Qwen3Config(
            hidden_size=D, num_attention_heads=H, num_key_value_heads=2, head_dim=D // H,
            num_hidden_layers=2, intermediate_size=64, vocab_size=60,
        )  # fmt: skip
        model: nn.Module = transformers.Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m(ids, labels=ids).loss
    litgpt = pytest.importorskip("litgpt")
    model = litgpt.GPT(litgpt.Config.from_name("pythia-14m", norm_qk=True))
    return model, lambda m: nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten())


@pytest.mark.parametrize(("family", "norm"), [("qwen3", "self_attn.q_norm"), ("litgpt", "attn.norm_q")])
def test_a_qk_normed_block_is_neither_armed_nor_clipped(family: str, norm: str) -> None:
    """Rescaling W_Q/W_K before a qk-norm cannot lower the logits: QK-clip refuses (arm, clip_by, apply)
    rather than shrinking the weights at every step for nothing."""
    model, loss = _qk_normed(family)
    model.train()
    block = model_blocks(model)[0]
    clip = QKClip(block, tau=1.0)
    with pytest.raises(ValueError, match=f"{block.name}.{norm}.*qk-norm.*cannot lower"):
        clip.arm()
    assert not clip.armed
    weights = [p.detach().clone() for p in block.module.parameters()]
    with HeadLogitWatch(block.module) as watch:
        loss(model).backward()
    maxima = watch.take()
    assert maxima is not None and float(maxima.max()) > 2.0  # far above τ = 1
    with pytest.raises(ValueError, match="qk-norm"):
        clip.clip_by(maxima)
    with pytest.raises(ValueError, match="qk-norm"):
        clip.apply(maxima.tolist())
    assert all(torch.equal(a, b) for a, b in zip(weights, block.module.parameters(), strict=True))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_each_attention_of_a_block_is_clipped_by_its_own_logits(impl: str) -> None:
    """A BART decoder block holds a self-attention and a cross-attention: the self-attention's large head
    is clipped to τ by its own maximum, the cross-attention (far below τ) is left bit for bit."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        d_model=D, encoder_attention_heads=H, decoder_attention_heads=H, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=60, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    model = transformers.BartForConditionalGeneration._from_config(cfg, attn_implementation=impl).double()
    model.train()
    ids = torch.randint(4, 60, (3, 10))
    block = next(b for b in model_blocks(model) if b.name == "model.decoder.layers.0")
    self_attn, cross = (qk_params(block, p) for p in block.qk)
    assert [self_attn.name, cross.name] == [f"{block.name}.self_attn", f"{block.name}.encoder_attn"]
    with torch.no_grad():
        for t in (self_attn.w_q, self_attn.w_k, self_attn.b_q, self_attn.b_k):
            assert t is not None
            t.chunk(H, dim=0)[1].mul_(GROW)
    cross_qk = [t for t in (cross.w_q, cross.w_k, cross.b_q, cross.b_k) if t is not None]
    kept = [t.detach().clone() for t in cross_qk]
    clip = QKClip(block, tau=1.0)
    clip.arm()
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        watch = clip.watch
        assert watch is not None
        each = watch.take_each() if hasattr(watch, "take_each") else {"": watch.take()}
        model(input_ids=ids, labels=ids).loss.backward()
        top = max(float(m[1]) for m in each.values())  # the self-attention's head 1
        clip.tau = top / 2  # only that head above τ
        done = clip.clip_watched()
        assert done is not None and done[1] == {self_attn.name: [1], cross.name: []}
        assert sorted(each) == ["encoder_attn", "self_attn"]
        assert float(each["self_attn"][1]) == top
        assert 4 * float(each["encoder_attn"].max()) < clip.tau  # the cross-attention far below τ
        model(input_ids=ids, labels=ids).loss.backward()
        after = watch.take_each()
    finally:
        clip.disarm()
    assert float(after["self_attn"][1]) == pytest.approx(clip.tau, rel=1e-12)
    assert float(after["encoder_attn"].max()) < clip.tau  # its input changed, its weights did not
    for old, new in zip(kept, cross_qk, strict=True):
        assert torch.equal(old, new)


def _grouped(family: str, impl: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    """Grouped-query attention, 4 query heads sharing 2 key/value heads: transformers Llama, litgpt."""
    ids = torch.randint(0, 60, (3, 10))
    torch.manual_seed(0)
    if family == "llama":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(
            hidden_size=D, num_attention_heads=H, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=64, vocab_size=60,
        )  # fmt: skip
        model: nn.Module = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
        return model.double(), lambda m: m(ids, labels=ids).loss
    litgpt = pytest.importorskip("litgpt")
    cfg = litgpt.Config(
        n_layer=2, n_head=H, n_query_groups=2, n_embd=D, block_size=16, vocab_size=60, padded_vocab_size=60
    )
    model = litgpt.GPT(cfg).double()
    return model, lambda m: nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten())


@pytest.mark.parametrize(("family", "impl"), [("llama", "eager"), ("llama", "sdpa"), ("litgpt", "sdpa")])
def test_grouped_query_heads_are_clipped_one_by_one_keys_shared_untouched(family: str, impl: str) -> None:
    """Query head 1 shares key head 0 with query head 0: only head 1's query rows take η (the shared key
    is left alone), so head 1 lands on τ and head 0 — same key — keeps its logits and weights bit for bit."""
    model, loss = _grouped(family, impl)
    model.train()
    block = model_blocks(model)[0]
    (proj,) = block.qk
    assert proj.n_heads == H and proj.n_kv_heads == 2
    p = qk_params(block, proj)
    with torch.no_grad():
        p.w_q.chunk(H, dim=0)[1].mul_(GROW**2)  # head 1's logits by 36
    w_q, w_k = p.w_q.detach().clone(), p.w_k.detach().clone()
    clip = QKClip(block, tau=1.0)
    clip.arm()
    try:
        before = _watched(clip, model, loss)
        assert float(before[1]) > 4 * max(float(before[h]) for h in (0, 2, 3))
        clip.tau = float(before[1]) / 2
        done = clip.clip_by(before)
        assert done is not None and done[1] == {proj.name: [1]}
        after = _watched(clip, model, loss)
    finally:
        clip.disarm()
    assert float(after[1]) == pytest.approx(clip.tau, rel=1e-12)
    assert [float(after[h]) for h in (0, 2, 3)] == [float(before[h]) for h in (0, 2, 3)]
    assert torch.equal(p.w_k, w_k)  # the shared keys: untouched
    rows, old = p.w_q.chunk(H, dim=0), w_q.chunk(H, dim=0)
    assert torch.equal(rows[1], old[1] * (clip.tau / float(before[1])))  # the whole η on head 1's queries
    assert all(torch.equal(rows[h], old[h]) for h in (0, 2, 3))

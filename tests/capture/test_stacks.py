"""Finding the blocks of real model families: names, stacks, hierarchies, patterns."""

from __future__ import annotations

import fnmatch
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from tests.capture.conftest import NanoGPT, bart_stacks, names, probe_blocks
from torch import nn

from lightning_stability.capture.stacks import find_blocks, find_stacks, pattern_regex, unmatched_patterns
from lightning_stability.capture.structure import model_blocks

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.filterwarnings("ignore:.*enable_nested_tensor")


class _TVEncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock: ln_1, self_attention (MHA), ln_2, mlp."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(d, eps=1e-6)
        # torchvision's MLPBlock is an nn.Sequential(Linear, GELU, Dropout, Linear, Dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * d, d), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(query=y, key=y, value=y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class _TVEncoder(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, 5, d))
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", _TVEncoderBlock(d, 2)) for i in range(layers))
        )
        self.ln = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionLikeViT(nn.Module):
    """Same module names and nesting as torchvision's ``VisionTransformer`` (checked against its source)."""

    def __init__(self, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = _TVEncoder(d, layers)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(d, 10)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class _WindowBlock(nn.Module):
    """Swin block (no shift): attention written out by hand inside non-overlapping windows."""

    def __init__(self, d: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        w = self.window
        h = self.norm1(x).reshape(b * n // w, w, d)
        q, k, v = self.attn.qkv(h).reshape(-1, w, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.attn.proj(y)
        return x + self.mlp(self.norm2(x))


class _Stage(nn.Module):
    def __init__(self, d: int, depth: int, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_WindowBlock(d, 2, window=4) for _ in range(depth)])
        self.downsample = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) if merge else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class SwinLike(nn.Module):
    """timm-style: ``layers`` (stages) → ``layers.i.blocks`` (the residual blocks)."""

    def __init__(self, depths: tuple[int, ...] = (2, 2)) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[_Stage(16, depth, merge=i == 0) for i, depth in enumerate(depths)])
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(x))


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=60
    )
    return transformers.T5Model(cfg)


def _whisper() -> nn.Module:
    cfg = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=60,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return transformers.WhisperModel(cfg)


def _cfg_models() -> dict[str, nn.Module]:
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 3}
    return {
        "gpt2": transformers.GPT2Model(
            transformers.GPT2Config(n_embd=32, n_head=4, n_layer=3, vocab_size=60)
        ),
        "llama": transformers.LlamaModel(
            transformers.LlamaConfig(**small, num_key_value_heads=2, vocab_size=60)
        ),
        "bert": transformers.BertModel(transformers.BertConfig(**small, vocab_size=60)),
        "vit": transformers.ViTModel(transformers.ViTConfig(**small, image_size=16, patch_size=8)),
    }


class _ResMLPLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)


class _BlockWithSequentialMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2)
        self.mlp = nn.Sequential(
            *[_ResMLPLayer(d) for _ in range(5)]
        )  # uniform, with norms, longer than depth
        self.mlp2 = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d))  # uniform plain layers


def test_torchvision_vit_blocks_carry_their_real_names_and_get_attention_and_norms() -> None:
    torch.manual_seed(0)
    model = TorchvisionLikeViT().eval()
    expected = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert names(model) == expected
    probe, raw, report = probe_blocks(model, torch.randn(2, 3, 8, 8))
    assert [b.name for b in report.blocks] == expected
    assert raw.attention_calls == 3
    assert all(b.kappa_softmax is not None and b.kappa_wkwq is not None for b in report.blocks)
    assert probe.norm_block == {f"{n}.ln_{k}": i for i, n in enumerate(expected) for k in (1, 2)}


def test_swin_like_stages_resolve_to_their_blocks() -> None:
    torch.manual_seed(0)
    model = SwinLike((2, 2)).eval()
    expected = ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert names(model) == expected  # 4 layers, not 2 stages
    assert [s.name for s in find_stacks(model)] == ["layers.0.blocks", "layers.1.blocks"]
    _, raw, report = probe_blocks(model, torch.randn(2, 8, 16))
    assert raw.attention_calls == 4
    assert all(b.kappa_softmax is not None for b in report.blocks)
    assert [b.index for b in model_blocks(model)] == [0, 1, 2, 3]


def test_transformers_swin_gives_every_layer_of_every_stage() -> None:
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4
    )
    model = transformers.SwinModel(cfg)
    got = names(model)
    assert len(got) == 4
    assert all(".blocks." in n for n in got)


@pytest.mark.parametrize(
    ("build", "enc", "dec"),
    [
        (_t5, "encoder.block", "decoder.block"),
        (bart_stacks, "encoder.layers", "decoder.layers"),
        (_whisper, "encoder.layers", "decoder.layers"),
    ],
)
def test_encoder_decoders_measure_both_stacks_named_by_stack(build, enc, dec) -> None:  # type: ignore[no-untyped-def]
    blocks = model_blocks(build())
    assert [b.name for b in blocks] == [f"{enc}.{i}" for i in range(2)] + [f"{dec}.{i}" for i in range(3)]
    assert [b.stack for b in blocks] == [enc] * 2 + [dec] * 3
    assert [b.index for b in blocks] == list(range(5))
    for b in blocks[2:]:  # decoder layers: self- and cross-attention, both found
        assert len(b.qk) == 2 and len(b.wo) == 2, (b.name, b.qk, b.wo)


def test_bart_decoder_blocks_see_attention_in_a_real_forward() -> None:
    torch.manual_seed(0)
    model = bart_stacks().eval()
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    _, raw, report = probe_blocks(model, input_ids=ids, decoder_input_ids=ids[:, :5])
    assert [b.name for b in report.blocks][2:] == ["decoder.layers.0", "decoder.layers.1", "decoder.layers.2"]
    assert raw.attention_calls == 2 + 2 * 3  # encoder self; decoder self + cross
    assert all(b.kappa_softmax is not None and b.r_block is not None for b in report.blocks)


def test_torch_transformer_encoder_and_decoder() -> None:
    model = nn.Transformer(
        d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32
    )
    assert names(model) == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0"]
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), num_layers=3)
    assert names(enc) == ["layers.0", "layers.1", "layers.2"]


def test_decoder_and_encoder_families() -> None:
    models = _cfg_models()
    assert names(models["gpt2"]) == ["h.0", "h.1", "h.2"]
    assert names(models["llama"]) == ["layers.0", "layers.1", "layers.2"]
    assert names(models["bert"]) == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    vit = names(models["vit"])
    assert len(vit) == 3 and all(type(m).__name__ == "ViTLayer" for _, m in find_blocks(models["vit"]))


def test_nanogpt_transformer_h() -> None:
    assert names(NanoGPT()) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]


def test_a_uniform_sequential_mlp_inside_a_block_is_not_taken_for_blocks() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList(_BlockWithSequentialMLP(8) for _ in range(2))
    assert names(model) == ["blocks.0", "blocks.1"]


def test_without_attention_the_innermost_normed_stack_is_used() -> None:
    model = nn.Module()
    model.mixer = nn.Sequential(*[_ResMLPLayer(8) for _ in range(3)])
    assert names(model) == ["mixer.0", "mixer.1", "mixer.2"]


def test_star_stays_within_one_name_segment() -> None:
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=60)
    )
    all_names = [n for n, _ in model.named_modules() if n]
    assert sum(fnmatch.fnmatchcase(n, "transformer.h.*") for n in all_names) > 20  # fnmatch crosses dots
    assert [n for n, _ in find_blocks(model, ["transformer.h.*"])] == ["transformer.h.0", "transformer.h.1"]
    assert [n for n, _ in find_blocks(model, ["transformer.h.[1]"])] == ["transformer.h.1"]
    assert [n for n, _ in find_blocks(model, ["**.attn"])] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    # a match inside an earlier match is not a second block
    assert [n for n, _ in find_blocks(model, ["transformer.h.*", "**.attn"])] == [
        "transformer.h.0",
        "transformer.h.1",
    ]
    assert unmatched_patterns(model, ["transformer.h.*", "h.*", "nothing"]) == ["h.*", "nothing"]
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), num_layers=2)
    assert [n for n, _ in find_blocks(enc, ["**.layers.*"])] == ["layers.0", "layers.1"]  # **. may be empty
    assert [n for n, _ in find_blocks(bart_stacks(), ["**.layers.*"])] == [
        f"{stack}.layers.{i}" for stack, n in (("encoder", 2), ("decoder", 3)) for i in range(n)
    ]
    assert pattern_regex("a?c").match("abc") and not pattern_regex("a?c").match("a.c")
    assert pattern_regex("h.[!0]").match("h.1") and not pattern_regex("h.[!0]").match("h.0")


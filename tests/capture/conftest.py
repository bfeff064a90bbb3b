"""Shared model builders, probe runs and float64 references of the capture tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_stability.capture import (
    AttentionCall,
    AttentionCapture,
    StabilityProbe,
    compose_report,
)
from lightning_stability.capture.stacks import find_blocks
from lightning_stability.diagnostics import AttentionDiagnostics, kappa_score, kappa_softmax
from lightning_stability.stability_report import StabilityReport

try:
    import transformers
except ImportError:  # the tests building transformers models skip (importorskip in their modules)
    transformers = None


def small(cls_name: str, **kw):  # type: ignore[no-untyped-def]
    return getattr(transformers, cls_name)(**kw)


def vit(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = small(
        "ViTConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    )
    return transformers.ViTModel._from_config(cfg, attn_implementation=impl).eval()


def run_probe(
    model: nn.Module, x: torch.Tensor, dtype=torch.bfloat16, eps_mach=None, **kw
) -> StabilityReport:  # type: ignore[no-untyped-def]
    probe = StabilityProbe(model, **kw)
    raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=dtype))
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0, eps_mach=eps_mach)


class Attention(nn.Module):
    """Self-attention with an optional dropout inside the attention call, not tied to ``training``."""

    def __init__(self, d: int, heads: int, sdpa_dropout: float = 0.0, weights_dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.sdpa_dropout, self.weights_dropout = heads, sdpa_dropout, weights_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.weights_dropout:  # written out by hand, F.dropout(training=True)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1)
            out = F.dropout(p, self.weights_dropout, training=True) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.sdpa_dropout)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, **attn_kw: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, **attn_kw)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(
        self, depth: int = 3, d: int = 32, heads: int = 4, in_place: bool = False, **attn_kw: float
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d, heads, **attn_kw) for _ in range(depth))
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
            if self.in_place:
                x.mul_(0.5)  # scales the residual stream in place, after the block's hooks ran
        return x


def probe_input(seed: int = 0, b: int = 4, n: int = 16) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed))


def measure_model(
    model: nn.Module, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> StabilityReport:
    probe = StabilityProbe(model)
    raw = probe.measure(args, dict(kwargs or {}), lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)


def cond64(w: torch.Tensor) -> float:
    s = torch.linalg.svdvals(w.detach().double())
    return (s[0] / s[-1]).item()


class UnnamedOutAttention(nn.Module):
    """Multi-head attention whose output projection has a name no family uses (``mixer``)."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.mixer = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.mixer(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class NoWoBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = UnnamedOutAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NoWoModel(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NoWoBlock() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


WEIGHT_METRICS = ("wo_norm", "kappa_eff", "kappa_wkwq")


def measure_with(probe: StabilityProbe, x: torch.Tensor) -> StabilityReport:
    raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)


def weights(report: StabilityReport) -> list[tuple[float | None, ...]]:
    return [tuple(getattr(b, name) for name in WEIGHT_METRICS) for b in report.blocks]


def names(model: nn.Module) -> list[str]:
    return [name for name, _ in find_blocks(model)]


def probe_blocks(model: nn.Module, *args: torch.Tensor, **kwargs: object):  # type: ignore[no-untyped-def]
    probe = StabilityProbe(model)
    raw = probe.measure(args, dict(kwargs), lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    keys, vec = raw.flat()
    return probe, raw, compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)


def bart_stacks() -> nn.Module:
    cfg = transformers.BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=60,
        max_position_embeddings=32,
    )
    return transformers.BartModel(cfg)


class NanoGPTBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)


class NanoGPT(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(10, d),
                "h": nn.ModuleList(NanoGPTBlock(d) for _ in range(layers)),
                "ln_f": nn.LayerNorm(d),
            }
        )


class SDPAQK(TorchFunctionMode):
    """Records the q and k every ``F.scaled_dot_product_attention`` receives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **(kwargs or {}))


def kappa_per_head_ref(w_q_heads: list[torch.Tensor], w_k_heads: list[torch.Tensor]) -> torch.Tensor:
    """Independent reference: κ over the d_head leading singular values of the d×d W_Q^hᵀ W_K^h."""
    out = []
    for wq, wk in zip(w_q_heads, w_k_heads, strict=True):
        s = torch.linalg.svdvals(wq.T @ wk)
        out.append(s[0] / s[wq.shape[0] - 1])
    return torch.stack(out)


def model_qk(
    model: nn.Module, attention: nn.Module, d: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per query head, ``W_Q^h`` and the ``W_K`` head it uses, read from the model's own forward.

    The attention module's input is replaced by the identity (token i = e_i), biases are
    zero and every position id is 0 (rotary = identity), so the q/k the model hands to SDPA
    are ``W_Q^h e_i`` and ``W_K^h e_i``: the weights, split by the model's own code.
    """
    for m in attention.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        basis = torch.eye(d, dtype=torch.float64).unsqueeze(0)
        if args:
            return (basis, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": basis}

    mode = SDPAQK()
    handle = attention.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with mode, torch.no_grad():
            zeros = torch.zeros(1, d, dtype=torch.long)
            model(input_ids=zeros, position_ids=zeros)
    finally:
        handle.remove()
    q, k = mode.calls[0]  # the first layer's call: (1, H, d, d_head), (1, H_kv, d, d_head)
    heads, kv = q.shape[1], k.shape[1]
    return [q[0, h].T for h in range(heads)], [k[0, h // (heads // kv)].T for h in range(heads)]


def fused_family(name: str) -> tuple[nn.Module, Callable[[nn.Module], nn.Module]]:
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 60}
    if name == "gpt2":
        cfg: Any = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=60)
        model = transformers.GPT2Model._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m.h[0].attn
    if name == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(**common, intermediate_size=64)
        model = transformers.GPTNeoXModel._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m.layers[0].attention
    if name == "phi3":
        cfg = transformers.Phi3Config(**common, intermediate_size=64, num_key_value_heads=2, pad_token_id=0)
        model = transformers.Phi3Model._from_config(cfg, attn_implementation="sdpa")
        return model, lambda m: m.layers[0].self_attn
    falcon = {
        "falcon_gqa": {"new_decoder_architecture": True, "num_kv_heads": 2},
        "falcon_mqa": {"multi_query": True},
        "falcon_mha": {"multi_query": False},
    }[name]
    cfg = transformers.FalconConfig(**common, **falcon)
    model = transformers.FalconModel._from_config(cfg, attn_implementation="sdpa")
    return model, lambda m: m.h[0].self_attention


# ---- attention capture: float64 references, checks and small models

ATOL = 1e-5


def reference(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """softmax(scale·qkᵀ + bias, masked by keep) @ v in float64, and the rows with a kept key."""
    q, k, v = call.q.double(), call.k.double(), call.v.double()
    s = call.scale * q @ k.transpose(-1, -2)
    if call.bias is not None:
        s = s + call.bias.double()
    valid = torch.ones(s.shape[:-1], dtype=torch.bool)
    if call.keep is not None:
        keep = call.keep.expand(s.shape)
        s = s.masked_fill(~keep, float("-inf"))
        valid = keep.any(-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, valid


def heads_from(x: Tensor, n_heads: int) -> Tensor:
    """(B, n, H·d) → (B, H, n, d)."""
    b, n, hd = x.shape
    return x.reshape(b, n, n_heads, hd // n_heads).transpose(1, 2)


def assert_reproduces(call: AttentionCall, real: Tensor, atol: float = ATOL) -> None:
    """``real`` is the attention output (B, H, n_q, d_v); compare at rows with a kept key."""
    ref, valid = reference(call)
    assert ref.shape == real.shape, (ref.shape, real.shape)
    assert valid.any()
    diff = (ref - real.double()).abs().amax(-1)  # (B, H, n_q)
    assert float(diff[valid.expand(diff.shape)].max()) < atol


def record_inputs(module: nn.Module, store: list[Tensor]) -> Any:
    """Forward pre-hook collecting the first positional input (the heads' concatenated output)."""
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach()))


def no_leftovers(model: nn.Module) -> None:
    assert torch.overrides._get_current_function_mode_stack() == []
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_always_called


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.hd = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.hd)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


class SdpaBlock(nn.Module):
    """Pre-LN ViT-like block."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, kv_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))


class Tiny(nn.Module):
    def __init__(self, depth: int = 2, **kw: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SdpaBlock(**kw) for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        for blk in self.blocks:
            x = blk(x, mask, causal)
        return x


def run_captured(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, list[AttentionCall], int]:
    calls: list[AttentionCall] = []
    with AttentionCapture(model, calls.append) as cap:
        out = fn()
    return out, calls, cap.calls


def mha_out_from(call: AttentionCall, mha: nn.MultiheadAttention, batch_first: bool) -> Tensor:
    """Recompose the MHA module output from the captured call (fp64)."""
    o, _ = reference(call)  # (B, H, L, d)
    b, h, n, d = o.shape
    o = o.transpose(1, 2).reshape(b, n, h * d)
    y = F.linear(o, mha.out_proj.weight.double(), mha.out_proj.bias.double())
    return y if batch_first else y.transpose(0, 1)


F64 = torch.float64


RTOL = 2e-5  # float32 model arithmetic vs the float64 recomputation


def run_captured_no_grad(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, list[AttentionCall], int]:
    calls: list[AttentionCall] = []
    with torch.no_grad(), AttentionCapture(model, calls.append) as cap:
        out = fn()
    return out, calls, cap.calls


def ref_diagnostics(q: Tensor, k: Tensor, v: Tensor, s: Tensor, keep: Tensor | None) -> dict[str, Tensor]:
    """Independent float64 values from Q, K, V and the softmax input S (all float64)."""
    b, h, n_q, n_k = s.shape
    full = torch.ones(b, h, n_q, n_k, dtype=torch.bool) if keep is None else keep.expand(b, h, n_q, n_k)
    p = torch.softmax(s.masked_fill(~full, -math.inf), -1).nan_to_num(0.0)
    rows = full.any(-1)
    ent = (-torch.special.xlogy(p, p).sum(-1) * rows).sum(-1) / rows.sum(-1).clamp_min(1)
    kv = torch.ones(b, h, dtype=F64)
    for i in range(b):
        for j in range(h):
            used = full[i, j].any(0)
            if used.any():
                sv = torch.linalg.svdvals(v[i, j][used])
                kv[i, j] = max(1.0, (sv[0] / (sv[-1] + 1e-6)).item())
    return {
        "kappa_softmax": kappa_softmax(s, full),
        "kappa_score": kappa_score(q, k, full),
        "kappa_v": kv,
        "entropy": ent,
        "logit_max": s.abs().masked_fill(~full, 0.0).amax((-2, -1)),
    }


def assert_matches(d: AttentionDiagnostics, ref: dict[str, Tensor], rtol: float = RTOL) -> None:
    for name, want in ref.items():
        got = getattr(d, name)
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, rtol=rtol, atol=1e-9), (name, got, want)


def linear64(x: Tensor, lin: nn.Linear) -> Tensor:
    return F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())


class PaddedEncoder(nn.Module):
    """BERT-style encoder layer stack through SDPA; the mask is given as the model prepares it."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, dim = x.shape
        for qkv, out, norm in zip(self.qkv, self.out, self.norm, strict=True):
            q, k, v = qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = norm(x + out(o.transpose(1, 2).reshape(b, n, dim)))
        return x

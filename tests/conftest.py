"""Shared tiny models for the test suite."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("LITLOGGER_DISABLED", "1")
# The suite runs the diagnostics eagerly; tests of the compiled kernels ask for them (a cold
# inductor compile costs tens of seconds per graph on a shared CPU).
os.environ.setdefault("LIGHTNING_STABILITY_COMPILE", "off")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
warnings.filterwarnings("ignore", message=".*litlogger.*")

# conftest files hold fixtures and helpers, no doctests: not collected as doctest modules (a
# conftest of a sub-directory collected before this one would shadow its module name).
collect_ignore_glob = ["*conftest.py"]


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class PostLNBlock(nn.Module):
    """Post-LN block with the skip path scaled by α: ``LN(α·x + Attn(x))``, ``LN(α·x + MLP(x))``."""

    def __init__(self, d: int, heads: int, alpha: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln1, self.ln2, self.alpha = nn.LayerNorm(d), nn.LayerNorm(d), alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.ln1(self.alpha * x + a)
        return self.ln2(self.alpha * x + self.mlp(x))


class TinyTransformer(LightningModule):
    """Pre-LN Transformer classifier over (B, n, d_in) inputs: the suite's BoringModel."""

    def __init__(
        self,
        d_in: int = 8,
        d: int = 32,
        heads: int = 4,
        depth: int = 2,
        dropout: float = 0.0,
        n_classes: int = 3,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_loader(
    n: int = 32, tokens: int = 6, d_in: int = 8, batch_size: int = 8, seed: int = 0
) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, d_in, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer_kwargs(tmp_path, **extra):  # type: ignore[no-untyped-def]
    kw = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kw.update(extra)
    return kw


@pytest.fixture
def tiny_model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


class MemoryLogger(Logger):
    """Collects ``log_metrics`` calls: ``records`` is a list of ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


class SwiGLU(nn.Module):
    """SwiGLU FFN; ``massive`` > 0 plants massive activations before the down-projection.

    As in LLMs (Sun et al. 2024, "Massive activations in large language models"): the gate and
    up outputs of ``channels`` at the first token of every sequence are multiplied by
    ``massive``, so the down-projection's input carries ``massive²`` × its ordinary values there
    (10³ → 10⁶: past E4M3's per-tensor range of 448/2⁻⁹ ≈ 2.3·10⁵).
    """

    def __init__(
        self, d: int, hidden: int, massive: float = 0.0, channels: tuple[int, ...] = (3, 77)
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        gain = torch.ones(hidden)
        if massive:
            gain[list(channels)] = massive
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = F.silu(self.gate(x)), self.up(x)
        boost = torch.ones_like(g[:1])
        boost[:, 0] = self.gain
        return self.down((g * boost) * (u * boost))


class SwiGLUBlock(nn.Module):
    def __init__(self, d: int, heads: int, massive: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = SwiGLU(d, 2 * d, massive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwiGLULM(LightningModule):
    """Pre-LN language model with SwiGLU FFNs; ``massive`` plants massive activations in block ``planted``."""

    def __init__(
        self,
        massive: float = 0.0,
        vocab: int = 64,
        d: int = 64,
        depth: int = 3,
        heads: int = 4,
        planted: int = 1,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            SwiGLUBlock(d, heads, massive if i == planted else 0.0) for i in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        (ids,) = batch
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(
    n: int = 32, tokens: int = 33, vocab: int = 64, batch_size: int = 8, seed: int = 0
) -> DataLoader:
    """Random token sequences ``(ids,)`` for :class:`SwiGLULM` (next-token targets from the same ids)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randint(0, vocab, (n, tokens), generator=gen)), batch_size=batch_size
    )

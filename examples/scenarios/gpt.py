"""Small GPT on a synthetic Markov language: the instability scenarios of "Does it warn?".

One model, one data module; each scenario and its stable control differ in one
constructor argument (see ``configs/``)::

    python examples/scenarios/gpt.py fit --config examples/scenarios/configs/logit_growth.yaml
    python examples/scenarios/gpt.py fit --config examples/scenarios/configs/logit_growth_control.yaml

The model trains in FP32; the :class:`~lightning_stability.StabilityMonitor` in the
configs replays sampled batches under a BF16 or FP16 *what-if* autocast.

Besides the monitor's ``stability/*`` tags, the module writes its own per-step
ground truth with the same step convention as the monitor (Lightning's logging step of
the batch, ``trainer.global_step − 1`` after the update): ``train/loss``,
``train/grad_norm`` (before clipping), and
``scenario/*`` values of the *training* forward pass — ``scenario/act_max`` (the
largest |activation| anywhere in the model: FP16 overflows past 65504) and, per
block, ``scenario/block{i}/attn_logit_max`` and ``scenario/block{i}/amax``. These
are exploration values and ground truth for the evaluation; the alarm itself reads
the monitor's tags (``evaluate.py`` falls back to the ``scenario/`` copies only for
the signals this version of the monitor does not log yet, and says so).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_stability  # noqa: F401  (StabilityMonitor / LNEpsilonBump: short names for the CLI)
from lightning_stability.rules.thresholds import FP16_MAX

# --------------------------------------------------------------------------- data


def markov_language(vocab_size: int, branching: int, n_sequences: int, seq_len: int, seed: int) -> Tensor:
    """Sequences of a random first-order Markov chain: each token has ``branching`` successors.

    The transition matrix is fixed by ``seed`` (successors drawn without replacement,
    their probabilities from a flat Dirichlet), so its entropy rate — the best loss a
    model can reach — is well below ``log(vocab_size)``.

    Returns:
        ``(n_sequences, seq_len + 1)`` int64 token ids.
    """
    g = torch.Generator().manual_seed(seed)
    trans = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    for a in range(vocab_size):
        succ = torch.randperm(vocab_size, generator=g)[:branching]
        p = -torch.log(torch.rand(branching, generator=g, dtype=torch.float64))
        trans[a, succ] = p / p.sum()
    tokens = torch.empty(n_sequences, seq_len + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(vocab_size, (n_sequences,), generator=g)
    for t in range(seq_len):
        tokens[:, t + 1] = torch.multinomial(trans[tokens[:, t]], 1, generator=g).squeeze(1)
    return tokens


class MarkovDataModule(LightningDataModule):
    """Batches ``(x, y)`` of next-token prediction on :func:`markov_language`.

    Args:
        vocab_size: tokens of the language (must match the model's).
        branching: successors per token.
        seq_len: tokens per example.
        n_sequences: examples in the (fixed) training set.
        batch_size: examples per batch.
        seed: seed of the language and of the shuffling.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        branching: int = 4,
        seq_len: int = 64,
        n_sequences: int = 4096,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.branching = branching
        self.seq_len = seq_len
        self.n_sequences = n_sequences
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            tok = markov_language(self.vocab_size, self.branching, self.n_sequences, self.seq_len, self.seed)
            self.train_set = TensorDataset(tok[:, :-1].contiguous(), tok[:, 1:].contiguous())

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed + 1),
        )


# --------------------------------------------------------------------------- model


class Attention(nn.Module):
    """Causal multi-head attention through SDPA, optionally with qk-layernorm (Wortsman et al. 2023)."""

    def __init__(self, d_model: int, n_heads: int, qk_norm: bool, norm_eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.last_logit_max = 0.0

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.training:  # ground truth for the evaluation: max |scale·q·kᵀ| over attended keys
            with torch.no_grad():
                s = (q @ k.transpose(-2, -1)).abs() / math.sqrt(self.head_dim)
                causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                self.last_logit_max = float(s.masked_fill(~causal, 0.0).amax())
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Residual block, pre-LN (``x + f(norm(x))``) or post-LN (``norm(x + f(x))``)."""

    def __init__(
        self, d_model: int, n_heads: int, mlp_ratio: int, qk_norm: bool, norm_eps: float, post_ln: bool
    ) -> None:
        super().__init__()
        self.post_ln = post_ln
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, qk_norm, norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, mlp_ratio * d_model)

    def forward(self, x: Tensor) -> Tensor:
        if self.post_ln:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ScenarioGPT(LightningModule):
    """A 0.55 M-parameter GPT (defaults) whose constructor arguments switch each instability on.

    Args:
        vocab_size: tokens (must match the data module's).
        d_model: width.
        n_layers: blocks (``self.blocks``, an ``nn.ModuleList``).
        n_heads: attention heads.
        mlp_ratio: FFN hidden width over ``d_model``.
        max_len: longest sequence (learned positions).
        qk_norm: LayerNorm on queries and keys (the fix for attention-logit growth).
        post_ln: post-LN blocks instead of pre-LN.
        final_norm: LayerNorm before the output head; without it the residual stream
            is unnormalised and grows with the logits.
        embed_scale: standard deviation of the token/position embedding init (0.02 in GPT-2);
            a tiny value makes the first norms ε-dominated.
        norm_eps: ε of every LayerNorm.
        lr: peak AdamW learning rate.
        warmup_steps: linear warmup from 0 (0: start at the peak); constant afterwards.
        weight_decay: AdamW weight decay on matrices.
        betas: AdamW betas.
        seed: seed of the initialisation.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 2,
        max_len: int = 64,
        qk_norm: bool = False,
        post_ln: bool = False,
        final_norm: bool = True,
        embed_scale: float = 0.02,
        norm_eps: float = 1e-5,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, qk_norm, norm_eps, post_ln) for _ in range(n_layers)
        )
        self.norm_f = nn.LayerNorm(d_model, eps=norm_eps) if final_norm else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=embed_scale)
        nn.init.normal_(self.pos_emb, std=embed_scale)
        self._grad_norm = math.nan
        self._amax: dict[str, float] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok_emb(x) + self.pos_emb[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm_f(h))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        with _AmaxRecorder(self) as rec:
            logits = self(x)
        self._amax = rec.amax
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self._grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        logger = self.logger
        if logger is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        metrics = {"train/loss": float(loss), "train/grad_norm": self._grad_norm}
        metrics["scenario/act_max"] = max(self._amax.values(), default=math.nan)
        for i, block in enumerate(self.blocks):
            metrics[f"scenario/block{i}/attn_logit_max"] = block.attn.last_logit_max
            metrics[f"scenario/block{i}/amax"] = self._amax.get(f"blocks.{i}", math.nan)
        logger.log_metrics(metrics, step=self.trainer.global_step - 1)  # the monitor's (and Lightning's) step

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        warm = max(int(hp.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 if warm == 0 else min(1.0, (s + 1) / warm)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _AmaxRecorder:
    """Max |output| of every module of the training forward, by block (forward hooks, removed on exit)."""

    def __init__(self, model: ScenarioGPT) -> None:
        self.model = model
        self.amax: dict[str, float] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _AmaxRecorder:
        for name, module in self.model.named_modules():
            if not name:
                continue
            parts = name.split(".")
            group = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
            self._handles.append(module.register_forward_hook(self._hook(group)))
        return self

    def _hook(self, group: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.is_floating_point():
                v = float(out.detach().abs().amax())
                self.amax[group] = max(self.amax.get(group, 0.0), v)

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- entry point


def main(args: list[str] | None = None) -> LightningCLI:
    """LightningCLI over :class:`ScenarioGPT` and :class:`MarkovDataModule`."""
    return LightningCLI(ScenarioGPT, MarkovDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()


__all__ = ["FP16_MAX", "MarkovDataModule", "ScenarioGPT", "main", "markov_language"]

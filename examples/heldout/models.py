"""The held-out model families, built from configs with random init, and one LightningModule around them.

Families (all tiny: width 64, 2–4 blocks, 4 heads):

* ``gpt`` — the project's own pre-LN GPT (``examples/scenarios/gpt.py``'s ``ScenarioGPT``, used as
  a plain ``nn.Module``), byte-level language modelling;
* ``llama`` — transformers ``LlamaForCausalLM`` (RMSNorm, SwiGLU, RoPE); ``qk_norm=True`` builds
  ``Qwen3ForCausalLM`` with the same sizes instead — Llama plus an RMSNorm on each head's queries and
  keys, the one difference of the attention-logit control;
* ``vit`` — transformers ``ViTForImageClassification`` (pre-LN) on 8×8 digits, 2×2 patches;
* ``bert`` — transformers ``BertForMaskedLM`` (post-LN encoder), byte-level masked language modelling.

:class:`HeldoutModule` trains any of them in FP32 with AdamW (linear warmup, then constant) and logs,
at every optimizer step, with the monitor's step convention (``trainer.global_step − 1``):
``train/loss`` (the cross-entropy, without z-loss), ``train/grad_norm`` (before any clipping),
``train/whatif_loss`` (the same batch's cross-entropy from a forward without gradients under the
measured low-precision autocast, BF16 or FP16 — the loss that precision would have reported) and
``train/logit_absmax`` (largest |output logit|, for the figures).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from heldout.data import BYTE_VOCAB, MASK_ID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scenarios"))

WHATIF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_backbone(family: str, arch: dict[str, Any], seed: int) -> nn.Module:
    """A randomly initialised model of ``family`` whose ``forward(x)`` returns logits.

    Args:
        family: ``"gpt"``, ``"llama"``, ``"vit"`` or ``"bert"``.
        arch: config overrides: ``d`` (width), ``layers``, ``heads``, ``seq_len``, ``qk_norm``,
            ``norm_eps`` and ``init_std`` (transformers ``initializer_range`` / GPT ``embed_scale``).
        seed: seed of the initialisation.
    """
    torch.manual_seed(seed)
    d, layers, heads = arch.get("d", 64), arch.get("layers", 2), arch.get("heads", 4)
    if family == "gpt":
        from gpt import ScenarioGPT

        return _Logits(
            ScenarioGPT(
                vocab_size=BYTE_VOCAB,
                d_model=d,
                n_layers=layers,
                n_heads=heads,
                max_len=arch.get("seq_len", 64),
                qk_norm=arch.get("qk_norm", False),
                embed_scale=arch.get("init_std", 0.02),
                norm_eps=arch.get("norm_eps", 1e-5),
                seed=seed,
            )
        )
    common = {
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * d,
        "initializer_range": arch.get("init_std", 0.02),
    }
    if family == "llama":
        return _Logits(_decoder(common, d // heads, arch))
    if family == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=arch.get("norm_eps", 1e-12),
            **common,
        )
        cfg._attn_implementation = "sdpa"
        return _Logits(ViTForImageClassification(cfg))
    if family == "bert":
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(
            vocab_size=MASK_ID + 2,
            pad_token_id=MASK_ID + 1,
            max_position_embeddings=arch.get("seq_len", 64),
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=arch.get("norm_eps", 1e-12),
            **common,
        )
        cfg._attn_implementation = "sdpa"
        return _Logits(BertForMaskedLM(cfg))
    raise ValueError(f"unknown family {family!r}")


def _decoder(common: dict[str, Any], head_dim: int, arch: dict[str, Any]) -> nn.Module:
    """Llama, or Qwen3 (= Llama + per-head q/k RMSNorm) when ``arch["qk_norm"]``."""
    kwargs = dict(
        common,
        vocab_size=BYTE_VOCAB,
        num_key_value_heads=common["num_attention_heads"],
        head_dim=head_dim,
        max_position_embeddings=arch.get("seq_len", 64),
        rms_norm_eps=arch.get("norm_eps", 1e-6),
        tie_word_embeddings=False,
    )
    if arch.get("qk_norm", False):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(**kwargs)
        cfg._attn_implementation = "sdpa"
        return Qwen3ForCausalLM(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**kwargs)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


class _Logits(nn.Module):
    """``forward(x) -> logits`` over a transformers model (``.logits``) or a module returning a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out if isinstance(out, Tensor) else out.logits


class HeldoutModule(LightningModule):
    """One held-out run: a family, its config overrides and the optimizer settings.

    Args:
        family: see :func:`build_backbone`.
        arch: config overrides (see :func:`build_backbone`).
        whatif: the low precision of ``train/whatif_loss`` (``"bf16"`` or ``"fp16"``): the one
            the monitor measures.
        lr: peak AdamW learning rate.
        warmup_steps: linear warmup from ``lr / warmup_steps``; constant afterwards.
        weight_decay: AdamW weight decay on matrices (≥ 2-D parameters).
        adam_eps: AdamW ε.
        betas: AdamW betas.
        z_loss: coefficient of the z-loss ``mean(log Z)²`` added to the training loss
            (PaLM; Wortsman et al. 2023 use 1e-4); 0 turns it off.
        seed: seed of the initialisation.
    """

    def __init__(
        self,
        family: str,
        arch: dict[str, Any] | None = None,
        whatif: str = "bf16",
        lr: float = 1e-3,
        warmup_steps: int = 20,
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.95),
        z_loss: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if whatif not in WHATIF_DTYPES:
            raise ValueError(f"`whatif` must be one of {sorted(WHATIF_DTYPES)}, got {whatif!r}")
        self.save_hyperparameters()
        self.backbone = build_backbone(family, arch or {}, seed)
        self._grad_norm = math.nan

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _ce(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        ce = self._ce(logits, y)
        loss = ce
        if self.hparams.z_loss > 0:
            loss = loss + self.hparams.z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        with torch.no_grad():
            self._step_values = {"train/loss": float(ce), "train/logit_absmax": float(logits.abs().amax())}
            with torch.autocast("cpu", dtype=WHATIF_DTYPES[self.hparams.whatif]):
                self._step_values["train/whatif_loss"] = float(self._ce(self(x), y))
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self._grad_norm = float(torch.linalg.vector_norm(torch.stack(grads)))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.logger is not None:
            values = dict(self._step_values, **{"train/grad_norm": self._grad_norm})
            self.logger.log_metrics(values, step=self.trainer.global_step - 1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.adam_eps,
        )
        warm = max(int(hp.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 if warm == 0 else min(1.0, (s + 1) / warm)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

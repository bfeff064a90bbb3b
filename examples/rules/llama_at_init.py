"""Healthy models at initialisation: where their block-local error sits, and what the rule book advises.

Builds transformers Llamas from configs (random init, no download), fits one step at lr 0 under a
``StabilityMonitor`` measuring the BF16 what-if, and records per block ``r_local / ε_mach`` (with the
attention and FFN sub-layers), how far block 0 stands out against the other blocks' median, and the
monitor's judgement (status, advice). The numbers behind ``FP32_ADVICE_FLOOR_EPS`` in ``docs/RULES.md``::

    python examples/rules/llama_at_init.py --out docs/examples/llama_at_init.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability import StabilityMonitor
from lightning_stability.rules.thresholds import FP32_ADVICE_FLOOR_EPS, STANDS_OUT

#: (hidden size, layers) of the Llamas measured; heads of 64 dimensions.
CONFIGS = [(256, 4), (512, 4), (512, 6), (768, 3)]


class Llama(LightningModule):
    """``LlamaForCausalLM`` from a config; lr 0, so it stays at initialisation."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        config = transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3 // 8 * 8,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            vocab_size=1000,
            max_position_embeddings=128,
        )
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def measure(hidden: int, layers: int, seed: int) -> dict[str, Any]:
    """One Llama at initialisation: per-block errors in ε_mach and the monitor's judgement."""
    torch.manual_seed(seed)
    model = Llama(hidden, layers)
    x = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(seed))
    monitor = StabilityMonitor(every_n_steps=1, sample_size=8, precision="bf16")
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8))
    report, judgement = monitor.last_report, monitor.judgement
    assert report is not None and judgement is not None
    eps = report.eps_mach

    def per_eps(v: float | None) -> float | None:
        return None if v is None else round(v / eps, 3)

    blocks = [
        {
            "r_local": per_eps(b.r_local),
            "attention": per_eps(b.r_attention_local),
            "ffn": per_eps(b.r_ffn_local),
        }
        for b in report.blocks
    ]
    worst = judgement.extremes["r_local"]
    return {
        "hidden": hidden,
        "layers": layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "blocks_r_local_over_eps_mach": blocks,
        "worst_block": worst.block,
        "worst_over_eps_mach": round(worst.value, 3),
        "worst_over_others_median": None
        if not worst.others_median
        else round(worst.value / worst.others_median, 2),
        "status": judgement.status,
        "advice": [a.kind for a in judgement.advice],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/examples/llama_at_init.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    runs = [measure(h, n, args.seed) for h, n in CONFIGS]
    result = {
        "command": "python examples/rules/llama_at_init.py --out " + str(args.out),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "fp32_advice_floor_eps": FP32_ADVICE_FLOOR_EPS,
        "stands_out": STANDS_OUT,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(
            f"Llama hidden {r['hidden']} x {r['layers']} ({r['parameters'] / 1e6:.1f} M): "
            f"block {r['worst_block']} r_local = {r['worst_over_eps_mach']} ε_mach, "
            f"{r['worst_over_others_median']}x the others' median; status {r['status']}, advice {r['advice']}"
        )
    return result


if __name__ == "__main__":
    main()

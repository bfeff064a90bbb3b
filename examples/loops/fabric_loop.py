"""A Fabric training loop measured with ``lightning_stability.StabilityMeter``.

A small causal language model (``torch.nn.TransformerEncoder`` with a causal mask) learns a
random first-order Markov language in BF16 autocast. Every ``--every`` steps the meter measures
the batch just trained on; ``fabric.log_dict(report.metrics(), step=step)`` logs exactly the tags
the ``StabilityMonitor`` callback logs, and the run ends with the rule book's verdict.

    python examples/loops/fabric_loop.py            # 200 steps, measured every 20
    python examples/loops/fabric_loop.py --quick    # 6 steps, measured every 2 (CI)

Writes ``<out>/metrics.csv`` (Fabric's ``CSVLogger``) and prints the verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from torch import nn

from lightning_stability import StabilityMeter

VOCAB, SEQ = 64, 32


class CausalLM(nn.Module):
    """Token and position embeddings, pre-LN Transformer layers with a causal mask, a tied head."""

    def __init__(self, d: int = 64, heads: int = 4, depth: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        x = self.layers(self.tok(idx) + self.pos[:n], mask=mask, is_causal=True)
        return self.norm(x) @ self.tok.weight.T


def markov_batches(steps: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` batches of ``(batch, SEQ + 1)`` tokens from a random transition table."""
    g = torch.Generator().manual_seed(seed)
    table = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=g), -1)
    out = []
    for _ in range(steps):
        tok = torch.randint(0, VOCAB, (batch, 1), generator=g)
        for _ in range(SEQ):
            tok = torch.cat([tok, torch.multinomial(table[tok[:, -1]], 1, generator=g)], 1)
        out.append(tok)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="6 steps, measured every 2 (CI)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="measure every this many steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/fabric_loop"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.batch = 6, 2, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, measure every ``--every`` steps, log, and return the verdict and the logged rows."""
    args = parse(argv)
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed", loggers=CSVLogger(args.out))
    fabric.launch()
    fabric.seed_everything(0)
    model = CausalLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    # the meter measures the original module, in Fabric's own autocast
    meter = StabilityMeter(model, precision=fabric.autocast, sample_size=4)
    logged = []
    for step, tokens in enumerate(markov_batches(args.steps, args.batch), start=1):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        fabric.log("train/loss", loss.item(), step=step)
        if step % args.every == 0:
            report = meter.measure(inputs, step=step)
            fabric.log_dict(report.metrics(), step=step)
            logged.append(report.metrics())
            fabric.print(f"step {step}: loss {loss.item():.3f}, r_block {report.r_block:.2e}")
    fabric.logger.finalize("success")
    fabric.print(meter.summary())
    return {"judgement": meter.judgement(), "logged": logged, "out": args.out}


if __name__ == "__main__":
    main()

"""litgpt's ``GPT`` trained in a plain PyTorch loop, measured with ``lightning_stability.measure``.

Three litgpt architectures, scaled down from their configs with random initialisation (no
weights are downloaded): Pythia (GPT-NeoX: LayerNorm, parallel residual), Llama-3.2 (grouped-query
attention, RoPE, RMSNorm, gated MLP) and Gemma-2 (grouped-query attention, attention-logit
soft-capping, a sliding window every other layer). Each learns a random Markov language in BF16
autocast; every ``--every`` steps ``measure(model, tokens, precision="bf16")`` returns the
report whose ``metrics()`` a logger would take, and ``judge_reports`` gives the run's verdict.

    python examples/loops/litgpt_loop.py             # 100 steps each, measured every 10
    python examples/loops/litgpt_loop.py --quick     # 4 steps each, measured every 2 (CI)

Needs litgpt (``pip install --no-deps litgpt psutil``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import judge_reports, measure
from lightning_stability.stability_report import StabilityReport

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the Fabric example beside it
from fabric_loop import SEQ, VOCAB, markov_batches

#: litgpt config name -> key/value head groups of the scaled-down model (4 query heads)
MODELS = {"pythia-14m": 4, "Llama-3.2-1B": 2, "gemma-2-2b": 2}


def build(name: str, layers: int = 2) -> nn.Module:
    """litgpt's ``GPT`` of config ``name``, scaled down: 4 heads of 16, width 64, random init."""
    from litgpt.config import Config
    from litgpt.model import GPT

    kw: dict[str, Any] = dict(
        n_layer=layers, n_embd=64, n_head=4, head_size=16, n_query_groups=MODELS[name],
        intermediate_size=128, padded_vocab_size=VOCAB, vocab_size=VOCAB, block_size=SEQ,
    )  # fmt: skip
    if Config.from_name(name).sliding_window_size is not None:
        kw["sliding_window_size"] = 8
    torch.manual_seed(0)
    return GPT(Config.from_name(name, **kw))


def train(name: str, steps: int, every: int, batch: int) -> list[StabilityReport]:
    """Train ``name`` for ``steps`` steps in BF16 autocast; a report every ``every`` steps."""
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reports = []
    for step, tokens in enumerate(markov_batches(steps, batch), start=1):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % every == 0:  # e.g. logger.log_metrics(report.metrics(), step=step)
            report = measure(model, inputs, precision="bf16", sample_size=4, step=step)
            reports.append(report)
            block = report.blocks[-1]
            print(
                f"{name} step {step}: loss {loss.item():.3f}, r_block {report.r_block:.2e}, "
                f"attn_logit_max {report.attn_logit_max:.3g}, last block kappa_wkwq {block.kappa_wkwq:.3g}"
            )
    return reports


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 steps each, measured every 2 (CI)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.batch = 4, 2, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, list[StabilityReport]]:
    """Each model's reports; prints each run's verdict."""
    args = parse(argv)
    runs = {}
    for name in args.models:
        reports = train(name, args.steps, args.every, args.batch)
        verdict = judge_reports(reports)
        print(f"{name}: {verdict.status} over {verdict.steps} measured step(s)")
        runs[name] = reports
    return runs


if __name__ == "__main__":
    main()

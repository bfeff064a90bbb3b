"""How far do the monitored weights move per step? Decides whether weight spectra can be reused.

    python examples/benchmarks/bench_weight_drift.py [--steps 195] [--quick] [--out FILE.json]

Trains the main job's model (``examples/configs/tiny_vit.yaml``: Tiny-ViT d=96, depth 6, AdamW
lr 1e-3, weight decay 0.05, 10 warmup steps then cosine to 0, batch 64, FP32, synthetic data)
and after every optimizer step measures, for each weight the probe conditions (``W_O``, the FFN
weights, and per head ``M_h = W_Q^hᵀ W_K^h``), the drift since the previous step relative to the
smallest singular value: ``‖ΔW‖_F/σmin(W)`` and ``‖ΔW‖₂/σmin(W)`` (float64).

Why that ratio: by Weyl, ``|σ_i(W+E) − σ_i(W)| ≤ ‖E‖₂ ≤ ‖E‖_F``, so a κ reused from the previous
step is off by at most ``≈ (‖E‖/σmax + ‖E‖/σmin) ≤ 2‖E‖/σmin`` relative. Reuse would be certified
within the probe's documented tolerance (1e-4 relative, the tests' bar against float64) only
when that bound, summed over the steps since the last exact computation, stays below 1e-4.
Printed: per kind, quantiles over steps and weights of both ratios, and the smallest bound seen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ → ``import tiny_vit``

from lightning_stability.capture.probe import StabilityProbe
from tiny_vit import CIFAR10DataModule, TinyViT

TOLERANCE = 1e-4


def monitored(probe: StabilityProbe) -> dict[str, torch.Tensor]:
    """Every weight the probe conditions, as float64 copies: ``W_O``, FFN, ``W_Q^hᵀ W_K^h``."""
    out: dict[str, torch.Tensor] = {}
    for block in probe.blocks:
        for kind, fns in (("wo", block.wo), ("ffn", block.ffn)):
            for name, fn in fns.items():
                out[f"{kind}/block{block.index}/{name}"] = fn().detach().double().clone()
        for j, proj in enumerate(block.qk):
            heads = proj.n_heads or 4
            w_q, w_k = (w.detach().double() for w in proj.pair(heads))
            dh = w_q.shape[0] // heads
            for h in range(heads):
                q, k = w_q[h * dh : (h + 1) * dh], w_k[h * dh : (h + 1) * dh]
                out[f"wkwq/block{block.index}/{j}/head{h}"] = q.T @ k  # d_in × d_in, rank d_head
    return out


def sigma_min(name: str, w: torch.Tensor, heads: int = 4) -> float:
    s = torch.linalg.svdvals(w)
    if name.startswith("wkwq"):  # M_h has rank d_head: its κ runs over the d_head leading values
        return float(s[w.shape[0] // heads - 1]) if w.shape[0] >= heads else float(s[-1])
    return float(s[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=195)
    parser.add_argument("--quick", action="store_true", help="d=16, 2 blocks, 6 steps")
    parser.add_argument("--out", default=None)
    cfg = parser.parse_args()
    torch.manual_seed(0)
    steps = 6 if cfg.quick else cfg.steps
    kw = {"d_model": 16, "depth": 2, "n_heads": 4, "patch_size": 8} if cfg.quick else {}
    model = TinyViT(lr=1e-3, weight_decay=0.05, warmup_steps=10, **kw)
    dm = CIFAR10DataModule(batch_size=64, synthetic_size=2048, seed=0)
    dm.setup("fit")
    # the same optimizer and schedule as configure_optimizers (without a Trainer)
    no_decay = {"cls_token", "pos_embed"}
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in no_decay]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}], lr=1e-3
    )
    warmup = min(10, steps)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    loader = iter(dm.train_dataloader())
    probe = StabilityProbe(model)
    before = monitored(probe)
    rows: list[dict[str, float | int | str]] = []
    for step in range(steps):
        try:
            images, labels = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            images, labels = next(loader)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        after = monitored(probe)
        for name, w in after.items():
            delta = w - before[name]
            smin = sigma_min(name, before[name])
            fro = float(torch.linalg.matrix_norm(delta))
            two = float(torch.linalg.matrix_norm(delta, ord=2))
            rows.append(
                {
                    "step": step + 1,
                    "weight": name,
                    "fro_over_smin": fro / smin if smin > 0 else math.inf,
                    "spec_over_smin": two / smin if smin > 0 else math.inf,
                }
            )
        before = after
    report(rows)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(rows))


def report(rows: list[dict[str, float | int | str]]) -> None:
    kinds = sorted({str(r["weight"]).split("/")[0] for r in rows})
    print(f"{'kind':6s} {'ratio':16s} {'min':>9s} {'p10':>9s} {'median':>9s} {'max':>9s}")
    for kind in kinds:
        for key in ("fro_over_smin", "spec_over_smin"):
            v = torch.tensor([float(r[key]) for r in rows if str(r["weight"]).startswith(kind)])
            q = torch.quantile(v, torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=v.dtype))
            print(f"{kind:6s} {key:16s} " + " ".join(f"{x:9.2e}" for x in q.tolist()))
    best = min(rows, key=lambda r: float(r["spec_over_smin"]))
    bound = 2 * float(best["spec_over_smin"])
    print(
        f"smallest one-step κ bound 2‖ΔW‖₂/σmin = {bound:.2e} ({best['weight']}, step {best['step']}); "
        f"the tolerance is {TOLERANCE:.0e}: reuse is "
        f"{'never' if bound > TOLERANCE else 'sometimes'} certified"
    )
    last = max(int(r["step"]) for r in rows)
    worst_last = max(float(r["spec_over_smin"]) for r in rows if r["step"] == last)
    print(f"at the last step (learning rate near 0) the largest 2‖ΔW‖₂/σmin is {2 * worst_last:.2e}")


if __name__ == "__main__":
    main()

"""Can the weight terms be reused across sampled steps, certified, on a realistic run? Measured.

Trains a transformers Llama from a config (random init, byte-level vocabulary 256) on text that
ships with Python (the standard library's sources), AdamW with warmup and cosine decay, and
plays the monitor at sampling intervals ``n`` ∈ {1, 10, 50} (50 is the monitor's default). At
each sampled step and for each weight term the probe computes — ``κ(W)`` of every FFN matrix,
``‖W_O‖₂`` and ``κ(W_O)``, ``κ(W_Q^hᵀ W_K^h)`` per head — it asks whether the value kept from
the last exact computation may be logged instead, certified within the package's tolerance
(1e-4 relative), by two rules. The kept value is always the previous sampled step's exact one
(the most favourable case: a value reused more than once drifts further). Judged at every 5th
step for ``n = 1`` and every ``n``-th step otherwise.

- **Weyl**: ``|σ_i(W) − σ_i(W₀)| ≤ ‖W − W₀‖₂ ≤ ‖W − W₀‖_F =: δ`` (the Frobenius norm is the
  cheap rigorous upper bound; a kept copy ``W₀`` of every weight is its memory cost), so
  ``κ(W)/κ(W₀) − 1 ∈ [(1 − δ/σmax)/(1 + δ/σmin) − 1, (1 + δ/σmax)/(1 − δ/σmin) − 1]``;
  also reported with the exact ``‖W − W₀‖₂`` (an ideal no cheap bound reaches).
- **kept subspace**: the extreme singular vectors of ``W₀`` (a block of 8 at each end) kept,
  and ``W`` certified on their span (``extremal.certify``: a float64 Rayleigh–Ritz step and its
  residual bound, two passes over ``W``): reused when both ends certify to 1e-5 relative.

Printed and written (``--out``): per kind and interval, the fraction of (weight, sampled step)
pairs each rule would have reused, and the smallest and median relative bound the Weyl rules give.

    python examples/benchmarks/bench_weight_reuse.py [--steps 400] [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timing helpers

from bench_overhead import machine_line

from lightning_stability.diagnostics.extremal import certify

TOLERANCE = 1e-4
INTERVALS = (1, 10, 50)
KEEP = 8


def stdlib_bytes(limit: int) -> Tensor:
    """Up to ``limit`` bytes of the Python standard library's sources, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    size = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)


def weights(model: Any, heads: int) -> dict[str, Tensor]:
    """The probe's conditioned weights as float64 copies; Q/K as per-head ``W_Q^hᵀ W_K^h``."""
    out: dict[str, Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"ffn/{i}/{name}"] = getattr(layer.mlp, name).weight.detach().double().clone()
        out[f"wo/{i}"] = layer.self_attn.o_proj.weight.detach().double().clone()
        q = layer.self_attn.q_proj.weight.detach().double()
        k = layer.self_attn.k_proj.weight.detach().double()
        dh = q.shape[0] // heads
        for h in range(heads):
            out[f"wkwq/{i}/{h}"] = q[h * dh : (h + 1) * dh].T @ k[h * dh : (h + 1) * dh]
    return out


def kept_state(name: str, w: Tensor, rank: int) -> dict[str, Any]:
    """What an exact computation would keep: σmax, σmin (over the rank that counts), the
    weight, and the extreme right singular vectors."""
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = rank if name.startswith("wkwq") else s.shape[0]
    vectors = torch.cat([vh[:KEEP], vh[max(0, r - KEEP) : r]]).T
    return {"w": w, "smax": float(s[0]), "smin": float(s[r - 1]), "vectors": vectors}


def weyl_rel(smax: float, smin: float, delta: float) -> float:
    """Largest relative change of κ = σmax/σmin (and of σmax) Weyl allows for a change ``δ``."""
    if delta >= smin:
        return math.inf
    return max((1 + delta / smax) / (1 - delta / smin) - 1, 1 - (1 - delta / smax) / (1 + delta / smin))


def judge(name: str, state: dict[str, Any], w: Tensor) -> dict[str, tuple[bool, float]]:
    """Per rule, (reusable, the relative bound it gives; NaN for the subspace rule)."""
    diff = w - state["w"]
    fro, two = float(torch.linalg.matrix_norm(diff)), float(torch.linalg.matrix_norm(diff, ord=2))
    kinds = ("kappa",) if not name.startswith("wo") else ("kappa", "norm")
    out: dict[str, tuple[bool, float]] = {}
    for kind in kinds:
        smax, smin = state["smax"], state["smin"]
        rel_f = fro / smax if kind == "norm" else weyl_rel(smax, smin, fro)
        rel_2 = two / smax if kind == "norm" else weyl_rel(smax, smin, two)
        out[f"{kind}/weyl_fro"] = (rel_f <= TOLERANCE, rel_f)
        out[f"{kind}/weyl_exact_norm"] = (rel_2 <= TOLERANCE, rel_2)
    if not name.startswith("wkwq"):  # the product has rank d_head: its σmin is not an end
        hi, lo, e_hi, e_lo = certify(w[None], state["vectors"][None])
        ok_hi = bool(e_hi[0] <= 1e-5 * hi[0])
        out["kappa/subspace"] = (ok_hi and bool(e_lo[0] <= 1e-5 * lo[0]), math.nan)
        if name.startswith("wo"):
            out["norm/subspace"] = (ok_hi, math.nan)
    return out


def train(cfg: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d, layers, heads = (64, 2, 4) if cfg.quick else (cfg.d, cfg.layers, cfg.heads)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=d,
        intermediate_size=256 * math.ceil(int(8 * d / 3) / 256),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=cfg.seq,
    )
    model = LlamaForCausalLM(config)
    data = stdlib_bytes(4 << 20).long()
    steps = 12 if cfg.quick else cfg.steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(1)
    # judged at step t against the exact state of step t − n: every 5th step for n = 1, every
    # n-th step otherwise (fewer exact computations than every step, the same question)
    judged = {n: {t for t in range(2 * n, steps + 1, max(n, 5))} for n in INTERVALS}
    needed = {t - n for n, ts in judged.items() for t in ts}
    kept: dict[int, dict[str, dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    dh = d // heads
    for step in range(1, steps + 1):
        starts = torch.randint(0, data.numel() - cfg.seq - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([data[s : s + cfg.seq + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        due = [n for n in INTERVALS if step in judged[n]]
        if due or step in needed:
            current = weights(model, heads)
        for n in due:
            for name, w in current.items():
                for rule, (ok, bound) in judge(name, kept[step - n][name], w).items():
                    rows.append(
                        {
                            "step": step,
                            "interval": n,
                            "weight": name,
                            "rule": rule,
                            "reuse": ok,
                            "bound": bound,
                        }
                    )
        if step in needed:
            kept[step] = {name: kept_state(name, w, dh) for name, w in current.items()}
        for old in [t for t in kept if all(t + n not in judged[n] or t + n <= step for n in INTERVALS)]:
            del kept[old]
        if step % 50 == 0 or step == steps:
            print(f"step {step}: loss {loss.item():.3f}, lr {sched.get_last_lr()[0]:.2e}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind, rule and interval: the reusable fraction and the bound's quantiles."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['weight'].split('/')[0]}/{r['rule']}/every_{r['interval']}", []).append(r)
    for key in sorted(groups):
        rs = groups[key]
        bounds = sorted(float(r["bound"]) for r in rs if not math.isnan(r["bound"]))
        entry = {"reusable": sum(bool(r["reuse"]) for r in rs) / len(rs), "count": float(len(rs))}
        if bounds:
            entry.update(bound_min=bounds[0], bound_median=bounds[len(bounds) // 2])
        out[key] = entry
        extra = f"  bound min {bounds[0]:.1e} median {bounds[len(bounds) // 2]:.1e}" if bounds else ""
        print(f"{key:40s} reusable {entry['reusable']:7.2%} of {len(rs)}{extra}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--quick", action="store_true", help="d=64, 2 layers, 12 steps")
    ap.add_argument("--out", type=Path)
    cfg = ap.parse_args()
    machine = machine_line(torch.device("cpu"))
    t0 = time.perf_counter()
    rows = train(cfg)
    result = {
        "command": "python examples/benchmarks/bench_weight_reuse.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "seconds": time.perf_counter() - t0,
        "tolerance": TOLERANCE,
        "by_rule": summary(rows),
    }
    if cfg.out:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The monitor's sampled step per rank for Llama-2 7B and 70B under FSDP2, on paper.

Arithmetic, not a run: bytes and flops of what the probe holds and computes at a sampled step,
per rank of a data-parallel FSDP2 job (``fully_shard`` per block, FP32 master weights, BF16
compute), each rank measuring ``S`` examples of ``n`` tokens of its own micro-batch. CPU seconds
are extrapolated from the committed measurements of this machine (``bench_scale.py``,
``bench_extremal_sv.py``): the FP32/BF16 forward rates of the largest model measured, and the
weight routes' time per matrix fitted as ``a·d^p`` on the widths measured.

What the probe holds (FP32 unless said):

- one block's weights gathered in FP32 (the exact reference must use the master weights; a
  gather of the whole model would be ``P·4`` bytes): ``P_block·4``;
- the weight terms' work on the largest matrix (an FFN weight, solved alone: it exceeds
  ``BATCH_BYTES``): its float64 and float32 copies, the float32 Gram, the Krylov basis (or
  ``W_O``'s float64 copy and LU factors, if larger);
- the activations kept from the exact pass: every block's output (the low-precision pass is
  compared against it) and, with local errors, the FFN sub-layer's input and output and the
  attention sub-layer's output: ``4·L·S·n·d·4`` bytes (``1·…`` without local errors);
- one layer's attention probabilities while its diagnostics run: ``S·H·n²·4``;
- the passes' own transient activations, the largest the FFN hidden state ``S·n·I·4``.

    python examples/benchmarks/scale_paper.py [--scale docs/scale/scale.json]
        [--extremal docs/scale/extremal.json] [--out docs/scale/paper.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

GiB = 2.0**30
#: name: d, layers, query heads, key/value heads, FFN width, vocabulary, context used here
MODELS = {
    "llama2-7b": {"d": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "ffn": 11008, "vocab": 32000},
    "llama2-70b": {"d": 8192, "layers": 80, "heads": 64, "kv_heads": 8, "ffn": 28672, "vocab": 32000},
}
BLOCK = 8  # the Krylov block width of diagnostics.extremal


def block_params(m: dict[str, int]) -> int:
    d, dh = m["d"], m["d"] // m["heads"]
    attention = 2 * d * m["heads"] * dh + 2 * d * m["kv_heads"] * dh
    return attention + 3 * d * m["ffn"] + 2 * d


def model_params(m: dict[str, int]) -> int:
    return m["layers"] * block_params(m) + 2 * m["vocab"] * m["d"] + m["d"]


def memory(m: dict[str, int], sample: int, seq: int, local: bool) -> dict[str, float]:
    """Bytes the probe holds at a sampled step, per rank, by part (see the module docstring)."""
    d, ffn, layers = m["d"], m["ffn"], m["layers"]
    krylov_dim = 64 + 2 * round(d ** (2 / 3))
    act = sample * seq * d * 4
    return {
        "block_weights_fp32": block_params(m) * 4.0,
        "weight_terms": max(ffn * d * (8 + 4) + ffn * 2 * BLOCK * 8, d * d * 2 * 8) + 2 * krylov_dim * d * 8,
        "kept_activations": (4 if local else 1) * layers * act,
        "attention_probabilities": sample * m["heads"] * seq * seq * 4.0,
        "pass_transients": sample * seq * ffn * 4.0,
    }


def flops(m: dict[str, int], sample: int, seq: int, batch: int) -> dict[str, float]:
    """Floating-point operations per rank: the probe's passes, its weight terms, a training step."""
    d, ffn, layers = m["d"], m["ffn"], m["layers"]
    dh = d // m["heads"]
    tokens = sample * seq
    body = layers * block_params(m) + m["vocab"] * d  # the output projection; embeddings are lookups
    attention = 4.0 * layers * sample * seq * seq * d  # QKᵀ and PV, full (no causal saving)
    forward = 2.0 * body * tokens + attention
    krylov_dim = 64 + 2 * round(d ** (2 / 3))
    ffn_matrix = 2 * ffn * d * d * 5 / 8 + 4.0 * krylov_dim * d * d + 8.0 * ffn * d * 2 * BLOCK
    # W_O (κ and ‖·‖₂): float64 LU, Krylov on (WᵀW)⁻¹ and on WᵀW, float64 certificate
    wo_norm = 2.0 / 3.0 * d**3 + 2 * 4.0 * krylov_dim * d * d + 8.0 * d * d * 2 * BLOCK
    wkwq = 2 * m["heads"] * (2 * 2 * d * dh * dh) + m["heads"] * 10 * dh**3
    train_tokens = batch * seq
    return {
        "fp32_pass": forward,
        "lp_pass": forward,
        "local_errors": forward - 2.0 * m["vocab"] * d * tokens,
        "weight_terms": layers * (3 * ffn_matrix + wo_norm + wkwq),
        "training_step": 3.0 * (2.0 * body * train_tokens + 4.0 * layers * batch * seq * seq * d),
        "ffn_matrix": ffn_matrix,
    }


def power_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, p)`` of ``y = a·x^p`` by least squares in log-log."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    p = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - p * mx), p


def weight_fits(extremal: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per route, ``(a, p)`` of seconds per matrix against ``d`` (random init, d ≥ 768)."""
    out: dict[str, tuple[float, float]] = {}
    for key, (matrix, need, candidate) in {
        "ffn_exact": ("ffn", "both", "exact"),
        "ffn_dense": ("ffn", "both", "dense"),
        "ffn_mixed": ("ffn", "both", "mixed"),
        "ffn_certified": ("ffn", "both", "certified"),
        "wo_exact": ("wo", "both", "exact"),
        "wo_certified": ("wo", "both", "certified"),
    }.items():
        pts = [
            (float(r["d"]), float(r["seconds_per_matrix"]))
            for r in extremal["rows"]
            if r["kind"] == "init"
            and r["matrix"] == matrix
            and r["need"] == need
            and r["candidate"] == candidate
            and r["d"] >= 768
        ]
        if len(pts) >= 2:
            out[key] = power_fit(pts)
    return out


def rates(scale: dict[str, Any]) -> dict[str, Any]:
    """FP32 and BF16 forward throughput (flop/s) of the largest model of ``bench_scale`` (its
    sweep's output, or one ``--one`` row)."""
    row = max(scale.get("rows", [scale]), key=lambda r: r["params"])
    m = {
        "d": row["d"],
        "layers": row["layers"],
        "heads": row["d"] // 64,
        "kv_heads": row["d"] // 64,
        "ffn": 256 * math.ceil(int(8 * row["d"] / 3) / 256),
        "vocab": 1024,
    }
    f = flops(m, row["sample"], row["seq"], row["batch"])
    t = row["seconds"]
    return {
        "fp32": f["fp32_pass"] / t["fp32_pass"],
        "bf16": f["lp_pass"] / t["lp_pass"],
        "train_bf16": f["training_step"] / t["train"],
        "from": f"d={row['d']}, {row['layers']} layers, {row['seq']} tokens",
        "clock": scale.get("clock", "cpu" if "threads 1" in scale.get("machine", "") else "wall"),
    }


def per_rank(
    name: str,
    sample: int,
    seq: int,
    batch: int,
    local: bool,
    fits: dict[str, tuple[float, float]],
    rate: dict[str, Any],
) -> dict[str, Any]:
    m = MODELS[name]
    mem = memory(m, sample, seq, local)
    fl = flops(m, sample, seq, batch)
    row: dict[str, Any] = {
        "model": name,
        "params": model_params(m),
        "block_params": block_params(m),
        "sample": sample,
        "seq": seq,
        "batch": batch,
        "local_errors": local,
        "memory_gib": {k: v / GiB for k, v in mem.items()},
        "memory_total_gib": sum(mem.values()) / GiB,
        "tflop": {k: v / 1e12 for k, v in fl.items()},
    }
    if fits and rate:
        d = float(m["d"])
        aspect = m["ffn"] / d / (8 / 3)  # the fits are on 8d/3-wide FFN matrices
        cpu = {k: a * d**p * (aspect if k.startswith("ffn") else 1.0) for k, (a, p) in fits.items()}
        row["cpu_seconds_per_matrix"] = cpu
        # κ(W_O) is logged too: W_O needs both ends
        weights = m["layers"] * (3 * cpu.get("ffn_certified", math.nan) + cpu.get("wo_certified", math.nan))
        weights_exact = m["layers"] * (3 * cpu.get("ffn_exact", math.nan) + cpu.get("wo_exact", math.nan))
        row["cpu_seconds"] = {
            "fp32_pass": fl["fp32_pass"] / rate["fp32"],
            "lp_pass": fl["lp_pass"] / rate["bf16"],
            "local_errors": (fl["local_errors"] / rate["bf16"]) if local else 0.0,
            "weight_terms": weights,
            "weight_terms_exact": weights_exact,
            "training_step": fl["training_step"] / rate["train_bf16"],
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=Path, default=Path("docs/scale/scale.json"))
    ap.add_argument("--extremal", type=Path, default=Path("docs/scale/extremal.json"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fits = weight_fits(json.loads(args.extremal.read_text())) if args.extremal.exists() else {}
    rate = rates(json.loads(args.scale.read_text())) if args.scale.exists() else {}
    rows = [
        per_rank(name, sample, 4096, batch, local, fits, rate)
        for name, batch in (("llama2-7b", 4), ("llama2-70b", 1))
        for sample in (1, 4, 16)
        for local in (True, False)
    ]
    for r in rows:
        mem = ", ".join(f"{k} {v:.2f}" for k, v in r["memory_gib"].items())
        print(
            f"{r['model']} S={r['sample']} local={r['local_errors']}: {r['memory_total_gib']:.1f} GiB ({mem})"
        )
        if "cpu_seconds" in r:
            print("   CPU s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_seconds"].items()))
    result = {
        "command": "python examples/benchmarks/scale_paper.py " + " ".join(sys.argv[1:]),
        "weight_fits": fits,
        "rates": rate,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

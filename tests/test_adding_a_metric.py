"""docs/DESIGN.md's worked example, made: a per-head metric added with its diagnostic and its row.

A copy of the package gets exactly the edits the design notes list (the diagnostic in
``PER_CALL``, the row in ``METRICS``, the typed ``BlockReport`` field); a fresh interpreter then
measures a small model and the new tags must be logged with the values of a float64 reference,
per block and per head, with the table's reductions and in the generated docs table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "lightning_stability"

DIAGNOSTIC = '''    "attn_prob_max": lambda call, diag, probe: call_probabilities(call).amax((-2, -1)),
'''
ROW = '''    Metric(
        "attn_prob_max",
        "head",
        "largest attention probability (→ 1: one-hot rows)",
        heads="max",
        examples="max",
        calls="max",
    ),
'''
FIELD = "    attn_prob_max: float | None = None\n"

SCRIPT = r'''
import json, torch, torch.nn.functional as F
from torch import nn
from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.metrics import BLOCK_METRICS, markdown_table, parse_tag
from lightning_stability.stability_report import BlockReport
import dataclasses

class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

torch.manual_seed(0)
model = nn.Sequential(*[Block(16, 4) for _ in range(2)])
model[1].attn.qkv.weight.data.mul_(4.0)  # peaked rows in block 1
x = torch.randn(3, 5, 16)

# float64 reference: max over rows, keys and examples of softmax(q kᵀ/√d), per head
ref, h = [], x
with torch.no_grad():
    for block in model:
        a = block.norm1(h)
        q, k, _ = block.attn.qkv(a).reshape(3, 5, 3, 4, 4).permute(2, 0, 3, 1, 4).double()
        s = (q @ k.transpose(-1, -2)) / 2.0
        ref.append(s.softmax(-1).amax((-2, -1)).amax(0).tolist())  # (H,)
        h = block(h)

probe = StabilityProbe(model, log_per_head=True)
raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
keys, vec = raw.flat()
report = compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)
logged = {t: v for t, v in report.metrics().items() if parse_tag(t).metric.name == "attn_prob_max"}
print(json.dumps({
    "logged": logged,
    "reference": ref,
    "fields_match": [f.name for f in dataclasses.fields(BlockReport)] == ["name", *BLOCK_METRICS, "per_head"],
    "in_docs_table": "| `stability/block{i}/attn_prob_max` (+ `head{h}/`) | head | max | max |"
    in markdown_table(),
}))
'''


def _edit(path: Path, anchor: str, insert: str) -> None:
    """Insert ``insert`` before the line holding ``anchor`` (which must occur exactly once)."""
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: anchor {anchor!r} moved; update docs/DESIGN.md's example"
    at = text.index(anchor)
    at = text.rindex("\n", 0, at) + 1
    path.write_text(text[:at] + insert + text[at:])


def test_a_new_per_head_metric_needs_its_diagnostic_and_its_row(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "lightning_stability"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    _edit(pkg / "capture" / "probe" / "attention_stats.py", '"attention_entropy": lambda', DIAGNOSTIC)
    _edit(pkg / "metrics.py", "    # ---- weights and normalization, per block", ROW)
    _edit(pkg / "stability_report.py", "    wo_norm: float | None = None", FIELD)

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env, timeout=240
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["fields_match"] and got["in_docs_table"]
    ref = got["reference"]
    want = {}
    for i, heads in enumerate(ref):
        want[f"stability/block{i}/attn_prob_max"] = max(heads)
        want |= {f"stability/block{i}/head{h}/attn_prob_max": v for h, v in enumerate(heads)}
    assert set(got["logged"]) == set(want)
    for t, v in want.items():
        assert abs(got["logged"][t] - v) <= 1e-9 * v, t  # the probe's FP32 pass against float64
    assert max(ref[1]) > max(ref[0])  # the scaled-up block is the peaked one

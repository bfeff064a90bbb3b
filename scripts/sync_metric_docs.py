"""Rewrite the generated metric tables of README.md and docs/DESIGN.md from lightning_stability.metrics.

Run after editing the table: ``.venv/bin/python scripts/sync_metric_docs.py`` (tests/test_metrics.py
fails until the docs agree).
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_stability.metrics import markdown_table

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- metrics-table:start[^>]*-->\n)(.*?)(\n<!-- metrics-table:end -->)", re.S)

for doc in ("README.md", "docs/DESIGN.md"):
    path = ROOT / doc
    text, n = BLOCK.subn(lambda m: m.group(1) + markdown_table() + m.group(3), path.read_text())
    if n != 1:
        raise SystemExit(f"{doc}: expected one generated metrics table, found {n}")
    path.write_text(text)
    print(f"updated {doc}")

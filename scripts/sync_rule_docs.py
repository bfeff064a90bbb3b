"""Rewrite the generated rule table of docs/RULES.md from lightning_stability.rules.

Run after editing the rule table: ``.venv/bin/python scripts/sync_rule_docs.py`` (tests/rules/test_render.py
fails until the page agrees).
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_stability.rules.render import rule_table

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- rules-table:start[^>]*-->\n)(.*?)(\n<!-- rules-table:end -->)", re.S)

path = ROOT / "docs" / "RULES.md"
text, n = BLOCK.subn(lambda m: m.group(1) + rule_table() + m.group(3), path.read_text())
if n != 1:
    raise SystemExit(f"docs/RULES.md: expected one generated rule table, found {n}")
path.write_text(text)
print("updated docs/RULES.md")

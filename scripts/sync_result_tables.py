"""Rewrite the result tables of the docs pages from the committed outputs they come from.

A page marks each table it shows from an output file::

    <!-- result: examples/scenarios/results/table.md -->
    ...
    <!-- /result -->

The source is a path from the repository root: a Markdown file (the whole file), a Markdown file
with ``#k`` (its k-th table, counted from 1), or a JSON file with a renderer below
(``examples/benchmarks/results/bench_fp8.json``). Run after regenerating an output:
``.venv/bin/python scripts/sync_result_tables.py`` (``tests/docs/test_result_tables.py`` fails
until the pages agree with the files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- result: (?P<source>\S+) -->\n\n)(?P<body>.*?)(\n\n<!-- /result -->)", re.S)


def markdown_tables(text: str) -> list[str]:
    """The tables of a Markdown text (runs of lines starting with ``|``), in order."""
    tables: list[list[str]] = []
    previous = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous:
            tables.append([])
        if is_row:
            tables[-1].append(line)
        previous = is_row
    return ["\n".join(t) for t in tables]


def render_bench_fp8(body: dict[str, Any]) -> str:
    """``bench_fp8.py``'s output: seconds per measurement and the ratio over the BF16 what-if."""
    rows = [
        "| model | parameters | what-if | seconds | × BF16 what-if |",
        "|---|---|---|---|---|",
    ]
    for model, m in body["models"].items():
        ratio = {"bf16": 1.0, **m["ratio_over_bf16"]}
        for variant, seconds in m["seconds"].items():
            rows.append(
                f"| {model} | {m['parameters']:,} | {variant} | {seconds:.3g} | {ratio[variant]:.3g} |"
            )
    return "\n".join(rows) + f"\n\n{body['machine']}; {body['reps']} repetitions, medians."


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "examples/benchmarks/results/bench_fp8.json": render_bench_fp8,
}


def expected(source: str) -> str:
    """What a page shows between the markers of ``source``."""
    path, _, index = source.partition("#")
    file = ROOT / path
    if path in RENDERERS:
        return RENDERERS[path](json.loads(file.read_text()))
    text = file.read_text()
    if index:
        return markdown_tables(text)[int(index) - 1]
    return text.rstrip("\n")


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(source, body)`` of every marked result table of a page."""
    return [(m.group("source"), m.group("body")) for m in BLOCK.finditer(page.read_text())]


def pages() -> list[Path]:
    """Every docs page with a marked result table."""
    return sorted(p for p in (ROOT / "docs").rglob("*.md") if BLOCK.search(p.read_text()))


def sync(page: Path) -> bool:
    """Rewrite the marked tables of ``page``; ``True`` when it changed."""
    text = page.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + expected(m.group("source")) + m.group(4), text)
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    for page in pages():
        print(("updated " if sync(page) else "unchanged ") + str(page.relative_to(ROOT)))

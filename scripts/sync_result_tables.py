"""Rewrite the result tables of the docs pages from the committed outputs they come from.

A page marks each table it shows from an output file::

    <!-- result: examples/scenarios/results/table.md -->
    ...
    <!-- /result -->

The source is a path from the repository root:

- a Markdown file: the whole file;
- ``PATH.md#k``: its k-th table (runs of lines starting with ``|``), counted from 1;
- a JSON file listed in ``RENDERERS``: the Markdown its script renders from it (the script's own
  function, loaded from the script file: no second copy of the rendering here);
- ``PATH.json#k``: the k-th table of that rendering.

Run after regenerating an output: ``.venv/bin/python scripts/sync_result_tables.py``
(``tests/docs/test_result_tables.py`` fails until the pages agree with the files).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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


@functools.cache
def script(path: str) -> ModuleType:
    """The module of a script of the repository, loaded from its file (once)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def of_json(path: str, name: str = "render") -> Callable[[Path], str]:
    """A renderer that calls ``name`` of the script at ``path`` on the parsed JSON file."""
    return lambda file: str(getattr(script(path), name)(json.loads(file.read_text())))


def of_file(path: str, name: str = "render") -> Callable[[Path], str]:
    """A renderer that calls ``name`` of the script at ``path`` on the file's path."""
    return lambda file: str(getattr(script(path), name)(file))


def render_two_commands(file: Path) -> str:
    """``scripts/time_two_commands.sh``'s output (a shell script: its renderer lives here)."""
    body = json.loads(file.read_text())
    rows = ["| command | wall seconds | exit code | 1-minute load before → after |", "|---|---|---|---|"]
    for name in ("main_job", "ci"):
        r = body[name]
        rows.append(
            f"| `{r['command']}` | {r['wall_s']} | {r['rc']} | {r['load_before']} → {r['load_after']} |"
        )
    return "\n".join(rows) + f"\n\n{body['machine']}; {body['date']}, commit {body['commit']}."


SCALE = "examples/benchmarks/scale_tables.py"
SCALE_FILES = ("base", "extremal", "extremal_widths", "weight_reuse", "scale", "paper")
#: How each committed JSON output becomes Markdown: its script's renderer.
RENDERERS: dict[str, Callable[[Path], str]] = {
    "examples/benchmarks/results/bench_fp8.json": of_json("examples/benchmarks/bench_fp8.py"),
    "examples/benchmarks/results/bench_distributed.json": of_json("examples/benchmarks/bench_distributed.py"),
    "examples/scenarios/results/fp8_whatif.json": of_json("examples/scenarios/fp8_whatif.py"),
    "docs/perf/compiled_cpu.json": of_json("examples/benchmarks/bench_compiled.py"),
    "docs/perf/two_commands.json": render_two_commands,
    **{f"docs/scale/{name}.json": of_file(SCALE) for name in SCALE_FILES},
}


def expected(source: str) -> str:
    """What a page shows between the markers of ``source``."""
    path, _, index = source.partition("#")
    file = ROOT / path
    text = RENDERERS[path](file) if path in RENDERERS else file.read_text()
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

"""The result tables of the docs pages are the committed outputs they come from, and nothing else."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _sync() -> ModuleType:
    return load_script(ROOT / "scripts" / "sync_result_tables.py")


SYNC = _sync()

#: Which page shows which committed output (a page may show more).
SHOWN = {
    "docs/REPRODUCTION.md": [
        f"examples/paper/results/{n}.md" for n in ("exp1", "exp2", "exp3_paper", "exp3")
    ],
    "docs/HELDOUT.md": [
        *(f"examples/heldout/results/tables.md#{k}" for k in (1, 2, 3, 4, 6, 8)),
        "examples/heldout/results/guard_tables.md#1",
        "examples/heldout/results/fresh/guard_tables.md#1",
    ],
    "docs/FP8.md": [
        "examples/scenarios/results/fp8_whatif.json",
        "examples/benchmarks/results/bench_fp8.json",
    ],
    "docs/compiled.md": ["docs/perf/compiled_cpu.json"],
    "docs/DISTRIBUTED.md": [
        "examples/benchmarks/results/bench_distributed.json",
        "docs/scale/paper.json#1",
    ],
    "docs/getting-started.md": ["docs/perf/two_commands.json"],
    "docs/SCALE.md": [f"docs/scale/{name}.json" for name in SYNC.SCALE_FILES],
}


@pytest.mark.parametrize("page", sorted(SHOWN))
def test_page_shows_its_committed_outputs(page: str) -> None:
    sources = [source for source, _ in SYNC.blocks(ROOT / page)]
    assert set(SHOWN[page]) <= set(sources), (
        f"{page} lacks a marked table of {set(SHOWN[page]) - set(sources)}"
    )


@pytest.mark.parametrize("page", [str(p.relative_to(ROOT)) for p in SYNC.pages()])
def test_marked_tables_match_the_files(page: str) -> None:
    for source, body in SYNC.blocks(ROOT / page):
        assert body == SYNC.expected(source), (
            f"{page}: the table from {source} differs from the file; "
            "run `python scripts/sync_result_tables.py`"
        )


def test_markdown_tables_splits_on_non_table_lines() -> None:
    text = "intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n| c |\n|---|\nend"
    assert SYNC.markdown_tables(text) == ["| a | b |\n|---|---|\n| 1 | 2 |", "| c |\n|---|"]


def test_sync_rewrites_a_stale_table(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    source = "examples/paper/results/exp3.md"
    page.write_text(f"# t\n\n<!-- result: {source} -->\n\n| old |\n\n<!-- /result -->\n")
    assert SYNC.sync(page) is True
    assert SYNC.blocks(page) == [(source, SYNC.expected(source))]
    assert SYNC.sync(page) is False


def test_a_json_source_with_k_selects_a_table_of_its_rendering() -> None:
    rendered = SYNC.expected("docs/scale/scale.json")
    growth = SYNC.expected("docs/scale/scale.json#2")
    assert growth.startswith("| axis | train | monitor |") and growth in rendered
    assert SYNC.markdown_tables(rendered)[1] == growth

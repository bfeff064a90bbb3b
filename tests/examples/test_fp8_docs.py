"""docs/FP8.md's tables are the renderings of the committed JSON of their scripts."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "FP8.md"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def between(marker: str) -> str:
    m = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", DOC.read_text(), re.S)
    assert m, f"docs/FP8.md has no {marker} section"
    return m.group(1)


@pytest.mark.parametrize(
    ("marker", "script", "result"),
    [
        ("fp8-table", "examples/scenarios/fp8_whatif.py", "examples/scenarios/results/fp8_whatif.json"),
        ("fp8-cost", "examples/benchmarks/bench_fp8.py", "examples/benchmarks/results/bench_fp8.json"),
    ],
)
def test_tables_are_rendered_from_the_committed_json(marker: str, script: str, result: str) -> None:
    rendered = load(ROOT / script).render(json.loads((ROOT / result).read_text()))
    hint = f"regenerate with `python {script} --render {result}` into docs/FP8.md"
    assert between(marker) == rendered, hint


def test_scenario_table_numbers() -> None:
    """The committed measurement: FP8's errors are E4M3's, BF16's are BF16's, per block."""
    result = json.loads((ROOT / "examples/scenarios/results/fp8_whatif.json").read_text())
    assert result["configs"] and result["machine"].startswith("machine:")
    for row in result["configs"].values():
        assert row["bf16"]["eps_mach"] == 2.0**-7
        for recipe in ("fp8_current", "fp8_mxfp8"):
            fp8 = row[recipe]
            assert fp8["eps_mach"] == 2.0**-3 and fp8["keep_bf16"] == []  # no outlier channels here
            assert len(fp8["layers"]) == 17  # qkv, out, 2 FFN per block, and the head
            for bf16_error, fp8_error in zip(row["bf16"]["r_local"], fp8["r_local"], strict=True):
                assert 3 * bf16_error < fp8_error < 2.0**-3  # 3 mantissa bits against 7; under one rounding

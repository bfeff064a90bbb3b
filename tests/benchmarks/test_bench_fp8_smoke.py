"""Smoke test of ``examples/benchmarks/bench_fp8.py --quick`` (asserts no timing); its committed JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "examples" / "benchmarks"
VARIANTS = {"fp32", "fp8_current", "fp8_delayed", "fp8_mxfp8", "fp8_current_no_error", "fp8_mxfp8_attention"}


def check(result: dict) -> None:  # type: ignore[type-arg]
    assert result["machine"].startswith("machine:")
    assert set(result["models"]) == {"tiny_vit", "scenario_gpt", "llama"}
    for row in result["models"].values():
        assert set(row["ratio_over_bf16"]) == VARIANTS and row["linear_layers"] > 0
        assert set(row["ratio_over_fp32"]) == VARIANTS - {"fp32"}
        assert all(math.isfinite(v) and v > 0 for v in row["ratio_over_bf16"].values())


@pytest.mark.timeout(240)
def test_bench_fp8_quick(tmp_path: Path) -> None:
    module = load_script(BENCH / "bench_fp8.py")
    out = tmp_path / "bench.json"
    result = module.main(["--quick", "--reps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    check(result)


def test_committed_results_are_complete() -> None:
    check(json.loads((BENCH / "results" / "bench_fp8.json").read_text()))

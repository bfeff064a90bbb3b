"""Smoke test of ``examples/benchmarks/bench_theta.py --quick`` (runs it, asserts no timing)."""

from __future__ import annotations

import math
from pathlib import Path

from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "bench_theta.py"


def test_bench_theta_quick() -> None:
    module = load_script(SCRIPT)
    rows = module.main(["--quick", "--reps", "1"])
    assert [r["rows"] for r in rows] == ["(2, 2, 17, 17) x0.1", "(2, 2, 17, 17) x1", "(2, 2, 17, 17) x4"]
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["exact"] == 1.0 and 0.0 <= r["mean_theta"] <= 1.0  # n = 17 ≤ 24: full enumeration

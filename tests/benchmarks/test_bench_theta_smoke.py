"""Smoke test of ``examples/benchmarks/bench_theta.py --quick`` (runs it, asserts no timing)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "bench_theta.py"


def test_bench_theta_quick() -> None:
    spec = importlib.util.spec_from_file_location("bench_theta", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_theta", module)
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--reps", "1"])
    assert [r["rows"] for r in rows] == ["(2, 2, 17, 17) x0.1", "(2, 2, 17, 17) x1", "(2, 2, 17, 17) x4"]
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["exact"] == 1.0 and 0.0 <= r["mean_theta"] <= 1.0  # n = 17 ≤ 24: full enumeration

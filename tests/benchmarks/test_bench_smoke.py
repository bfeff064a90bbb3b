"""Smoke test of ``examples/benchmarks/bench_overhead.py --quick`` (runs it, times nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "bench_overhead.py"


def _load():
    return load_script(SCRIPT)


@pytest.mark.timeout(240)
def test_bench_overhead_quick(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"].startswith("machine:")
    for key in bench.RATIO_KEYS:
        value = data["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
        assert result["ratios"][key] == pytest.approx(value)
    parts = data["sampled"]["parts_s"]
    for key in ("lp_pass", "fp32_pass", "probe_measure", "diagnostics", "logging", "sampled_step"):
        assert math.isfinite(parts[key]) and parts[key] > 0
    assert data["scaling"] and all(row["layer_score_bytes"] > 0 for row in data["scaling"])
    assert all(row["peak_extra_bytes"] > 0 for row in data["scaling"])
    # the probe keeps at least every block's FP32 output: depth x tokens x d_model x 4 bytes per example
    depth = bench.parse(["--quick"]).model["depth"]
    assert all(row["kept_bytes"] >= depth * row["tokens"] * row["d_model"] * 4 for row in data["scaling"])
    syncs = data["sampled"]["host_syncs"]["sampled_step"]
    assert all(isinstance(n, int) and n > 0 for n in syncs.values())
    assert syncs["ops"] > sum(n for kind, n in syncs.items() if kind != "ops") > 0


def test_host_sync_counter_counts_what_would_stall_a_gpu() -> None:
    import torch

    bench = _load()
    x = torch.tensor([0.0, 2.0, -1.0])

    def work() -> None:
        float(x.sum())  # a value read back
        bool((x > 0).any())  # another
        x[x > 0]  # boolean indexing: data-dependent size
        torch.nonzero(x)
        torch.linalg.eigvalsh(torch.eye(2))  # a dense solver
        torch.exp(x) + 1  # nothing

    counts = bench.host_syncs(work)
    assert counts.pop("ops") >= 8
    by_kind = {kind.split(" (")[0]: n for kind, n in counts.items()}
    assert by_kind == {"value read back": 2, "data-dependent size": 2, "dense solver": 1}

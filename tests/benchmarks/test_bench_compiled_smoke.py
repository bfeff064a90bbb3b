"""Smoke test of ``examples/benchmarks/bench_compiled.py --quick`` (its CPU path; times nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "bench_compiled.py"


def _load():
    return load_script(SCRIPT)


@pytest.mark.timeout(900)
def test_bench_compiled_quick(tmp_path: Path) -> None:
    from lightning_stability.diagnostics._compiled import unavailable

    bench = _load()
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"].startswith("machine:")
    for row in data["kernels"]:
        for key in ("kappa_over_softmax/off", "kappa_over_softmax/on", "diag_over_attention/on"):
            assert math.isfinite(row[key]) and row[key] > 0, key
    sampled = data["sampled"]
    for mode in ("off", "on"):
        assert math.isfinite(sampled[f"step_over_passes/{mode}"])
        n = sampled[f"launches/{mode}"]
        assert n["ops"] > n["host_syncs"] > 0
    for name in ("probe_measure/on", "attention_diagnostics/off", "kappa_v", "weight_spectra"):
        assert sampled["parts_s"][f"part/{name}/cpu"] > 0, name
    table = bench.render(data)  # the Markdown of docs/compiled.md
    assert "| `kappa_softmax` / softmax, n = 16" in table and "| kappa v |" in table
    for key in ("every_1/on/ratio", "every_1_no_local/off/ratio", "floor_ratio"):
        assert math.isfinite(data["fits"][key]) and data["fits"][key] > 0
    if unavailable(torch.device("cpu")) is None:  # the compiled side really ran compiled kernels
        assert sampled["launches/on"]["compiled_calls"] > 0
        assert sampled["launches/on"]["ops"] < sampled["launches/off"]["ops"]
        assert data["compile"]["kernels"]["softmax_rows"]["compiles"] >= 1

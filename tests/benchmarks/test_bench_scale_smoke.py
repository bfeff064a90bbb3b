"""Smoke tests of the scale benchmarks (run them small, time nothing) and the paper arithmetic."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tests.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "examples" / "benchmarks"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return load_script(BENCH / f"{name}.py")


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Single-threaded: on a shared, oversubscribed machine every small multi-threaded BLAS call
    can stall for milliseconds waiting for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_paper_arithmetic_matches_the_published_sizes() -> None:
    paper = _load("scale_paper")
    seven, seventy = paper.MODELS["llama2-7b"], paper.MODELS["llama2-70b"]
    assert paper.model_params(seven) == pytest.approx(6.74e9, rel=0.01)
    assert paper.model_params(seventy) == pytest.approx(68.98e9, rel=0.01)
    mem = paper.memory(seven, sample=4, seq=4096, local=True)
    assert mem["kept_activations"] == 4 * 32 * 4 * 4096 * 4096 * 4  # 4 tensors per block
    assert paper.memory(seven, 4, 4096, local=False)["kept_activations"] == mem["kept_activations"] / 4
    assert mem["attention_probabilities"] == 4 * 32 * 4096**2 * 4
    fl = paper.flops(seven, sample=4, seq=4096, batch=4)
    assert fl["training_step"] == pytest.approx(
        3 * fl["fp32_pass"], rel=1e-12
    )  # same tokens: 3 passes' worth
    a, p = paper.power_fit([(2.0, 12.0), (4.0, 96.0), (8.0, 768.0)])
    assert (a, p) == (pytest.approx(1.5), pytest.approx(3.0))


@pytest.mark.timeout(300)
def test_bench_scale_measures_one_tiny_configuration() -> None:
    scale = _load("bench_scale")
    row = scale.measure_one({"d": 64, "layers": 1, "seq": 16}, reps=1, batch=2, sample=1)
    assert row["params"] == scale.params(64, 1)
    assert set(row["seconds"]) == {"train", "fp32_pass", "lp_pass", "sampled", "exact", "no_local", "frozen"}
    assert all(math.isfinite(v) and v > 0 for v in row["seconds"].values())
    assert row["peak_extra_bytes"]["sampled"] > 0 and row["peak_extra_bytes"]["train"] > 0
    parts = scale.derived({**row, "axis": "width"})
    assert parts["sampled_over_train"] > 1.0 and parts["exact_over_train"] > 1.0
    fit = scale.fits([{**row, "axis": "width"}, {**row, "d": 128, "axis": "width"}])
    assert fit["width"]["train"] == 0.0  # the same times at twice the width: slope 0
    assert scale.slope([1.0, 2.0, 4.0], [3.0, 12.0, 48.0]) == pytest.approx(2.0)


def test_bench_extremal_runs_every_candidate_small() -> None:
    extremal = _load("bench_extremal_sv")
    cfg = argparse.Namespace(count=2, reps=1, threads=1, lobpcg=True)
    rows = extremal.bench(64, "kappa100", cfg)
    assert {(r["need"], r["candidate"]) for r in rows} >= {
        ("both", "mixed"),
        ("both", "certified"),
        ("top", "krylov"),
    }
    assert all(r["rel_err_max"] < 1e-4 for r in rows if r["candidate"] != "power")
    both = [r for r in rows if r["need"] == "both" and r["candidate"] != "lobpcg"]
    assert both and all(r["rel_err_kappa"] < 1e-4 for r in both)


@pytest.mark.timeout(300)
def test_bench_weight_reuse_quick(tmp_path: Path) -> None:
    reuse = _load("bench_weight_reuse")
    cfg = argparse.Namespace(quick=True, d=64, layers=2, heads=4, seq=32, batch=4, lr=6e-4, steps=12)
    rows = reuse.train(cfg)
    rules = {r["rule"] for r in rows}
    assert {"kappa/weyl_fro", "kappa/weyl_exact_norm", "kappa/subspace", "norm/subspace"} <= rules
    # a bound through the exact ‖ΔW‖₂ is never worse than through ‖ΔW‖_F
    by_key = {(r["step"], r["interval"], r["weight"], r["rule"]): r["reuse"] for r in rows}
    for (step, n, weight, rule), ok in by_key.items():
        if rule.endswith("weyl_fro") and ok:
            assert by_key[(step, n, weight, rule.replace("weyl_fro", "weyl_exact_norm"))]
    assert all(r["bound"] >= 0 for r in rows if "weyl" in r["rule"])
    assert reuse.weyl_rel(2.0, 1.0, 0.0) == 0.0 and reuse.weyl_rel(2.0, 1.0, 1.0) == math.inf

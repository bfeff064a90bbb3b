"""The paper's three experiment scripts (``examples/paper/``) in their ``--quick`` mode: real tiny fits."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:StabilityMonitor early warning")

PAPER_DIR = Path(__file__).resolve().parents[2] / "examples" / "paper"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPER_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common() -> ModuleType:
    _load("exp1_cross_precision")  # puts examples/paper on sys.path
    import _common

    return _common


def test_exp1_quick_measures_three_precisions_and_regresses(tmp_path: Path, common: ModuleType) -> None:
    exp1 = _load("exp1_cross_precision")
    exp1.main(["--quick", "--out", str(tmp_path)])
    results = common.load_raw(tmp_path / "exp1.json")
    assert len(results) == 2  # 2 seeds x 1 width
    for r in results:
        assert set(r.metrics) == {"bf16", "fp16", "fp32"}
        assert sorted(r.metrics["fp16"]) == [1, 3, 5]  # Lightning's steps of the measured batches
        _, fp32 = common.series(r, "fp32", "stability/r_block")
        _, bf16 = common.series(r, "bf16", "stability/r_block")
        _, fp16 = common.series(r, "fp16", "stability/r_block")
        assert (fp32 == 0).all()  # FP32 against FP32: exactly no mismatch
        # BF16 keeps 8 significand bits, FP16 11: its mismatch is several times larger
        assert (bf16 > 3 * fp16).all() and (fp16 > 0).all()
    md = (tmp_path / "exp1.md").read_text()
    assert "Table 2, mixed precision" in md and "Within BF16 only" in md
    row = next(line for line in md.splitlines() if line.startswith("| combined·ε_mach |"))
    assert row.split("|")[6].strip() == "4"  # 2 seeds x {BF16, FP16} points in the mixed regression
    assert "Within one width and one precision" in md
    _tables_rebuild_from_the_summary_alone(exp1, tmp_path, "exp1")


def _tables_rebuild_from_the_summary_alone(module: ModuleType, out: Path, name: str) -> None:
    """The committed summary is enough: without the raw runs, --tables_only writes the same tables."""
    md = (out / f"{name}.md").read_text()
    (out / f"{name}.json").unlink()
    (out / f"{name}.md").unlink()
    module.main(["--tables_only", "--out", str(out)])
    assert (out / f"{name}.md").read_text() == md


def test_exp2_quick_lead_lag_rows(tmp_path: Path, common: ModuleType) -> None:
    exp2 = _load("exp2_forecasting")
    exp2.main(["--quick", "--out", str(tmp_path)])
    (result,) = common.load_raw(tmp_path / "exp2.json")
    steps, kappa = common.series(result, "fp16", exp2.SIGNAL)
    assert steps.tolist() == list(range(40))  # every step measured (Lightning's step of each batch)
    assert all(k > 0 for k in kappa)
    md = (tmp_path / "exp2.md").read_text()
    for target in ("fwd error", "loss (control)", "fwd error, loss as signal (control)"):
        rows = [
            r
            for r in (line.split("|") for line in md.splitlines())
            if len(r) > 3 and r[1].strip() == "0" and r[2].strip() == target
        ]
        assert len(rows) == 1, target
        lag, p = rows[0][3].strip(), float(rows[0][5])
        assert lag == "—" or abs(int(float(lag))) <= 10
        assert 1 / 51 <= p <= 1.0
    assert "The two series over the run" in md
    _tables_rebuild_from_the_summary_alone(exp2, tmp_path, "exp2")


def test_exp3_quick_matched_control_and_bumps(tmp_path: Path, common: ModuleType) -> None:
    exp3 = _load("exp3_ln_eps")
    exp3.main(["--quick", "--out", str(tmp_path)])
    runs = {exp3.key(r): r for r in common.load_raw(tmp_path / "exp3.json")}
    paper_ctrl, paper_int = runs[("paper", 0, None, None)], runs[("paper", 0, 0.6, 0.01)]
    ours_ctrl, ours_int = runs[("ours", 0, None, None)], runs[("ours", 0, 0.6, 0.01)]
    # the paper's model: no norm is ε-dominated, nothing is bumped, and the matched runs agree bit for bit
    assert paper_int.bumped_layers == [] and paper_int.loss == paper_ctrl.loss
    assert paper_int.ln_eps_mach == 2.0**-10
    # our small-embedding model: the first block's norms are bumped, upward only, never above the cap
    assert ours_int.bumped_layers and all(b["eps_to"] > b["eps_from"] for b in ours_int.bumps)
    assert all(1e-6 <= b["eps_to"] <= 1e-2 for b in ours_int.bumps)
    assert ours_int.loss[1] == ours_ctrl.loss[1]  # same init and first batch
    assert ours_int.loss != ours_ctrl.loss
    md = (tmp_path / "exp3.md").read_text()
    assert "ours, not in the paper" in md and math.isfinite(exp3.tail_means(ours_int, 10)[0])
    _tables_rebuild_from_the_summary_alone(exp3, tmp_path, "exp3")


@pytest.mark.parametrize(
    ("script", "name", "extra"),
    [
        ("exp1_cross_precision", "exp1", []),
        ("exp2_forecasting", "exp2", []),
        ("exp3_ln_eps", "exp3", ["--configs", "ours", "--name", "exp3"]),
        ("exp3_ln_eps", "exp3_paper", ["--configs", "paper", "--name", "exp3_paper"]),
    ],
)
def test_committed_tables_are_the_committed_summaries_rendered(
    tmp_path: Path, script: str, name: str, extra: list[str]
) -> None:
    """Each committed table (shown in docs/REPRODUCTION.md) is what its committed summary renders to."""
    results = PAPER_DIR / "results"
    (tmp_path / f"{name}_summary.json").write_text((results / f"{name}_summary.json").read_text())
    _load(script).main(["--tables_only", "--out", str(tmp_path), *extra])
    assert (tmp_path / f"{name}.md").read_text() == (results / f"{name}.md").read_text()

"""The loops beyond the Trainer, end to end in ``--quick`` mode: a Fabric loop logging
``report.metrics()`` with ``fabric.log_dict``, and litgpt models measured in a plain loop."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from loops import fabric_loop


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_fabric_loop_logs_the_reports_metrics(tmp_path: Path) -> None:
    result = fabric_loop.main(["--quick", "--out", str(tmp_path)])
    assert result["judgement"].steps == 3 and result["judgement"].status == "healthy"
    (path,) = tmp_path.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(path.open()) if r.get("stability/r_block")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for row, metrics in zip(rows, result["logged"], strict=True):
        assert {k: float(row[k]) for k in metrics} == pytest.approx(metrics, rel=1e-6)
        # BF16 against FP32 on a small model: a mismatch of the order of ε_mach = 2^-8 or below
        assert 1e-5 < metrics["stability/r_block"] < 2**-6
    assert {"stability/block3/kappa_wkwq", "stability/block0/attn_logit_max"} <= set(result["logged"][0])


def test_litgpt_models_in_a_plain_loop() -> None:
    pytest.importorskip("litgpt")
    from loops import litgpt_loop

    runs = litgpt_loop.main(["--quick"])
    assert list(runs) == ["pythia-14m", "Llama-3.2-1B", "gemma-2-2b"]
    for name, reports in runs.items():
        assert [r.step for r in reports] == [2, 4], name
        for report in reports:
            assert [b.name for b in report.blocks] == ["transformer.h.0", "transformer.h.1"], name
            assert 1e-5 < report.r_block < 2**-6, name
            # the fused [q | k | v] layout read as litgpt reads it, GQA included
            assert all(b.kappa_wkwq is not None and math.isfinite(b.kappa_wkwq) for b in report.blocks), name
            assert 0 < report.attn_logit_max < 50  # Gemma-2 caps at 50: the capped logits

"""The committed FP8 what-if measurement of the scenario models (shown in docs/FP8.md, whose tables
``tests/docs/test_result_tables.py`` checks against it)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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

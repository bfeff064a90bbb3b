"""The one metric table drives the report fields, the raw keys' reductions and the docs tables."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_stability.metrics import (
    BLOCK_METRICS,
    HEAD_METRICS,
    LAYER_METRICS,
    METRICS,
    MODEL_METRICS,
    OPERAND_METRICS,
    RawKey,
    markdown_table,
)
from lightning_stability.stability_report import BlockReport, LayerReport, OperandReport, StabilityReport

ROOT = Path(__file__).resolve().parents[1]


def _generated(path: Path) -> str:
    text = path.read_text()
    m = re.search(r"<!-- metrics-table:start[^>]*-->\n(.*?)\n<!-- metrics-table:end -->", text, re.S)
    assert m, f"{path.name} has no generated metrics table"
    return m.group(1)


@pytest.mark.parametrize("doc", ["docs/metrics.md", "docs/DESIGN.md"])
def test_docs_list_every_metric_from_the_table(doc: str) -> None:
    table = _generated(ROOT / doc)
    assert table == markdown_table(), f"regenerate with `python -m lightning_stability.metrics` into {doc}"
    for metric in METRICS:
        assert f"/{metric.name}`" in table, metric.name


def test_report_fields_are_the_table() -> None:
    block_fields = [f.name for f in dataclasses.fields(BlockReport)]
    assert block_fields == ["name", *BLOCK_METRICS, "per_head"]
    model_fields = {f.name for f in dataclasses.fields(StabilityReport)}
    for metric in METRICS:
        if metric.level == "model" or metric.blocks:
            assert (metric.attr or metric.name) in model_fields, metric.name
    assert set(HEAD_METRICS) <= set(BLOCK_METRICS)
    assert {"worst_block", "fp16_headroom", "r_block_mean_token", "attn_logit_max"} <= set(MODEL_METRICS)
    assert [f.name for f in dataclasses.fields(LayerReport)] == ["name", *LAYER_METRICS, "operands"]
    assert [f.name for f in dataclasses.fields(OperandReport)] == list(OPERAND_METRICS)
    assert set(LAYER_METRICS).isdisjoint(BLOCK_METRICS) and set(OPERAND_METRICS).isdisjoint(MODEL_METRICS)


def test_metrics_logs_tags_from_the_table() -> None:
    block = BlockReport(
        name="b", r_local=2e-3, attn_logit_max=150.0, per_head={"attn_logit_max": [1.0, 150.0]}
    )
    report = StabilityReport(step=3, dtype="bfloat16", eps_mach=2**-8, blocks=[block], worst_block="b")
    report.worst_block_index, report.fp16_headroom = 0, 7.5
    assert report.metrics() == {
        "stability/eps_mach": 2**-8,
        "stability/nonfinite": 0.0,
        "stability/worst_block": 0.0,
        "stability/fp16_headroom": 7.5,
        "stability/block0/attn_logit_max": 150.0,
        "stability/block0/head0/attn_logit_max": 1.0,
        "stability/block0/head1/attn_logit_max": 150.0,
        "stability/block0/r_local": 2e-3,
    }


def test_metrics_logs_layer_tags_from_the_table() -> None:
    layer = LayerReport(
        "h.0.mlp.c_proj",
        fp8_error_token=0.9,
        bf16_error=2e-3,
        operands={"input": OperandReport(fp8_underflow=0.99, fp8_amax=1e6)},
    )
    report = StabilityReport(step=3, dtype="float8_e4m3fn", eps_mach=2**-3, blocks=[], layers=[layer])
    assert report.metrics() == {
        "stability/eps_mach": 2**-3,
        "stability/nonfinite": 0.0,
        "stability/layer/h.0.mlp.c_proj/fp8_error_token": 0.9,
        "stability/layer/h.0.mlp.c_proj/bf16_error": 2e-3,
        "stability/layer/h.0.mlp.c_proj/input/fp8_underflow": 0.99,
        "stability/layer/h.0.mlp.c_proj/input/fp8_amax": 1e6,
    }


def test_every_raw_key_has_a_declared_reduction() -> None:
    assert RawKey("err_sq", 0, metric="r_block").ranks == "sum"
    assert RawKey("variance", module="blocks.0.norm1").ranks == "min"
    assert RawKey("amax", module="blocks.0.mlp.0").ranks == "max"
    assert RawKey("attention_entropy", 1, head=0).ranks == "min"
    assert RawKey("underflow", module="h.0.mlp", operand="input", metric="fp8_underflow").ranks == "sum"
    assert RawKey("fp8_scale_inv_min", module="h.0.mlp", operand="weight").ranks == "min"
    assert RawKey("fp8_amax", module="h.0.mlp", operand="input").ranks == "max"
    with pytest.raises(KeyError, match="no declared cross-rank reduction"):
        RawKey("something_new", 0)
    with pytest.raises(KeyError):
        RawKey("r_local", 0)  # derived (from err_sq / ref_sq), never a raw key


def test_derived_rows_name_their_parts_and_measured_rows_a_reduction() -> None:
    for m in METRICS:
        assert (m.ranks is None) == (m.derived is not None or m.name in ("eps_mach", "alarm")), m.name
        if m.derived is not None and m.derived.kind != "formula":
            assert len(m.derived.parts) == 2, m.name
            for part in m.derived.parts:
                assert RawKey(part, 0, metric=m.name).ranks == "sum", (m.name, part)
        if m.level == "head":  # per-call attention values: every reduction is declared
            assert m.heads and m.examples and m.calls, m.name


def test_analysis_and_cli_do_not_import_lightning() -> None:
    code = (
        "import sys, lightning_stability.analysis, lightning_stability.analysis.cli\n"
        "import lightning_stability.metrics\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print(bad)\n"
        "from lightning_stability import StabilityReport, StabilityMonitor\n"
        "print('lightning' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "src")},
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"  # the lazy names still resolve


def test_tensorboard_layout_has_a_chart_for_every_metric() -> None:
    from lightning_stability.callbacks.monitor import custom_scalars_layout

    metrics = {f"stability/block3/{name}": 1.0 for name in BLOCK_METRICS}
    metrics |= {f"stability/{name}": 1.0 for name in MODEL_METRICS}
    layout = custom_scalars_layout(metrics)
    regexes = " ".join(rx for section in layout.values() for _, tags in section.values() for rx in tags)
    for (
        name
    ) in BLOCK_METRICS:  # one chart each, one line per block sub-run (tests/callbacks/test_dashboard.py)
        assert f"/{name}$" in regexes or f"/log10_{name}$" in regexes, name


def test_parse_tag_inverts_tag_for_every_row() -> None:
    from lightning_stability.metrics import METRICS, parse_tag, tag

    for m in METRICS:
        if m.level in ("layer", "operand"):
            continue  # test_parse_tag_inverts_layer_tags
        forms = []
        if m.level == "model" or m.blocks:
            forms.append((tag(m), None, None))
        if m.level != "model":
            forms.append((tag(m, 7), 7, None))
        if m.level == "head":
            forms.append((tag(m, 2, 11, prefix="p"), 2, 11))
        for text, block, head in forms:
            prefix = text.split("/", 1)[0]
            got = parse_tag(text, prefix=prefix)
            assert got is not None and (got.metric, got.block, got.head) == (m, block, head), text
            assert got.layer is None and got.operand is None
            assert tag(got.metric, got.block, got.head, prefix=prefix) == text


@pytest.mark.parametrize("layer", ["h.0.mlp.c_proj", "", "weird/name", "layer", "block3"])
def test_parse_tag_inverts_layer_tags(layer: str) -> None:
    from lightning_stability.metrics import parse_tag, tag

    for m in METRICS:
        if m.level not in ("layer", "operand"):
            continue
        operand = "weight" if m.level == "operand" else None
        text = tag(m, prefix="p", layer=layer, operand=operand)
        got = parse_tag(text, prefix="p")
        assert got is not None and (got.metric, got.layer, got.operand, got.block) == (
            m,
            layer,
            operand,
            None,
        )
        assert tag(got.metric, prefix="p", layer=got.layer, operand=got.operand) == text
        with pytest.raises(ValueError, match="layer"):
            tag(m, 3)  # a per-layer metric has no block form


def test_parse_tag_refuses_what_tag_cannot_produce() -> None:
    from lightning_stability.metrics import parse_tag

    for text in (
        "stability/guard/actions",  # not a metric
        "stability/kappa_v",  # a block metric with no model roll-up
        "stability/block1/eps_mach",  # a model metric under a block
        "stability/block1/head0/r_local",  # a block metric per head
        "stability/block01/kappa_v",  # not how tag() writes an index
        "stability/blockx/kappa_v",
        "other/block1/kappa_v",
        "stability/block1/head2/x/kappa_v",
        "stability/fp8_error_token",  # a per-layer metric without its layer
        "stability/block1/fp8_error_token",
        "stability/layer/fp8_underflow",
        "stability/layer/h.0.fc/fp8_underflow",  # an operand metric without its operand
        "stability/layer/h.0.fc//fp8_underflow",
        "stability/lair/h.0.fc/fp8_error",
    ):
        assert parse_tag(text) is None, text

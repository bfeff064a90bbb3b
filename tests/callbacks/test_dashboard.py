"""The TensorBoard dashboard on real tiny fits: block sub-runs, log10 copies, no empty chart."""

from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tests.conftest import TinyTransformer, make_loader, trainer_kwargs

from lightning_stability import ProbeOptions, StabilityMonitor
from lightning_stability.analysis.logs import find_runs
from lightning_stability.callbacks._dashboard import custom_scalars_layout, split_metrics
from lightning_stability.metrics import BLOCK_METRICS, METRICS

warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")

DEPTH = 3


def _fit(tmp_path: Path, **monitor: Any) -> Path:
    seed_everything(0)
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    csv_logger = CSVLogger(str(tmp_path / "csv"), name="run")
    cb = StabilityMonitor(every_n_steps=2, sample_size=4, precision="bf16", **monitor)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=[tb, csv_logger], max_steps=4))
    trainer.fit(TinyTransformer(depth=DEPTH), make_loader())
    return Path(tb.log_dir)


def _accumulator(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator) -> dict[str, dict[int, float]]:
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def _layout(acc: EventAccumulator) -> layout_pb2.Layout:
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return layout


@pytest.mark.parametrize(("residual_gain_iters", "local_errors"), [(0, True), (1, False)])
def test_dashboard_sub_runs_log10_copies_and_no_empty_chart(
    tmp_path: Path, residual_gain_iters: int, local_errors: bool
) -> None:
    probe = ProbeOptions(residual_gain_iters=residual_gain_iters, local_errors=local_errors)
    log_dir = _fit(tmp_path, probe=probe)
    main_acc = _accumulator(log_dir)
    main = _scalars(main_acc)
    blocks = [_scalars(_accumulator(log_dir / f"block{i}")) for i in range(DEPTH)]
    assert not (log_dir / f"block{DEPTH}").exists()

    # every sub-run holds exactly its block's values: log10 for log-scale metrics, as is otherwise
    for i, sub in enumerate(blocks):
        assert sub, f"block{i} sub-run is empty"
        for metric in METRICS:
            if metric.level == "model" or f"stability/block{i}/{metric.name}" not in main:
                continue
            logged = main[f"stability/block{i}/{metric.name}"]
            if metric.log_scale:
                copy = sub[f"stability_block/log10_{metric.name}"]
                assert copy == pytest.approx({s: math.log10(v) for s, v in logged.items()}, abs=1e-5)
            else:
                assert sub[f"stability_block/{metric.name}"] == pytest.approx(logged, rel=1e-6)
    assert ("stability_block/log10_r_local" in blocks[0]) is local_errors
    assert ("stability_block/residual_gain" in blocks[0]) is bool(residual_gain_iters)
    eps = main["stability/eps_mach"]
    assert set(eps) == {1, 3}
    assert main["stability_model/log10_eps_mach"] == pytest.approx(
        {s: math.log10(v) for s, v in eps.items()}, abs=1e-6
    )

    # the layout charts only what was logged: every chart matches at least one tag
    all_tags = set(main) | {t for sub in blocks for t in sub}
    layout = _layout(main_acc)
    titles = [c.title for cat in layout.category for c in cat.chart]
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                (series,) = chart.margin.series
                assert {series.value, series.lower, series.upper} <= all_tags, chart.title
            else:  # (bound_rigorous is inf whenever the small-gain condition fails: no log10 point)
                rxs = chart.multiline.tag
                assert any(re.search(rx, t) for rx in rxs for t in all_tags), chart.title
    assert any(t.startswith("residual_gain") for t in titles) is bool(residual_gain_iters)
    assert any(t.startswith("bound") for t in titles) is bool(residual_gain_iters)
    assert any(t.startswith("r_local") for t in titles) is local_errors
    (alarm,) = [c for cat in layout.category for c in cat.chart if c.title.startswith("alarm")]
    assert alarm.margin.series[0].value == "stability/alarm"  # a margin chart: never smoothed

    # the block map, once, as text
    (text,) = main_acc.Tensors("stability/blocks/text_summary")
    assert text.tensor_proto.string_val[0].decode().splitlines()[2:] == [
        f"| block{i} | `blocks.{i}` |" for i in range(DEPTH)
    ]

    # other loggers and the report's reader see the plain stability/* tags only
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
        header = next(csv.reader(f))
    assert "stability/block0/kappa_softmax" in header and "stability/alarm" in header
    assert not [h for h in header if h.startswith(("stability_block", "stability_model"))]
    assert find_runs(tmp_path / "tb") == [log_dir]


def test_layout_has_a_chart_for_every_metric_that_is_on() -> None:
    metrics = {f"stability/block0/{name}": 1.0 for name in BLOCK_METRICS}
    metrics |= {f"stability/{m.name}": 1.0 for m in METRICS if m.level == "model" or m.blocks}
    layout = custom_scalars_layout(metrics)
    regexes = [rx for charts in layout.values() for kind, tags in charts.values() for rx in tags]
    _, (block0,) = split_metrics(metrics)
    for tag in block0:
        assert any(re.search(rx, tag) for rx in regexes), tag
    charts = {title.split(" ")[0]: chart for section in layout.values() for title, chart in section.items()}
    for name in ("alarm", "worst_block", "nonfinite"):
        assert charts[name][0] == "Margin"
    # a metric that is off (no residual gain, no bound, no r_local) has no chart
    off = {k: v for k, v in metrics.items() if not re.search(r"/(residual_gain|bound\w*|r_local)$", k)}
    titles = [t for section in custom_scalars_layout(off).values() for t in section]
    assert not [t for t in titles if t.startswith(("residual_gain", "bound", "r_local"))]


def test_split_metrics_drops_what_a_log_axis_cannot_show() -> None:
    main, blocks = split_metrics(
        {
            "stability/bound_rigorous": math.inf,  # small gain failed
            "stability/r_block": 0.0,  # an FP32 "low precision" pass
            "stability/fp16_headroom": 7.5,  # linear: already in the main run as is
            "stability/block1/kappa_v": 100.0,
            "stability/block1/head0/kappa_v": 10.0,  # per-head values stay in the main run only
            "stability/block1/wo_norm": 0.5,
        }
    )
    assert main == {}
    assert blocks == [{}, {"stability_block/log10_kappa_v": 2.0, "stability_block/wo_norm": 0.5}]


def test_a_dashboard_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    seed_everything(0)
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="run", version=0)
    Path(tb.log_dir).mkdir(parents=True)
    (Path(tb.log_dir) / "block0").write_text("a file where the sub-run directory goes")
    cb = StabilityMonitor(every_n_steps=2, sample_size=4, precision="bf16")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=tb, max_steps=4))
    with pytest.warns(UserWarning, match="TensorBoard dashboard is off") as record:
        trainer.fit(TinyTransformer(depth=DEPTH), make_loader())
    assert sum("dashboard is off" in str(w.message) for w in record) == 1
    assert trainer.global_step == 4
    main = _scalars(_accumulator(Path(tb.log_dir)))
    assert set(main["stability/block0/r_local"]) == {1, 3}


def _csv_columns(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("stability/") and value != "":
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def test_one_event_per_step_holds_the_same_tags_values_and_steps_as_log_metrics(tmp_path: Path) -> None:
    """The main run's tags are written as one event per step: what CSV gets, to float32, same steps."""
    log_dir = _fit(tmp_path)
    main = {k: v for k, v in _scalars(_accumulator(log_dir)).items() if k.startswith("stability/")}
    csv_values = _csv_columns(next((tmp_path / "csv").rglob("metrics.csv")))
    assert len(main) > 50 and set(main) == set(csv_values)
    for tag, by_step in csv_values.items():
        assert set(main[tag]) == set(by_step) == {1, 3}, tag
        for step, value in by_step.items():
            got = main[tag][step]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-6), tag
    # one event per logged step in the main event file, not one per tag
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = {e.step for e in events.Scalars("stability/alarm")}
    assert steps == {1, 3}


class _CountingLogger(TensorBoardLogger):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:  # type: ignore[override]
        self.calls += any(k.startswith("stability/") for k in metrics)
        super().log_metrics(metrics, step)


def test_a_logger_prefix_and_an_overridden_log_metrics_are_honoured(tmp_path: Path) -> None:
    seed_everything(0)
    prefixed = TensorBoardLogger(str(tmp_path / "tb"), name="prefixed", prefix="train")
    counting = _CountingLogger(str(tmp_path / "tb"), name="counting")
    cb = StabilityMonitor(every_n_steps=2, sample_size=4, precision="bf16")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=[prefixed, counting], max_steps=4))
    trainer.fit(TinyTransformer(depth=DEPTH), make_loader())
    tags = _scalars(_accumulator(Path(prefixed.log_dir)))
    assert set(tags["train-stability/r_block"]) == {1, 3}
    assert not [t for t in tags if t.startswith("stability/")]
    assert counting.calls == 2  # the subclass's own log_metrics ran at both logged steps
    assert set(_scalars(_accumulator(Path(counting.log_dir)))["stability/r_block"]) == {1, 3}


def test_write_scalars_without_tensorboard_falls_back_to_add_scalar(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only tensorboardX installed (torch's writer cannot import): one add_scalar per tag."""
    import sys

    from lightning_stability.callbacks._dashboard import write_scalars

    class Writer:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            self.calls.append((tag, value, global_step))

    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto.summary_pb2", None)
    writer = Writer()
    write_scalars(writer, {"a": 1.0, "b/c": 2.5}, step=7)
    assert writer.calls == [("a", 1.0, 7), ("b/c", 2.5, 7)]

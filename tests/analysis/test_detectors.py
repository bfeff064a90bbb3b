"""Loss-based detectors replayed on logs: against Lightning's own SpikeDetection and a plain OLMo loop."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_stability.analysis.detectors import first_step, lightning_spike_steps, olmo_spike_steps


def _fabric_stub() -> SimpleNamespace:
    """The few attributes SpikeDetection touches on a single CPU process."""
    strategy = SimpleNamespace(
        root_device=torch.device("cpu"),
        barrier=lambda: None,
        reduce_boolean_decision=lambda decision, all=True: decision,
    )
    return SimpleNamespace(strategy=strategy, global_rank=0)


def _lightning_reference(values: list[float], tmp_path: Path, **kwargs: object) -> list[int]:
    """Every batch Lightning's real SpikeDetection raises on (continuing after each raise)."""
    from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException

    det = SpikeDetection(exclude_batches_path=tmp_path / "skip.json", **kwargs)  # type: ignore[arg-type]
    fabric = _fabric_stub()
    flagged = []
    for i, v in enumerate(values):
        try:
            det.on_train_batch_end(fabric, torch.tensor(v), None, i)  # type: ignore[arg-type]
        except TrainingSpikeException:
            flagged.append(i)
    return flagged


def _series(seed: int, n: int = 200) -> list[float]:
    g = np.random.default_rng(seed)
    base = 4.0 * np.exp(-np.arange(n) / 60.0) + 1.0 + 0.05 * g.standard_normal(n)
    for at in g.choice(np.arange(20, n), size=4, replace=False):
        base[at] *= g.choice([1.5, 3.5, 6.0])  # some below, some above Lightning's 3x threshold
    return base.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lightning_rule_matches_lightning_spike_detection(seed: int, tmp_path: Path) -> None:
    values = _series(seed)
    expected = _lightning_reference(values, tmp_path)
    assert expected, "the series must contain spikes Lightning flags"
    assert lightning_spike_steps(list(range(len(values))), values) == expected


def test_lightning_rule_matches_with_atol_and_nonfinite(tmp_path: Path) -> None:
    values = _series(3)
    values[50] = math.nan
    values[120] = math.inf
    expected = _lightning_reference(values, tmp_path, atol=0.5, rtol=1.0, window=5)
    assert 50 in expected and 120 in expected
    got = lightning_spike_steps(list(range(len(values))), values, window=5, rtol=1.0, atol=0.5)
    assert got == expected


def test_lightning_rule_misses_a_slow_climb() -> None:
    # a loss creeping from 2 to 3 over 100 steps is never 3x its running mean
    values = np.linspace(2.0, 3.0, 100)
    assert lightning_spike_steps(np.arange(100), values) == []


def test_lightning_rule_reports_step_numbers() -> None:
    steps = [5, 10, 15, 20, 25]
    assert lightning_spike_steps(steps, [2.0, 1.9, 1.8, 9.0, 1.7]) == [20]


def _olmo_reference(values: list[float], window: int, k: float) -> list[int]:
    history: list[float] = []
    out = []
    for i, v in enumerate(values):
        if len(history) >= window:
            mean = statistics.fmean(history)
            std = statistics.pstdev(history)
            if std >= 1e-10 and v > mean + k * std:
                out.append(i)
        history.append(v)
        if len(history) > window:
            history.pop(0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_olmo_rule_matches_plain_reference(seed: int) -> None:
    g = np.random.default_rng(seed)
    values = (1.0 + 0.1 * g.standard_normal(400)).tolist()
    values[300] = 3.0  # 20σ
    values[350] = 1.5  # 5σ: below 6σ
    expected = _olmo_reference(values, 128, 6.0)
    assert 300 in expected and 350 not in expected
    assert olmo_spike_steps(range(400), values) == expected


def test_olmo_rule_silent_before_window_is_full() -> None:
    values = [1.0] * 10 + [100.0]
    assert olmo_spike_steps(range(11), values) == []
    assert olmo_spike_steps(range(11), [1.0, 1.1] * 5 + [100.0], window=10) == [10]


def test_olmo_rule_flat_history_never_fires() -> None:
    assert olmo_spike_steps(range(140), [1.0] * 139 + [5.0]) == []


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        lightning_spike_steps([0, 1], [1.0])
    with pytest.raises(ValueError, match="window"):
        olmo_spike_steps([0], [1.0], window=0)
    with pytest.raises(ValueError, match="mode"):
        lightning_spike_steps([0], [1.0], mode="up")
    assert first_step([]) is None and first_step([3, 4]) == 3

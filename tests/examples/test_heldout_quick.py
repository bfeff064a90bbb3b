"""Held-out evaluation: events and leads on known series, the alarm adapter, the scenarios' one
difference, the data split, and ``run.py quick`` end to end (real runs, real JSON)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from heldout import events  # noqa: E402
from heldout.data import digits, stdlib_bytes, stdlib_files  # noqa: E402
from heldout.runner import load_record  # noqa: E402
from heldout.scenarios import SCENARIOS  # noqa: E402
from heldout.score import alarm_steps, loss_detectors, paper_steps, precision_aware_steps  # noqa: E402


def test_divergence_needs_a_sustained_rise() -> None:
    flat = [3.0] * 30
    blip = [3.0] * 20 + [9.0] + [3.0] * 29  # one bad step: the 10-step mean rises 0.6 for 10 steps only
    assert events.divergence(range(30), flat) is None
    assert events.divergence(range(50), blip) == 20
    short = [3.0] * 20 + [7.0] + [3.0] * 29  # +0.4 at most: below the 0.5 nats rise
    assert events.divergence(range(50), short) is None
    assert events.divergence(range(5), [3.0, 2.0, math.inf, 2.0, 2.0]) == 2


def test_gap_and_low_precision_events() -> None:
    ctrl = [2.0] * 60
    assert events.gap(range(60), [2.2] * 60, ctrl) is None  # 0.2 nats: below the gap
    late = [2.0] * 30 + [2.8] * 30
    assert events.gap(range(60), late, ctrl) == 33  # 10-step mean gap: 0.24 at step 32, 0.32 at 33
    assert events.gap(range(60), [2.0] * 30 + [2.8] * 15 + [2.0] * 15, ctrl) is None  # not 20 steps running
    loss = [2.0] * 10
    assert events.low_precision(range(10), loss, [2.05] * 10) is None
    assert events.low_precision(range(10), loss, [2.0] * 4 + [2.2, 2.0] * 3) is None  # never 3 running
    assert events.low_precision(range(10), loss, [2.0] * 6 + [math.nan] + [2.0] * 3) == 6


def test_run_event_takes_the_earliest_and_lead_counts_from_the_first_firing() -> None:
    steps = list(range(60))
    loss = [2.0] * 60
    lp = [2.0] * 40 + [math.inf] * 20
    ev = events.run_event(steps, loss, lp, control_loss=[1.0] * 60)  # gap from step 0, lp at 40
    assert ev == events.Event(0, "gap")
    ev = events.run_event(steps, loss, lp)
    assert ev == events.Event(40, "low precision")
    assert events.lead(ev, [12, 14, 50]) == 28
    assert events.lead(ev, [44]) == -4
    assert events.lead(None, [3]) is None


def test_clopper_pearson_matches_the_closed_forms() -> None:
    lo, hi = events.clopper_pearson(0, 2000)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / 2000), rel=1e-9)
    lo, hi = events.clopper_pearson(2000, 2000)
    assert lo == pytest.approx(0.025 ** (1 / 2000), rel=1e-9)
    lo, hi = events.clopper_pearson(10, 1000)
    assert lo < 0.01 < hi


def _check(step: int, eps: float, logit: float = 10.0, headroom: float = 10.0, rho: float = 5.0) -> dict:
    return {
        "step": float(step),
        "stability/eps_mach": eps,
        "stability/block0/attn_logit_max": logit,
        "stability/block1/attn_logit_max": 1.0,
        "stability/fp16_headroom": headroom,
        "stability/block0/amax": 1.0,
        "stability/block0/rho_ln": rho,
    }


def test_adapter_fires_on_the_frozen_levels_only_where_they_apply() -> None:
    bf16, fp16, fp32 = 2.0**-7, 2.0**-10, 2.0**-23
    checks = [
        _check(2, bf16, logit=99.0),
        _check(4, bf16, logit=101.0),
        _check(6, bf16, headroom=1.5),  # headroom: FP16 passes only
        _check(8, fp16, headroom=1.5),
        _check(10, fp32, rho=0.5),  # rho_ln: FP16/BF16 passes only
        _check(12, bf16, rho=0.5),
    ]
    fired = alarm_steps(checks)
    assert [s for s, _ in fired] == [4, 8, 12]
    assert fired[0][1].startswith("attn_logit_max>100 in block 0")
    assert [s for s, _ in alarm_steps(checks, attn_logit_max=98.0)] == [2, 4, 8, 12]
    # precision-aware: logit x eps_mach > 100 * 2^-7 is the logit 100 at BF16 and 800 at FP16
    pa = [_check(2, bf16, logit=120.0), _check(4, fp16, logit=120.0), _check(6, fp16, logit=900.0)]
    assert precision_aware_steps(pa, 100 * 2.0**-7) == [2, 6]


def test_baselines_on_known_series() -> None:
    steps = {"step": list(range(200)), "train/loss": [2.0, 2.1] * 100, "train/grad_norm": [1.0] * 200}
    steps["train/loss"][150] = 40.0
    found = loss_detectors(steps)
    assert found["lightning_spike"] == [150]
    assert found["olmo_6sigma"] == [150]
    flat = [{"step": float(i), "stability/kappa_softmax_max": 1.0 + 0.01 * (i % 2)} for i in range(30)]
    flat[25]["stability/kappa_softmax_max"] = 5.0
    assert paper_steps(flat) == [25]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_control_differs_from_the_failing_arm_in_one_setting(name: str) -> None:
    s = SCENARIOS[name]
    fail, ctrl = s.spec("fail", 0), s.spec("control", 0)
    diffs = [(k, fail.arch.get(k), ctrl.arch.get(k)) for k in fail.arch.keys() | ctrl.arch.keys()]
    diffs += [(k, fail.optim.get(k), ctrl.optim.get(k)) for k in fail.optim.keys() | ctrl.optim.keys()]
    assert len([d for d in diffs if d[1] != d[2]]) == 1
    assert (fail.family, fail.whatif, fail.steps, fail.seed) == (
        ctrl.family,
        ctrl.whatif,
        ctrl.steps,
        ctrl.seed,
    )


def test_data_needs_no_download_and_the_split_is_fixed() -> None:
    files = stdlib_files()
    assert len(files) > 50 and files == sorted(files)
    train, val = stdlib_bytes("train"), stdlib_bytes("val")
    assert train.numel() > 10 * val.numel() / 2 and int(train.max()) < 256
    assert bytes(train[:64].tolist()) == files[0].read_bytes()[:64]
    images, labels = digits("train")
    v_images, _ = digits("val")
    assert images.shape[1:] == (1, 8, 8) and images.shape[0] + v_images.shape[0] == 1797
    assert float(images.max()) == 1.0 and set(labels.tolist()) == set(range(10))


def test_quick_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tiny real runs: the saved JSON schema, the monitor's own alarm equal to the adapter's replay,
    and the summary counting every healthy check."""
    from heldout import run

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    run.main(["quick", "--out", str(tmp_path / "res")])
    records = sorted((tmp_path / "res").glob("*/*/seed*.json"))
    assert [p.relative_to(tmp_path / "res").as_posix() for p in records] == [
        "healthy_vit/healthy/seed0.json",
        "llama_logit_growth/control/seed0.json",
        "llama_logit_growth/fail/seed0.json",
    ]
    checks_total = 0
    for path in records:
        raw = json.loads(path.read_text())
        assert set(raw) == {"spec", "wall_s", "steps", "checks"}
        assert set(raw["checks"]) == {"tags", "rows"}
        rec = load_record(path)
        st = rec["steps"]
        assert st["step"] == [float(i) for i in range(rec["spec"]["steps"])]
        for tag in ("train/loss", "train/whatif_loss", "train/grad_norm", "train/logit_absmax"):
            assert len(st[tag]) == len(st["step"]) and all(math.isfinite(v) for v in st[tag])
        assert all(abs(a - b) < 0.1 for a, b in zip(st["train/loss"], st["train/whatif_loss"], strict=True))
        checks = rec["checks"]
        assert [c["step"] for c in checks] == [float(s) for s in range(1, rec["spec"]["steps"], 2)]
        eps = 2.0**-10 if rec["spec"]["whatif"] == "fp16" else 2.0**-7
        assert all(c["stability/eps_mach"] == eps for c in checks)
        assert all("stability/block1/attn_logit_max" in c and "stability/block1/rho_ln" in c for c in checks)
        online = [int(c["step"]) for c in checks if c["stability/alarm"] == 1.0]
        assert online == [s for s, _ in alarm_steps(checks)]
        if rec["spec"]["arm"] != "fail":
            checks_total += len(checks)
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["runs"] == 3
    assert summary["false_alarms"]["default"]["checks"] == checks_total
    assert len(summary["sweeps"]["default_logit"]) == 10
    assert (tmp_path / "res" / "tables.md").read_text().startswith("Runs scored: 3.")

"""Instability scenarios: each control differs in one thing; `evaluate.py --quick` end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

SCEN_DIR = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
if str(SCEN_DIR) not in sys.path:
    sys.path.insert(0, str(SCEN_DIR))

import evaluate  # noqa: E402
import gpt  # noqa: E402


@pytest.fixture(autouse=True)
def _argv_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["evaluate.py"])
    torch.set_num_threads(1)


@pytest.mark.parametrize("scenario", list(evaluate.SCENARIOS))
def test_control_differs_from_scenario_in_one_model_argument(scenario: str) -> None:
    fail = yaml.safe_load((SCEN_DIR / "configs" / f"{scenario}.yaml").read_text())
    ctrl = yaml.safe_load((SCEN_DIR / "configs" / f"{scenario}_control.yaml").read_text())
    diff = {
        k for k in fail["model"].keys() | ctrl["model"].keys() if fail["model"].get(k) != ctrl["model"].get(k)
    }
    assert len(diff) == 1, diff
    fail["trainer"]["logger"]["init_args"].pop("name")
    ctrl["trainer"]["logger"]["init_args"].pop("name")
    assert (fail["trainer"], fail["data"]) == (ctrl["trainer"], ctrl["data"])


def test_markov_language_follows_its_transition_support() -> None:
    tok = gpt.markov_language(vocab_size=16, branching=3, n_sequences=64, seq_len=40, seed=5)
    assert tok.shape == (64, 41) and tok.dtype == torch.int64
    pairs = torch.stack([tok[:, :-1].reshape(-1), tok[:, 1:].reshape(-1)], 1).unique(dim=0)
    successors = torch.bincount(pairs[:, 0], minlength=16)
    assert int(successors.max()) <= 3  # never more successors than the branching
    assert torch.equal(tok, gpt.markov_language(16, 3, 64, 40, seed=5))


def test_logged_attention_logit_is_the_max_scaled_score() -> None:
    model = gpt.ScenarioGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_len=8, seed=1)
    attn = model.blocks[0].attn
    x = torch.randn(3, 8, 16)
    attn.train()
    attn(x)
    with torch.no_grad():  # float64 by hand: q·kᵀ/√d over attended (causal) keys
        w = attn.qkv.weight.double()
        b = attn.qkv.bias.double()
        qkv = x.double() @ w.T + b
        q, k = qkv[..., :16].reshape(3, 8, 2, 8), qkv[..., 16:32].reshape(3, 8, 2, 8)
        s = torch.einsum("bihd,bjhd->bhij", q, k).abs() / math.sqrt(8)
        expected = s.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), 0).max().item()
    assert attn.last_logit_max == pytest.approx(expected, rel=1e-5)


def test_evaluate_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    table = evaluate.main(["--quick", "--out", str(out), "--scenarios", "logit_growth", "short_warmup"])
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert [r.split("|")[1].strip().rstrip("\\*") for r in rows] == ["logit_growth", "short_warmup"]
    assert (out / "scenario_logit_growth.png").stat().st_size > 10_000
    scores = json.loads((out / "scores.json").read_text())
    fail, ctrl = scores[0]
    assert (fail["scenario"], fail["control"], ctrl["control"]) == ("logit_growth", False, True)
    # the replay saw the monitor's signals (κ_softmax is logged by this monitor version)
    assert fail["available"]["paper z(κ_softmax)>1.5"] and fail["available"]["entropy<0.1"]
    # every signal from the monitor's own tags (no scenario/* stand-in), r_local included
    assert not fail["fallback"] and fail["available"]["r_local>10·eps"] and fail["r_local_peak_all"] > 0
    # one implementation: the monitor's logged stability/alarm is the offline replay of the default
    assert fail["online_matches"] is True and ctrl["online_matches"] is True
    run = evaluate.load_run(out / "logit_growth" / "seed0")
    loss = run.get("train/loss")
    assert loss is not None and loss.steps.tolist() == list(range(30))
    checks = evaluate.sampled_steps(run)
    assert [int(c["step"]) for c in checks] == [4, 9, 14, 19, 24, 29]  # Lightning's step of the batch
    # every alarm the table reports is a step of the monitor where the rule's level really was crossed,
    # in the block it names
    for step, block in fail["alarms"]["attn_logit_max>100"]:
        values = next(c for c in checks if c["step"] == step)
        assert values[f"stability/block{block}/attn_logit_max"] > 100


def test_loss_divergence_rule() -> None:
    steps = list(range(1, 41))
    values = [3.0] * 20 + [3.05] * 5 + [3.6] * 15
    run = evaluate.Run("r", Path("."), {"train/loss": evaluate_series(steps, values)})
    # the 10-step mean first reaches 3.0 + 0.3 when 5 of its values are 3.6 (mean 3.325)
    assert evaluate.loss_divergence(run) == 30
    flat = evaluate.Run("r", Path("."), {"train/loss": evaluate_series(steps, [3.0] * 40)})
    assert evaluate.loss_divergence(flat) is None


def evaluate_series(steps: list[int], values: list[float]) -> object:
    import numpy as np

    from lightning_stability.analysis.logs import Series

    return Series(np.array(steps), np.array(values, dtype=float))


def test_paper_rule_replays_the_monitors_logged_alarm(tmp_path: Path) -> None:
    """One implementation: the paper alarm replayed on the logged κ_softmax is the logged alarm."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_stability import AlarmOptions, StabilityMonitor
    from lightning_stability.diagnostics.rolling import RollingZScore
    from lightning_stability.rules import Alarm, rule_book

    model = gpt.ScenarioGPT(
        vocab_size=16, d_model=16, n_layers=2, n_heads=2, max_len=16, lr=0.1, warmup_steps=0
    )
    data = gpt.MarkovDataModule(vocab_size=16, seq_len=16, n_sequences=128, batch_size=8)
    monitor = StabilityMonitor(
        every_n_steps=1,
        sample_size=4,
        precision="bf16",
        alarm=AlarmOptions(rule="paper", window=3, threshold=0.5),
    )
    trainer = Trainer(
        max_steps=16,
        logger=TensorBoardLogger(tmp_path, name="r", version=0),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    checks = evaluate.sampled_steps(evaluate.load_run(tmp_path / "r" / "version_0"))
    assert len(checks) == 16
    book = rule_book("paper", {"kappa_softmax_z": 0.5}, window=3)
    alarm = Alarm(book.alarm_rules, RollingZScore)
    replay = [float(alarm.update(c).fired) for c in checks]
    logged = [c["stability/alarm"] for c in checks]
    assert sum(logged) >= 1  # the comparison is not vacuous
    assert replay == logged


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:.*StabilityMonitor early warning.*")
def test_logit_growth_gets_one_judgement_online_and_in_the_report(tmp_path: Path) -> None:
    """The logit-growth scenario at 60 steps: the monitor's judgement is the report's, and the report
    names the rule that fired; its one sentence on κ_softmax's lead speaks of κ_softmax only."""
    from lightning_stability import StabilityMonitor
    from lightning_stability.analysis.report import build_report

    cli = gpt.main(
        [
            "fit",
            f"--config={SCEN_DIR / 'configs' / 'logit_growth.yaml'}",
            "--trainer.max_steps=60",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.name=logit_growth",
            "--trainer.logger.init_args.version=0",
        ]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, StabilityMonitor))
    online = monitor.judgement
    assert online is not None and online.status == "watch" and online.alarm.first is not None
    assert (online.alarm.first.rule, online.alarm.first.block) == ("attn_logit_max", 0)
    assert [(a.kind, a.block) for a in online.advice] == [("qk_norm_or_clip", 0)]
    rep = build_report(tmp_path, tmp_path / "out", max_lag=10, n_permutations=50, plots=False, progress=False)
    (verdict,) = rep.verdicts
    assert verdict.judgement.key() == online.key()
    text = rep.markdown.read_text().split("## Predictor")[0]
    assert 'Early warning (alarm.rule="default") fired at steps 24, 29,' in text
    assert "first: attn_logit_max>100 in block 0 (value 1" in text
    assert "κ_softmax (the paper's early-warning signal)" in text and "noise" not in text
    assert "What to try: qk-norm, or QK-clip at τ = 100, for the attention of block 0." in text

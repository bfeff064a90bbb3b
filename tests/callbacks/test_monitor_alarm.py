"""The monitor's alarm on real tiny fits: the default rule names the block, warns once per episode,
the paper's rule is kept as an option, the state survives a resume, the arguments are validated."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tests.conftest import MemoryLogger, TinyTransformer, make_loader, trainer_kwargs

from lightning_stability import AlarmOptions, StabilityMonitor
from lightning_stability.stability_report import StabilityReport

#: per-head width of TinyTransformer (d=32, 4 heads): SDPA scales q·k by 1/sqrt(8)
HEAD_DIM = 8


class Recording(StabilityMonitor):
    """Records the reports ``on_alarm`` was called with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.called: list[tuple[int, str | None]] = []

    def on_alarm(self, trainer: Trainer, pl_module: LightningModule, report: StabilityReport) -> None:
        self.called.append((report.step, report.alarm_reason))


class HotLogits(TinyTransformer):
    """Block ``hot``'s attention has q = k = a·LN(x) while ``on`` says so (else the init weights).

    Then the logit of a token with itself in head h is ``a²‖LN(x)_h‖²/√8``; the heads' squared
    norms sum to ``‖LN(x)‖² ≈ 32`` (LayerNorm at init: weight 1, bias 0), so some head has
    ``‖LN(x)_h‖² ≥ 8`` and its logit is ≥ ``8a²/√8`` — > 100 for ``a = 10`` (≥ 283).
    """

    def __init__(self, hot: int = 1, a: float = 10.0, on: tuple[int, ...] | None = None) -> None:
        super().__init__(lr=0.0)
        self.hot, self.a, self.on = hot, a, on
        w = self.blocks[hot].attn.qkv.weight
        self.init_qk = (w[:64].detach().clone(), self.blocks[hot].attn.qkv.bias[:64].detach().clone())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        qkv = self.blocks[self.hot].attn.qkv
        hot = self.on is None or self.global_step in self.on
        with torch.no_grad():
            if hot:
                eye = self.a * torch.eye(32)
                qkv.weight[:64] = torch.cat([eye, eye])
                qkv.bias[:64] = 0.0
            else:
                qkv.weight[:64], qkv.bias[:64] = self.init_qk


def fit(
    model: LightningModule, tmp_path: Path, monitor: StabilityMonitor, steps: int, **kw: Any
) -> tuple[Trainer, MemoryLogger]:
    logger = MemoryLogger()
    ckpt = kw.pop("ckpt_path", None)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=steps, logger=logger, **kw), callbacks=[monitor])
    trainer.fit(model, make_loader(n=8, batch_size=8), ckpt_path=ckpt)
    return trainer, logger


def _series(logger: MemoryLogger, tag: str) -> dict[int, float]:
    return {int(s): m[tag] for s, m in logger.records if s is not None and tag in m}


def _early_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "early warning" in str(w.message)]


def test_default_alarm_fires_on_logits_above_100_names_the_block_and_is_silent_on_the_control(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    hot = Recording(every_n_steps=1, sample_size=8, precision="bf16")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(HotLogits(), tmp_path, hot, steps=4)
    torch.manual_seed(0)
    control = Recording(every_n_steps=1, sample_size=8, precision="bf16")
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        _, control_log = fit(TinyTransformer(lr=0.0), tmp_path, control, steps=4)
    assert hot.last_report is not None and control.last_report is not None
    # the signal itself, as logged: block 1 above 100 by construction, block 0 and the control below
    logits = [b.attn_logit_max for b in hot.last_report.blocks]
    assert logits[1] is not None and logits[1] >= 8 * 10.0**2 / math.sqrt(HEAD_DIM) * 0.99
    assert logits[0] is not None and logits[0] < 100
    assert all(b.attn_logit_max is not None and b.attn_logit_max < 100 for b in control.last_report.blocks)
    # fires at every check, warns and calls on_alarm once (one episode), naming block 1
    assert hot.last_report.alarm is True
    assert hot.called == [(0, hot.last_report.alarm_reason)]  # report.step: the logged step
    reason = hot.called[0][1]
    assert reason is not None and reason.startswith("attn_logit_max>100 in block 1 ('blocks.1')")
    assert (hot.last_report.alarm_rule, hot.last_report.alarm_block) == ("attn_logit_max", 1)
    assert len(_early_warnings(record)) == 1 and reason in _early_warnings(record)[0]
    assert not control.called and not _early_warnings(quiet)
    assert set(_series(control_log, "stability/alarm").values()) == {0.0}
    assert control.last_report.alarm is False and control.last_report.alarm_reason is None
    assert control.last_report.alarm_rule is None and control.last_report.alarm_block is None
    assert hot.judgement is not None and hot.judgement.alarm.steps == [0, 1, 2, 3]
    assert 'early warning (alarm.rule="default") fired at steps 0, 1, 2, 3' in (hot.summary or "")
    assert control.judgement is not None and control.judgement.status == "healthy"


def test_one_warning_per_episode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = Recording(every_n_steps=1, sample_size=8, precision="bf16")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # hot batches 1, 2, 5 (0-based): measured after their optimizer step, logged at 1, 2, 5
        _, logger = fit(HotLogits(on=(1, 2, 5)), tmp_path, monitor, steps=7)
    fired = _series(logger, "stability/alarm")
    assert fired == {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 1.0, 6: 0.0}
    assert [s for s, _ in monitor.called] == [1, 5]
    assert len(_early_warnings(record)) == 2


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_keeps_the_latch_of_an_open_episode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = HotLogits()
    first = Recording(every_n_steps=1, sample_size=8, precision="bf16")
    trainer, _ = fit(model, tmp_path, first, steps=3)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.called and first.state_dict()["alarm_latch"]["active"] is True
    resumed = Recording(every_n_steps=1, sample_size=8, precision="bf16")
    _, logger = fit(model, tmp_path, resumed, steps=6, ckpt_path=str(ckpt))
    assert _series(logger, "stability/alarm") == {3: 1.0, 4: 1.0, 5: 1.0}
    assert resumed.called == []  # the episode started before the checkpoint: no second warning
    fresh = Recording(every_n_steps=1, sample_size=8, precision="bf16", alarm=AlarmOptions(rule="paper"))
    fresh.load_state_dict(first.state_dict())  # another rule's memory is not loaded
    assert fresh.state_dict()["alarm_latch"]["active"] is False


class Jump(TinyTransformer):
    """One fixed batch and lr=0: κ_softmax is constant until the planted jump at step 6."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == 6:
            with torch.no_grad():  # sharpen attention: κ_softmax jumps
                self.blocks[0].attn.qkv.weight[:64].mul_(8.0)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_paper_rule_keeps_its_window_across_a_resume(tmp_path: Path) -> None:
    kw = dict(every_n_steps=1, alarm=AlarmOptions(rule="paper", window=4, threshold=3.0))
    torch.manual_seed(0)
    whole = Recording(**kw)
    _, whole_log = fit(Jump(lr=0.0), tmp_path, whole, steps=8)
    torch.manual_seed(0)
    model = Jump(lr=0.0)
    first = Recording(**kw)
    trainer, _ = fit(model, tmp_path, first, steps=4)
    ckpt = tmp_path / "paper.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = Recording(**kw)
    _, log = fit(model, tmp_path, resumed, steps=8, ckpt_path=str(ckpt))
    expected = {s: v for s, v in _series(whole_log, "stability/alarm").items() if s > 3}
    assert expected[6] == 1.0  # not vacuous: the jump fires, and only with steps 0–3 in the window
    assert _series(log, "stability/alarm") == expected
    assert [s for s, _ in resumed.called] == [6]
    assert resumed.called[0][1] is not None and resumed.called[0][1].startswith("z(kappa_softmax_max)>3")
    assert resumed.judgement is not None and resumed.judgement.alarm.steps == [6]
    assert [(f.rule, f.level) for f in resumed.judgement.findings if f.rule == "kappa_softmax_z"] == [
        ("kappa_softmax_z", "watch")
    ]  # a firing of the paper rule is a finding: never healthy


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("rule", "zscore"),
        ("attn_logit_max", 0.0),
        ("attn_logit_max", float("nan")),
        ("fp16_headroom_bits", 17.0),
        ("rho_ln", -1.0),
        ("rho_ln", "1"),
        ("window", 1),
        ("threshold", float("nan")),
    ],
)
def test_bad_alarm_options_name_the_option_and_value(arg: str, value: Any) -> None:
    with pytest.raises(MisconfigurationException, match=rf"`alarm.{arg}`.*got {value!r}"):
        StabilityMonitor(alarm=AlarmOptions(**{arg: value}))
    with pytest.raises(MisconfigurationException, match=r"`alarm` must be AlarmOptions\(...\), got \{'rule'"):
        StabilityMonitor(alarm={"rule": "paper"})  # type: ignore[arg-type]


def test_cli_parses_the_alarm_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["prog"])
    cli = LightningCLI(
        TinyTransformer,
        run=False,
        args=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning_stability.StabilityMonitor",
            "--trainer.callbacks.alarm.rule=paper",
            "--trainer.callbacks.alarm.attn_logit_max=50",
            "--trainer.callbacks.alarm.fp16_headroom_bits=3.5",
            "--trainer.callbacks.alarm.rho_ln=0.5",
            "--trainer.callbacks.alarm.window=10",
        ],
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, StabilityMonitor))
    assert monitor.alarm == AlarmOptions("paper", 50.0, 3.5, 0.5, 10, 1.5)
    assert monitor.state_dict()["judge"]["alarm"] == "paper"
    default = StabilityMonitor(alarm=AlarmOptions(attn_logit_max=50, fp16_headroom_bits=3.5, rho_ln=0.5))
    rules = [r.label for r in default._judge.book.alarm_rules]
    assert rules == ["attn_logit_max>50", "fp16_headroom<3.5", "rho_ln<0.5"]
    with pytest.raises(SystemExit):
        LightningCLI(
            TinyTransformer,
            run=False,
            args=[
                "--trainer.callbacks+=lightning_stability.StabilityMonitor",
                "--trainer.callbacks.alarm.rule=z",
            ],
        )

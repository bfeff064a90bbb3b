"""The report's verdict: the rule book on the logged series, the same judgement the monitor gave online."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tests.conftest import TinyTransformer, make_loader, trainer_kwargs

from lightning_stability import StabilityMonitor
from lightning_stability.analysis.logs import Run, Series, load_run
from lightning_stability.analysis.verdict import logged_steps, run_verdict


def _run(eps: float) -> Run:
    steps = np.arange(3)

    def s(v: float) -> Series:
        return Series(steps, np.full(3, v))

    return Run(
        "r",
        Path("."),
        {
            "stability/eps_mach": s(eps),
            "stability/block0/r_local": s(eps / 4),
            "stability/block0/rho_ln": s(0.3),
        },
    )


@pytest.mark.parametrize(("eps", "flagged"), [(2.0**-23, False), (2.0**-10, True), (2.0**-7, True)])
def test_rho_ln_flagged_only_for_a_low_precision_pass(eps: float, flagged: bool) -> None:
    v = run_verdict(_run(eps))
    assert (v.status == "watch") is flagged
    assert any(a.kind == "eps_bump" for a in v.judgement.advice) is flagged


def test_logged_steps_gather_the_stability_tags_of_each_step() -> None:
    run = _run(2.0**-7)
    run.scalars["train/loss"] = Series(np.arange(3), np.ones(3))
    steps = logged_steps(run)
    assert [s for s, _ in steps] == [0, 1, 2]
    assert set(steps[0][1]) == {"stability/eps_mach", "stability/block0/r_local", "stability/block0/rho_ln"}


def _fit(tmp_path: Path, model: TinyTransformer, steps: int) -> tuple[StabilityMonitor, Path]:
    monitor = StabilityMonitor(every_n_steps=1, sample_size=8, precision="bf16")
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=steps, logger=logger), callbacks=[monitor])
    trainer.fit(model, make_loader(n=16, tokens=12))
    return monitor, tmp_path / "run" / "version_0"


@pytest.mark.filterwarnings("ignore:.*StabilityMonitor early warning.*", "ignore:.*log_every_n_steps.*")
def test_online_and_offline_judgements_of_one_fit_agree(tmp_path: Path) -> None:
    torch.manual_seed(0)
    healthy, log_dir = _fit(tmp_path / "healthy", TinyTransformer(depth=3), steps=5)
    online = healthy.judgement
    assert online is not None and online.status == "healthy" and online.steps == 5
    offline = run_verdict(load_run(log_dir)).judgement
    assert offline.key() == online.key()
    assert offline.extremes["r_local"].block == online.extremes["r_local"].block
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    with torch.no_grad():  # block 1's Q and K ×9: logits above 100 from the first step
        model.blocks[1].attn.qkv.weight[:64] *= 9.0
    alarmed, log_dir = _fit(tmp_path / "alarmed", model, steps=5)
    online = alarmed.judgement
    assert online is not None and online.status == "watch" and online.alarm.steps
    assert online.alarm.first is not None and (online.alarm.first.rule, online.alarm.first.block) == (
        "attn_logit_max",
        1,
    )
    offline = run_verdict(load_run(log_dir)).judgement
    assert offline.key() == online.key() and offline.alarm.identified

"""The verdict at the end of fit, on a real tiny fit with one block made fragile by construction."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tests.conftest import TinyTransformer, make_loader, trainer_kwargs

from lightning_stability import StabilityMonitor
from lightning_stability.stability_report import BlockReport, StabilityReport
from lightning_stability.verdict import FitVerdict

warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")


class Recording(StabilityMonitor):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.reports: list[StabilityReport] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:  # type: ignore[override]
        before = self.last_report
        super().on_train_batch_end(trainer, pl_module, *args)
        if self.last_report is not before and self.last_report is not None:
            self.reports.append(self.last_report)


def test_end_of_fit_verdict_names_the_fragile_block(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    seed_everything(0)
    model = TinyTransformer(depth=4, lr=1e-3)
    with torch.no_grad():  # block 2's Q and K ×9: attention logits above 100
        model.blocks[2].attn.qkv.weight[:64] *= 9.0
    monitor = Recording(every_n_steps=1, sample_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=3, logger=logger, precision="bf16-mixed"), callbacks=[monitor]
    )
    trainer.fit(model, make_loader(tokens=24))
    assert len(monitor.reports) == 3
    summary = monitor.summary
    assert summary is not None and summary in capsys.readouterr().out  # printed on rank zero

    # the values it names are the measured extremes
    worst_value, worst_step, worst_name = max(
        (b.r_local, r.step, b.name) for r in monitor.reports for b in r.blocks if b.r_local is not None
    )
    assert worst_name == "blocks.2"
    assert f"blocks.2, r_local = {worst_value:.3g} at step {worst_step}" in summary
    logit, logit_step = max((r.attn_logit_max, r.step) for r in monitor.reports if r.attn_logit_max)
    assert logit > 100 and f"largest attention logit: {logit:.4g} in blocks.2 at step {logit_step}" in summary
    room, room_step, module = min((r.fp16_headroom, r.step, r.amax_module) for r in monitor.reports)
    assert f"FP16 headroom: {room:.2f} bits" in summary and f"in {module}, step {room_step}" in summary
    # the default alarm (attn_logit_max > 100) fires at every check, naming block 2
    assert "early warning (stability/alarm) fired at steps 0, 1, 2" in summary
    assert all(
        r.alarm_reason and r.alarm_reason.startswith("attn_logit_max>100 in block 2") for r in monitor.reports
    )
    # and what to try follows from them
    assert "keep blocks.2's attention in FP32" in summary
    assert "QK-clip" in summary and "LNEpsilonBump" not in summary

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    runs = list((tmp_path / "tb").glob("version_*"))
    acc = EventAccumulator(str(runs[0]), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("stability/summary/text_summary")
    assert event.tensor_proto.string_val[0].decode().replace("  \n", "\n") == summary
    assert acc.Scalars("stability/worst_block")[-1].value == 2


def test_verdict_advice_follows_the_measured_values() -> None:
    verdict = FitVerdict()
    calm = [
        BlockReport(f"b{i}", r_local=1e-3, r_attention_local=2e-3, r_ffn_local=1e-3, rho_ln=5.0)
        for i in range(3)
    ]
    verdict.update(StabilityReport(1, "float16", 2**-10, calm, fp16_headroom=9.0, amax_module="b0.mlp"))
    text = verdict.summary()
    assert "nothing measured calls for a change" in text and "1.0× the other blocks' median" in text
    hot = [
        BlockReport("b0", r_local=1e-3, rho_ln=0.2),
        BlockReport("b1", r_local=8e-3, r_attention_local=1e-3, r_ffn_local=9e-3, rho_ln=3.0),
    ]
    verdict.update(
        StabilityReport(2, "float16", 2**-10, hot, fp16_headroom=1.5, amax_module="b1.mlp.0", alarm=True)
    )
    text = verdict.summary()
    assert "b1, r_local = 0.008 at step 2, 8.0× the other blocks' median (stands out)" in text
    assert "keep b1's FFN in FP32" in text
    assert "LNEpsilonBump for ε-dominated norms (rho_ln = 0.2 < 1 in b0)" in text
    assert "1.50 bits before FP16 overflows" in text and "lower learning rate" in text
    assert "fired at steps 2" in text
    again = FitVerdict()
    again.load_state_dict(verdict.state_dict())  # a resumed fit keeps its verdict
    assert again.summary() == text
    assert math.isclose(again.headroom.value if again.headroom else 0, 1.5)


def test_rho_ln_of_an_fp32_pass_is_not_called_epsilon_dominated() -> None:
    # ρ_LN = σ²·d·ε_mach/ε is < 1 for most norms at ε_mach = 2⁻²³: no advice from an FP32 pass
    blocks = [BlockReport("b0", r_local=0.0, rho_ln=0.3)]
    fp32 = FitVerdict()
    fp32.update(StabilityReport(1, "float32", 2**-23, blocks))
    assert fp32.rho_ln is None and "LNEpsilonBump" not in fp32.summary()
    bf16 = FitVerdict()
    bf16.update(StabilityReport(1, "bfloat16", 2**-7, blocks))
    assert "LNEpsilonBump for ε-dominated norms (rho_ln = 0.3 < 1 in b0)" in bf16.summary()

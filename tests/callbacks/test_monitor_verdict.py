"""The end-of-fit verdict (``monitor.judgement``, ``monitor.summary``) on real tiny fits and on reports."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tests.conftest import TinyTransformer, make_loader, trainer_kwargs
from tests.scripts import load_script
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability import StabilityMonitor
from lightning_stability.rules import Evidence, Judge, render, rule_book
from lightning_stability.rules.thresholds import FP32_ADVICE_FLOOR_EPS, STANDS_OUT
from lightning_stability.stability_report import BlockReport, StabilityReport

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
    summary, j = monitor.summary, monitor.judgement
    assert summary is not None and j is not None
    assert summary in capsys.readouterr().out  # printed on rank zero
    assert summary.startswith("StabilityMonitor verdict: watch (3 sampled step(s), low precision BF16")

    # the finding is the measured extreme, in the block the default alarm names at every check
    logit, logit_step = max((r.attn_logit_max, r.step) for r in monitor.reports if r.attn_logit_max)
    (finding,) = j.findings
    assert (finding.rule, finding.level, finding.block) == ("attn_logit_max", "watch", 2)
    assert finding.block_name == "blocks.2"
    assert (finding.value, finding.step, finding.threshold) == (logit, logit_step, 100.0)
    assert j.alarm.steps == [0, 1, 2] and j.alarm.first is not None and j.alarm.first.block == 2
    assert all(r.alarm_rule == "attn_logit_max" and r.alarm_block == 2 for r in monitor.reports)
    reasons = [r.alarm_reason or "" for r in monitor.reports]
    assert all(r.startswith("attn_logit_max>100 in block 2 ('blocks.2')") for r in reasons)
    # the most fragile block by r_local, as measured
    worst_value, worst_step, worst_name = max(
        (b.r_local, r.step, b.name) for r in monitor.reports for b in r.blocks if b.r_local is not None
    )
    ext = j.extremes["r_local"]
    assert (ext.block_name, ext.raw, ext.step) == (worst_name, worst_value, worst_step)
    assert worst_name == "blocks.2"
    # what to try answers the finding; block 2 stands out by r_local but is below the advice floor
    assert [(a.kind, a.block, a.part) for a in j.advice] == [("qk_norm_or_clip", 2, "attention")]
    assert ext.others_median is not None and ext.value / ext.others_median >= STANDS_OUT
    assert ext.value < FP32_ADVICE_FLOOR_EPS
    assert "qk-norm, or QK-clip at τ = 100, for the attention of blocks.2 (block 2)." in summary

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((tmp_path / "tb").glob("version_*"))
    acc = EventAccumulator(str(runs[0]), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("stability/summary/text_summary")
    assert event.tensor_proto.string_val[0].decode().replace("  \n", "\n") == summary
    assert acc.Scalars("stability/worst_block")[-1].value == 2


def _judge(*reports: StabilityReport) -> Judge:
    judge = Judge(rule_book("default"))
    for report in reports:
        ev = Evidence.from_tags(report.metrics(), report.step, [b.name for b in report.blocks])
        ev.amax_module = report.amax_module
        judge.observe(ev)
    return judge


def test_verdict_advice_follows_the_measured_values() -> None:
    calm = [
        BlockReport(f"b{i}", r_local=1e-4, r_attention_local=2e-4, r_ffn_local=1e-4, rho_ln=5.0)
        for i in range(3)
    ]
    first = StabilityReport(1, "float16", 2**-10, calm, fp16_headroom=9.0, amax_module="b0.mlp")
    j = _judge(first).judgement()
    assert (j.status, j.findings, j.advice) == ("healthy", [], [])
    assert "nothing measured calls for a change" in render.summary(j)
    hot = [
        BlockReport("b0", r_local=1e-3, rho_ln=0.2, amax=10.0),
        BlockReport("b1", r_local=8e-3, r_attention_local=1e-3, r_ffn_local=9e-3, rho_ln=3.0, amax=2e4),
    ]
    second = StabilityReport(2, "float16", 2**-10, hot, fp16_headroom=1.5, amax_module="b1.mlp.0")
    judge = _judge(first, second)
    j = judge.judgement()
    # r_local 8e-3 = 8.2 ε_mach (watch, past the advice floor, 8× the other block); ρ_LN 0.2; 1.5 bits
    assert j.status == "watch"
    assert [(f.rule, f.level, f.block, f.step) for f in j.findings] == [
        ("fp16_headroom", "watch", 1, 2),
        ("rho_ln", "watch", 0, 2),
        ("r_local", "watch", 1, 2),
    ]
    assert [(a.kind, a.block, a.part, a.module) for a in j.advice] == [
        ("prefer_bf16", 1, "module", "b1.mlp.0"),
        ("eps_bump", 0, "norms", None),
        ("fp32_region", 1, "ffn", None),
    ]
    text = render.summary(j)
    assert "keep the FFN of b1 (block 1) in FP32" in text and "8.0× the other blocks' median" in text
    assert "train in BF16 rather than FP16, or scale the output of b1.mlp.0 down" in text
    again = Judge(rule_book("default"))
    again.load_state_dict(judge.state_dict())  # a resumed fit keeps its verdict
    assert render.summary(again.judgement()) == text and again.judgement().key() == j.key()


def test_rho_ln_of_an_fp32_pass_is_not_called_epsilon_dominated() -> None:
    # ρ_LN = σ²·d·ε_mach/ε is < 1 for most norms at ε_mach = 2⁻²³: no finding from an FP32 pass
    blocks = [BlockReport("b0", r_local=0.0, rho_ln=0.3)]
    fp32 = _judge(StabilityReport(1, "float32", 2**-23, blocks)).judgement()
    assert fp32.status == "healthy" and not fp32.advice and not fp32.extremes["rho_ln"].applicable
    assert "(judged on FP16/BF16/FP8 passes only)" in render.summary(fp32)
    bf16 = _judge(StabilityReport(1, "bfloat16", 2**-7, blocks)).judgement()
    assert [(a.kind, a.block) for a in bf16.advice] == [("eps_bump", 0)]


def _example_llama() -> type[LightningModule]:
    """The Llama of ``examples/rules/llama_at_init.py`` (the same model its report was made with)."""
    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[2] / "examples" / "rules" / "llama_at_init.py"
    return load_script(path).Llama  # type: ignore[no-any-return]


@pytest.mark.timeout(600)
def test_a_healthy_llama_at_initialisation_gets_no_advice(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = _example_llama()(hidden=512, layers=4)
    x = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    monitor = StabilityMonitor(every_n_steps=1, sample_size=8, precision="bf16")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[monitor])
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8))
    j = monitor.judgement
    assert j is not None and j.status == "healthy" and j.findings == [] and j.advice == []
    # not vacuous: block 0 stands out against the others' median, as the relative test alone saw it,
    # and sits just below one rounding (0.85 ε_mach here): the absolute floor is what keeps it healthy
    ext = j.extremes["r_local"]
    assert ext.block == 0 and ext.others_median is not None
    assert ext.value / ext.others_median >= STANDS_OUT
    assert 0.5 < ext.value < 1.0 < FP32_ADVICE_FLOOR_EPS

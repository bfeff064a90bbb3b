"""What the monitor says about the structure: missing weights, unmatched patterns, unattended blocks."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from tests.conftest import Attention, TinyTransformer, make_loader, trainer_kwargs

from lightning_stability import StabilityMonitor


class MixerAttention(Attention):
    """The suite's attention with its output projection under a name no family uses."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__(d, heads)
        self.mixer = self.proj
        del self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.mixer(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def no_wo_model() -> TinyTransformer:
    torch.manual_seed(0)
    model = TinyTransformer()
    for block in model.blocks:
        block.attn = MixerAttention(32, 4)
    return model


def skipping_model() -> TinyTransformer:
    """Block 1 of 2 has an attention module but never calls it."""
    torch.manual_seed(0)
    model = TinyTransformer()
    block = model.blocks[1]
    block.forward = lambda x: x + block.mlp(block.norm2(x))  # type: ignore[method-assign]
    return model


def fit_warnings(
    model: TinyTransformer, tmp_path: Any, **monitor_kw: Any
) -> tuple[StabilityMonitor, list[str]]:
    monitor = StabilityMonitor(every_n_steps=1, precision="bf16", **monitor_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(**trainer_kwargs(tmp_path, callbacks=[monitor], max_steps=3)).fit(
            model, make_loader(n=8, batch_size=8)
        )
    said = [str(w.message) for w in caught if str(w.message).startswith("StabilityMonitor")]
    return monitor, [m for m in said if "alarm cannot fire" not in m]  # 3 steps: too short to arm


def test_missing_w_o_is_warned_once_and_the_predictor_leaves_the_attention_term_out(tmp_path: Any) -> None:
    monitor, said = fit_warnings(no_wo_model(), tmp_path)
    (message,) = [m for m in said if "W_O" in m]
    assert "blocks.0, blocks.1: no attention output projection W_O found" in message
    assert "combined predictor of these blocks leaves out the attention term" in message
    report = monitor.last_report
    assert report is not None and report.step == 2  # measured thrice (logged at 0, 1, 2): warned once
    for b in report.blocks:
        assert b.wo_norm is None and b.kappa_softmax is not None
        assert b.kappa_eff is not None and b.c_ln is not None
        assert b.predictor == b.kappa_eff + b.c_ln


def test_patterns_matching_nothing_are_named(tmp_path: Any) -> None:
    monitor, said = fit_warnings(TinyTransformer(), tmp_path, blocks=["blocks.*", "decoder.layers.*"])
    assert said == ["StabilityMonitor: blocks patterns ['decoder.layers.*'] match no module of the model"]
    assert monitor.last_report is not None and len(monitor.last_report.blocks) == 2


def test_a_block_that_never_sees_attention_while_its_sibling_does_is_named_once(tmp_path: Any) -> None:
    monitor, said = fit_warnings(skipping_model(), tmp_path)
    (message,) = said
    assert message.startswith(
        "StabilityMonitor: block 1 (blocks.1) never sees attention while 1 of 2 blocks of stack blocks do"
    )
    report = monitor.last_report
    assert report is not None
    assert report.blocks[0].kappa_softmax is not None and report.blocks[1].kappa_softmax is None


def test_a_model_found_complete_gets_no_structure_warning(tmp_path: Any) -> None:
    torch.manual_seed(0)
    _, said = fit_warnings(TinyTransformer(), tmp_path)
    assert said == []

"""StabilityMonitor under FSDP2 (ModelParallelStrategy, 2 CPU processes): the same numbers as one process.

Each test reads a scenario of ``workers.py`` (launched once per session) and rebuilds its
measurements with the unsharded model in this process, on each rank's sampled examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import pytest
import torch
from tests.conftest import TinyTransformer
from tests.distributed.conftest import Runs, check_one_process, one_process
from tests.distributed.workers import llama_module
from torch import nn

from lightning_stability.capture.batch import cast_floating

pytestmark = pytest.mark.distributed

#: Bitwise equal, but the residual gains: float32 power iterations through FSDP2's hooks (1e-7 seen).
GAIN = {"residual_gain": 1e-6, "bound": 1e-6}


def bf16_mixed(model: nn.Module) -> AbstractContextManager[Any]:
    """Lightning's ``bf16-mixed`` on CPU."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def hand_written() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(d=32, heads=4, depth=2)


def test_hand_written_model_every_step_measured_as_in_one_process(runs: Runs) -> None:
    assert runs.result("fsdp2")["same_training"]  # bit-identical parameters with and without the monitor
    done = check_one_process(runs, "fsdp2", hand_written, bf16_mixed, [1, 2], GAIN, residual_gain_iters=2)
    names = set(done[-1][1].metrics())
    assert {"stability/block1/kappa_wkwq", "stability/block1/rho_ln", "stability/bound"} <= names
    assert {"stability/block1/r_local", "stability/block1/r_ffn_local"} <= names


def test_llama_every_step_measured_as_in_one_process(runs: Runs) -> None:
    done = check_one_process(runs, "fsdp2_llama", llama_module, bf16_mixed, [1, 2])
    probe, report = done[-1]
    assert [b.name for b in probe.blocks] == ["lm.model.layers.0", "lm.model.layers.1"]
    # GQA query/key weights, the gated FFN and RMSNorm all measured
    names = set(report.metrics())
    assert {"stability/block1/kappa_wkwq", "stability/block1/kappa_eff", "stability/block1/rho_ln"} <= names


def test_weight_spectra_gather_one_block_at_a_time(runs: Runs) -> None:
    """Peak of parameters held in full: one block's FP32 parameters, not the model's."""
    for scenario, model in (("fsdp2", hand_written()), ("fsdp2_llama", llama_module())):
        probe = one_process(runs, scenario, model, 1, lambda m=model: bf16_mixed(m))[0]
        per_block = [sum(p.numel() * 4 for p in b.module.parameters()) for b in probe.blocks]
        total = sum(p.numel() * 4 for p in model.parameters())
        assert runs.result(scenario)["gathered_peak_bytes"] == max(per_block) < total / 2


@contextmanager
def bf16_like_fsdp2(model: nn.Module) -> Iterator[None]:
    """In one process, what ``MixedPrecisionPolicy(param_dtype=bfloat16)`` does to a forward: BF16
    copies of the FP32 parameters, and BF16 inputs at the modules ``fully_shard`` wrapped (the
    blocks and the root)."""
    kept = [(p, p.data) for p in model.parameters()]
    cast = lambda m, a, kw: (cast_floating(a, torch.bfloat16), cast_floating(kw, torch.bfloat16))  # noqa: E731
    with ExitStack() as stack:
        for module in (model, *model.blocks):  # type: ignore[union-attr]
            stack.enter_context(module.register_forward_pre_hook(cast, with_kwargs=True))
        try:
            for p, data in kept:
                p.data = data.to(torch.bfloat16)
            yield
        finally:
            for p, data in kept:
                p.data = data


def test_mixed_precision_reference_uses_fp32_master_weights(runs: Runs) -> None:
    """MixedPrecisionPolicy(param_dtype=bf16): the exact pass all-gathers the FP32 masters.

    The low-precision pass is the BF16 forward FSDP2 trains with; the reference is the FP32
    model. A reference taken with FSDP2's BF16 all-gather (and BF16 inputs) is that BF16
    forward itself: r_block = 0, a plausible "no error" reading.
    """
    ((_, report),) = check_one_process(runs, "fsdp2_mp", hand_written, bf16_like_fsdp2, [1])
    logged = runs.result("fsdp2_mp")["metrics"][0]["metrics"]
    assert logged["stability/eps_mach"] == 2.0**-7  # the all-gather dtype, not the FP32 masters'
    right = logged["stability/block1/r_block"]
    assert right == report.blocks[1].r_block and 1e-3 < right < 2e-2
    wrong = [runs.result("fsdp2_mp", r)["wrong_r_block_sq"][0] for r in (0, 1)]
    assert wrong == [0.0, 0.0]  # BF16 against BF16: what the monitor would report without the FP32 masters


def test_activation_checkpoint_wrapper_measured_as_plain_model(runs: Runs) -> None:
    """FSDP2 over checkpoint_wrapper'd blocks: the plain model's numbers, names and keys."""
    ((_, report),) = check_one_process(runs, "fsdp2_checkpoint", hand_written, bf16_mixed, [1])
    assert runs.result("fsdp2_checkpoint")["block_names"] == ["blocks.0", "blocks.1"]
    assert "stability/block1/r_ffn_local" in report.metrics()

"""StabilityMonitor under tensor parallelism (ModelParallelStrategy(1, 2), 2 CPU processes).

Both ranks train on the same examples, each holding half of every attention's heads and of
every MLP's hidden units. A row-parallel linear map (``RowwiseParallel``: attention output,
MLP down projection) sums two partial products, each rounded to the compute dtype, so the
tensor-parallel forward is not the unsharded forward to the bit: the reference in one process
computes those maps the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.distributed.conftest import Runs, assert_close
from tests.distributed.workers import llama_module, tp_hand_written
from torch import nn

from lightning_stability.capture.probe import StabilityProbe, compose_report

pytestmark = pytest.mark.distributed


@contextmanager
def row_parallel(model: nn.Module, names: tuple[str, ...], parts: int = 2) -> Iterator[None]:
    """Every linear map whose name ends with one of ``names`` computed as ``RowwiseParallel`` does:
    on each rank's slice of the input features with ``bias / parts`` (a replicated bias becomes a
    partial sum), the partial outputs then summed (bitwise DTensor's result, checked on CPU)."""

    def forward(lin: nn.Linear) -> Any:
        def split(x: torch.Tensor) -> torch.Tensor:
            w, size = lin.weight, lin.in_features // parts
            bias = None if lin.bias is None else lin.bias / parts
            outs = [
                F.linear(
                    x[..., r * size : (r + 1) * size].contiguous(), w[:, r * size : (r + 1) * size], bias
                )
                for r in range(parts)
            ]
            return sum(outs[1:], outs[0])

        return split

    targets = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(names)]
    try:
        for lin in targets:
            lin.forward = forward(lin)  # type: ignore[method-assign]
        yield
    finally:
        for lin in targets:
            del lin.forward


def bf16_mixed() -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def one_process_tp(
    runs: Runs, scenario: str, model: nn.Module, step: int, rows: tuple[str, ...], **kw: Any
) -> Any:
    """The report of ``model`` measured in this process on rank 0's examples (both ranks had the same)."""
    params = torch.load(runs.path(scenario, f"params_{scenario}_step{step}.pt"))
    model.load_state_dict(params, strict=False)
    probe = StabilityProbe(model, **kw)
    args, kwargs = torch.load(runs.path(scenario, f"inputs_{scenario}_rank0_step{step}.pt"))
    with row_parallel(model, rows):
        raw = probe.measure(args, kwargs, bf16_mixed, seed=step)
    keys, vec = raw.flat()
    return compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step - 1)


def test_hand_written_values_equal_one_process(runs: Runs) -> None:
    """Per-head values, the means over heads and the example means included (heads gathered)."""
    kw = {"log_per_head": True, "batch_reduction": "mean"}
    result = runs.result("tp_hand_written")
    assert result["warnings"] == [] and [row["step"] for row in result["rows"]] == [1, 2]
    for row, logged in zip(result["rows"], result["metrics"], strict=True):
        report = one_process_tp(
            runs, "tp_hand_written", tp_hand_written(parallel=False), row["step"], ("o_proj", "mlp.2"), **kw
        )
        metrics = {k: v for k, v in logged["metrics"].items() if k != "stability/alarm"}
        assert_close(metrics, report.metrics(), 0.0, f"step {row['step']}")
        assert "stability/block1/head3/kappa_softmax" in metrics


def test_llama_values_equal_one_process(runs: Runs) -> None:
    """Grouped-query heads (4 query, 2 key/value heads: one K/V head per rank)."""
    result = runs.result("tp_llama")
    assert result["warnings"] == [] and [row["step"] for row in result["rows"]] == [1, 2]
    for row, logged in zip(result["rows"], result["metrics"], strict=True):
        report = one_process_tp(runs, "tp_llama", llama_module(), row["step"], ("o_proj", "down_proj"))
        metrics = {k: v for k, v in logged["metrics"].items() if k != "stability/alarm"}
        # not to the bit: column-parallel products of another width accumulate in another order
        # (FP32 rounding, then BF16 roundings it flips); 8.9e-6 relative at most seen
        assert_close(metrics, report.metrics(), 1e-4, f"step {row['step']}")

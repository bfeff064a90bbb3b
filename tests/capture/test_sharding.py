"""capture.sharding in one process: a one-rank device mesh gives real DTensor parameters.

What needs several ranks (gathers, FSDP2, tensor-parallel values) is tested on 2 processes in
``tests/distributed``; here the detection: which blocks have their heads split, what is warned.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_stability.capture.probe import FP8Precision, StabilityProbe
from lightning_stability.capture.sharding import (
    UnsupportedSharding,
    full_weights,
    head_groups,
    is_sharded,
    is_tensor_parallel,
    sharding_warnings,
    unsupported_sharding,
)
from lightning_stability.capture.structure import model_blocks


class Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        if fused:
            self.qkv = nn.Linear(16, 48)
        else:
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o_proj = nn.Linear(16, 16)


class Layer(nn.Module):
    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = Attention(fused)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))


class Model(nn.Module):
    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(fused) for _ in range(2))


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[object]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def parallel(model: Model, mesh: object, attention: dict[str, object]) -> Model:
    plan = {**attention, "mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel()}
    for layer in model.layers:
        parallelize_module(layer, mesh, plan)  # type: ignore[arg-type]
    return model


def test_plain_model_is_not_sharded() -> None:
    model = Model()
    blocks = model_blocks(model)
    assert not is_sharded(model) and not is_tensor_parallel(model) and unsupported_sharding(model) is None
    assert head_groups(model, blocks) == {} and sharding_warnings(model, blocks, {}) == []
    assert [[b.name for b in g] for g in full_weights(blocks)] == [["layers.0", "layers.1"]]


def test_column_parallel_query_splits_the_heads(mesh: object) -> None:
    plan = {f"attn.{p}_proj": ColwiseParallel() for p in "qkv"} | {"attn.o_proj": RowwiseParallel()}
    model = parallel(Model(), mesh, plan)
    blocks = model_blocks(model)
    groups = head_groups(model, blocks)
    assert is_tensor_parallel(model) and sorted(groups) == [0, 1]
    assert sharding_warnings(model, blocks, groups) == []
    assert [[b.name for b in g] for g in full_weights(blocks)] == [
        ["layers.0"],
        ["layers.1"],
    ]  # a block at a time


def test_fused_parallel_attention_warned_once_naming_the_blocks(mesh: object) -> None:
    model = parallel(
        Model(fused=True), mesh, {"attn.qkv": ColwiseParallel(), "attn.o_proj": RowwiseParallel()}
    )
    blocks = model_blocks(model)
    groups = head_groups(model, blocks)
    (warning,) = sharding_warnings(model, blocks, groups)
    assert groups == {} and warning.startswith(
        "layers.0, layers.1: tensor parallel, but the query projection"
    )


def test_mlp_only_tensor_parallel_needs_no_head_gather(mesh: object) -> None:
    """Attention replicated on every rank: every rank sees every head, nothing to warn about."""
    model = parallel(Model(), mesh, {})
    blocks = model_blocks(model)
    assert is_tensor_parallel(model) and head_groups(model, blocks) == {}
    assert sharding_warnings(model, blocks, {}) == []


def test_gathered_weights_are_the_parameters_and_are_put_back(mesh: object) -> None:
    torch.manual_seed(0)
    plain = Model()
    torch.manual_seed(0)
    model = parallel(Model(), mesh, {"attn.q_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel()})
    blocks = model_blocks(model)
    before = [type(p) for p in model.parameters()]
    for (group,), ref in zip(full_weights(blocks), plain.layers, strict=True):
        for (name, p), (_, q) in zip(group.module.named_parameters(), ref.named_parameters(), strict=True):
            assert type(p) is nn.Parameter and torch.equal(p, q), name  # plain tensors, full values
    assert [type(p) for p in model.parameters()] == before  # the DTensors are back


class FullyShardedDataParallel(nn.Module):
    """Stands in for FSDP1's wrapper (recognised by its class name; FSDP1 cannot run on CPU)."""


def test_fsdp1_and_zero3_models_refused_by_the_probe() -> None:
    model = Model()
    model.layers[0].wrapped = FullyShardedDataParallel()
    with pytest.raises(UnsupportedSharding, match=r"FSDP1.*ModelParallelStrategy"):
        StabilityProbe(model)
    model = Model()
    next(model.parameters()).ds_id = 0  # type: ignore[attr-defined]  # what DeepSpeed ZeRO-3 sets
    with pytest.raises(UnsupportedSharding, match=r"DeepSpeed.*single device"):
        StabilityProbe(model)


def test_fp8_what_if_refuses_a_sharded_model(mesh: object) -> None:
    FP8Precision(Model())  # a plain model: fine
    model = parallel(Model(), mesh, {})
    with pytest.raises(UnsupportedSharding, match=r"precision='fp8' does not run on a sharded model"):
        FP8Precision(model, "mxfp8")

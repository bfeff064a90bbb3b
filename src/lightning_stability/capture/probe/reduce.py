"""Raw statistics combined across ranks, with ``torch.distributed`` itself (no Lightning).

Every rank of the process group calls the same functions in the same order: first
:func:`all_ranks_measured` (one small collective: did every rank measure, the same statistics?),
then, only when it says yes, :func:`reduce_across_ranks` (one collective moving every value). A
rank that failed therefore makes all of them stop at the same point instead of leaving the
others waiting in the reduction.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_stability.capture.probe.raw import RawMeasurement
from lightning_stability.capture.sharding import is_dtensor, is_tensor_parallel
from lightning_stability.metrics import RawKey

__all__ = [
    "all_ranks_agree",
    "all_ranks_measured",
    "is_distributed",
    "rank",
    "reduce_across_ranks",
    "tensor_parallel_size",
]

#: ``None``: the default (world) process group.
Group = Any


def is_distributed(group: Group = None) -> bool:
    """Whether a process group of more than one rank is initialised (``group``: the default one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 when nothing is distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _gather(vec: Tensor, group: Group) -> Tensor:
    """``(world, k)``: every rank's ``vec`` (the same length on every rank), in rank order."""
    parts = [torch.empty_like(vec) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, vec.contiguous(), group=group)
    return torch.stack(parts)


def all_ranks_agree(ok: bool, device: torch.device, group: Group = None) -> bool:
    """Whether ``ok`` holds on every rank (a collective when distributed)."""
    if not is_distributed(group):
        return ok
    mine = torch.tensor([float(ok)], dtype=torch.float64, device=device)
    return bool((_gather(mine, group) == 1).all())


def _signature(keys: list[RawKey]) -> float:
    """A checksum of the keys in order (equal on two ranks that kept the same statistics)."""
    return float(zlib.crc32("\n".join(map(repr, keys)).encode()))


def all_ranks_measured(raw: RawMeasurement | None, device: torch.device, group: Group = None) -> bool:
    """Whether every rank measured (``raw`` is not ``None``) the same statistics in the same order.

    One collective of three numbers per rank when distributed: measured or not, how many
    statistics, a checksum of their keys.
    """
    if not is_distributed(group):
        return raw is not None
    keys = list(raw.values) if raw is not None else []
    mine = torch.tensor(
        [float(raw is not None), float(len(keys)) if raw is not None else -1.0, _signature(keys)],
        dtype=torch.float64,
        device=device,
    )
    flags = _gather(mine, group)
    return bool((flags[:, 0] == 1).all() and (flags[:, 1:] == flags[0, 1:]).all())


def tensor_parallel_size(model: nn.Module) -> int:
    """Ranks of one tensor-parallel group of ``model`` (1 without tensor parallelism).

    Read from its DTensor parameters' device mesh: the ``"tensor_parallel"`` dimension when the
    mesh names one (Lightning's ``ModelParallelStrategy``), else the mesh's last dimension.
    """
    if not is_tensor_parallel(model):
        return 1
    mesh = next(p.device_mesh for p in model.parameters() if is_dtensor(p))  # type: ignore[attr-defined]
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names:
        return int(mesh["tensor_parallel"].size())
    return int(mesh.size(mesh.ndim - 1))


def reduce_across_ranks(
    raw: RawMeasurement, group: Group = None, tensor_parallel: int = 1
) -> dict[RawKey, float]:
    """Host floats of ``raw``, combined across ranks as each key's row says (``max`` for κ's, ``min``
    for variances, ``sum`` for error and count parts): one all-gather, then one transfer.

    Call it on every rank, after :func:`all_ranks_measured` said yes; without a process group (or
    with one rank) it is this rank's values. Under tensor parallelism (``tensor_parallel`` > 1
    consecutive ranks hold one model replica and measured the same examples, each with every
    head and the per-module maxima of its own shards) the ranks of a group are combined by max
    first, then the data-parallel replicas by the keys' operations.

    Example:
        >>> raw = RawMeasurement()
        >>> raw.put(RawKey("kappa_v", 0), torch.tensor(3.0))
        >>> reduce_across_ranks(raw)
        {RawKey(name='kappa_v', block=0, head=None, call=None, metric=None, module=None, operand=None): 3.0}
    """
    keys, vec = raw.flat()
    if keys and is_distributed(group):
        gathered = _gather(vec, group)  # (world, k)
        if tensor_parallel > 1:
            gathered = gathered.reshape(-1, tensor_parallel, len(keys)).amax(1)  # (replicas, k)
        is_max = torch.tensor([key.ranks == "max" for key in keys], device=vec.device)
        is_min = torch.tensor([key.ranks == "min" for key in keys], device=vec.device)
        vec = torch.where(is_max, gathered.amax(0), torch.where(is_min, gathered.amin(0), gathered.sum(0)))
    return dict(zip(keys, vec.cpu().tolist(), strict=True))

"""Sharded parameters, in one place: what the probe does differently when training shards the model.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism
(``torch.distributed.tensor.parallel``) a parameter at rest is a ``DTensor``: each rank holds a
shard. The forward still works (FSDP2's hooks all-gather a module's parameters before its
forward, tensor parallelism's hooks convert activations); what the probe does besides needs:

- **weight spectra** read weights at rest: :func:`full_weights` gathers one block's parameters
  at a time (:func:`gather_full`: one all-gather per block, FP32 master values) and puts them
  back afterwards;
- **sub-layer re-runs** (a block's FFN on its exact input) call a module that is not an FSDP2
  module itself: :func:`unsharded` all-gathers its nearest FSDP2 ancestor as training does;
- the **exact FP32 pass** must compute with the FP32 master parameters, not the low-precision
  copies ``MixedPrecisionPolicy(param_dtype=...)`` makes FSDP2 all-gather (nor cast every
  module's inputs to that dtype): :func:`fp32_all_gather`;
- after the passes every FSDP2 module is left sharded or unsharded as training left it
  (:func:`restore_sharding`);
- under tensor parallelism each rank's attention sees only its own heads (``ColwiseParallel``
  query/key/value projections): :func:`gather_heads` hands the diagnostics every head, in the
  unsharded model's order, so per-head values, means and sums over heads are the model's.

Without DTensor parameters and FSDP2 modules every function here is a no-op. FSDP1
(``FullyShardedDataParallel``) and DeepSpeed ZeRO are not handled (see
``docs/DISTRIBUTED.md``); :func:`unsupported_sharding` names them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

try:  # torch.distributed is optional in some builds
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    FSDPModule = None  # type: ignore[assignment,misc]
    DTensor = None  # type: ignore[assignment,misc]

from lightning_stability.capture.attention import AttentionCall
from lightning_stability.capture.stacks import is_attention_name
from lightning_stability.capture.structure import Block

#: What :func:`unsupported_sharding` says for FSDP1 (also used by the monitor for ``FSDPStrategy``).
FSDP1_MESSAGE = (
    "FSDP1 (FullyShardedDataParallel, Lightning's FSDPStrategy) keeps each module's parameters in "
    "flat shards outside its forward, so the weight spectra and the sub-layer re-runs cannot read them; "
    "it is not supported. Train with Lightning's ModelParallelStrategy and torch's fully_shard (FSDP2), "
    "which is measured (docs/DISTRIBUTED.md), or measure the model on a single device."
)
#: What :func:`unsupported_sharding` says for DeepSpeed (also used by the monitor for ``DeepSpeedStrategy``).
DEEPSPEED_MESSAGE = (
    "DeepSpeed is not supported: ZeRO-3 partitions every parameter outside DeepSpeed's own forward "
    "hooks (the weight spectra and the exact FP32 pass need each block's full FP32 weights), and no "
    "ZeRO stage has been tested. Train with Lightning's ModelParallelStrategy and torch's fully_shard "
    "(FSDP2), which is measured (docs/DISTRIBUTED.md), or measure the model on a single device."
)


class UnsupportedSharding(RuntimeError):
    """The model's parameters are sharded in a way the probe cannot read (FSDP1, DeepSpeed ZeRO-3)."""


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules (``fully_shard`` applied) inside ``model``, itself included, in model order."""
    if FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether a forward or a weight read of ``model`` involves collectives (DTensor parameters or FSDP2)."""
    return bool(fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether some parameter is sharded by tensor parallelism (not only by FSDP2).

    FSDP2 alone shards on a one-dimensional mesh and only modules it manages; a DTensor
    parameter with no FSDP2 module around, or on a mesh of more than one dimension (FSDP2 on
    top of tensor parallelism), is tensor-parallel.
    """
    dtensors = [p for p in model.parameters() if is_dtensor(p)]
    if not dtensors:
        return False
    return not fsdp_modules(model) or any(p.device_mesh.ndim > 1 for p in dtensors)  # type: ignore[attr-defined]


def unsupported_sharding(model: nn.Module) -> str | None:
    """Why the probe cannot measure ``model`` (FSDP1 modules, DeepSpeed ZeRO-3 parameters), else ``None``."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return FSDP1_MESSAGE
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return DEEPSPEED_MESSAGE
    return None


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedSharding` with :func:`unsupported_sharding`'s reason, if any."""
    reason = unsupported_sharding(model)
    if reason is not None:
        raise UnsupportedSharding(reason)


def sharding_warnings(model: nn.Module, blocks: Sequence[Block], heads: dict[int, Any]) -> list[str]:
    """What is not exact under this model's tensor parallelism (for a one-time warning).

    Args:
        model: the model.
        blocks: its blocks.
        heads: :func:`head_groups` of the blocks.
    """
    if not is_tensor_parallel(model):
        return []
    out = []
    if any(is_dtensor(p) and p.device_mesh.ndim > 1 for p in model.parameters()):  # type: ignore[attr-defined]
        out.append(
            "FSDP2 combined with tensor parallelism (a 2-D device mesh) is not tested: weights are gathered "
            "and reduced as for either alone, but attention heads are not gathered across the "
            "tensor-parallel ranks (see the next point)"
        )
    local = [b.name for b in blocks if b.index not in heads and _attention_sharded(b)]
    if local:
        shown = ", ".join(local[:4]) + (f" and {len(local) - 4} more" if len(local) > 4 else "")
        out.append(
            f"{shown}: tensor parallel, but the query projection is not a row-sharded (ColwiseParallel) "
            "weight of its own, so each rank's attention diagnostics see only that rank's heads: per-head "
            "values, attention_entropy, theta, head_reduction='sum' and batch_reduction='mean' mix ranks; "
            "the maxima over heads (kappa_score, kappa_softmax, kappa_v, attn_logit_max) stay exact"
        )
    return out


def _attention_sharded(block: Block) -> bool:
    """Whether a parameter under the block's attention (a name segment saying so) is a DTensor."""
    return any(
        is_dtensor(p) and any(is_attention_name(part) for part in name.split(".")[:-1])
        for name, p in block.module.named_parameters()
    )


def mixed_precision_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` all-gathers ``model``'s parameters in.

    ``None`` when no FSDP2 module casts (no policy, or ``param_dtype`` equal to the parameters').
    """
    for param in _fsdp_params(model):
        if param.param_dtype is not None:
            return param.param_dtype
    return None


# --------------------------------------------------------------------------- weights at rest
def full_weights(blocks: Sequence[Block]) -> Iterator[list[Block]]:
    """The blocks in groups whose parameters read as full FP32 tensors while the group is current.

    Unsharded models: one group, all blocks, nothing copied. Sharded (DTensor) parameters: one
    block at a time, each DTensor parameter of the block replaced by its gathered value
    (``full_tensor()``: the FP32 master, not FSDP2's low-precision all-gather) and put back
    when the next group starts, so at most **one block's parameters** are held in full. Every
    rank must iterate to the end (each gather is a collective).

    Example:
        >>> b = Block(0, "0", nn.Linear(2, 2))
        >>> [[x.name for x in group] for group in full_weights([b])]
        [['0']]
    """
    if not any(is_dtensor(p) for b in blocks for p in b.module.parameters()):
        yield list(blocks)
        return
    for block in blocks:
        with full_parameters(block.module):
            yield [block]


class GatherStats:
    """Bytes of parameters :func:`full_parameters` holds in full: now and at most, since :meth:`reset`."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def reset(self) -> None:
        self.live = self.peak = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)


#: What :func:`full_parameters` held in full (the tests and ``bench_distributed.py`` read it).
GATHERED = GatherStats()


@contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside: every DTensor parameter of ``module`` is a plain tensor holding its full value.

    The registered parameters are swapped (``module._parameters``) and put back on exit, so
    nothing runs FSDP2's or tensor parallelism's hooks here: only reads of weights belong
    inside, no forward. A parameter tied to several modules is gathered once; the gather
    itself is :func:`gather_full` (a collective).
    """
    owners = [
        (sub, name, p) for sub in module.modules() for name, p in sub._parameters.items() if is_dtensor(p)
    ]
    unique = list({id(p): p for _, _, p in owners}.values())
    with torch.no_grad():
        full = {id(p): t for p, t in zip(unique, gather_full(unique), strict=True)}
    nbytes = sum(t.numel() * t.element_size() for t in full.values())
    GATHERED.add(nbytes)
    try:
        for sub, name, p in owners:
            sub._parameters[name] = nn.Parameter(full[id(p)], requires_grad=False)
        yield
    finally:
        for sub, name, p in reversed(owners):
            sub._parameters[name] = p
        GATHERED.live -= nbytes


def gather_full(params: Sequence[Any]) -> list[Tensor]:
    """The full values of DTensor parameters (every rank of their mesh must call this alike).

    Parameters sharded by rows on the same one-dimensional mesh (FSDP2, ``ColwiseParallel``)
    and of one dtype are gathered in **one** all-gather (a block's parameters: one collective
    instead of one each); any other layout through ``DTensor.full_tensor()``. The flat buffers
    briefly hold the gathered values a second time while they are unpacked.
    """
    out: list[Tensor | None] = [None] * len(params)
    groups: dict[tuple[int, torch.dtype], list[int]] = {}
    for j, p in enumerate(params):
        if p.device_mesh.ndim == 1 and _row_sharded(p) and p.dim() > 0:
            groups.setdefault((id(p.device_mesh), p.dtype), []).append(j)
        else:
            out[j] = p.full_tensor()
    for idx in groups.values():
        for j, t in zip(idx, _gather_rows([params[j] for j in idx]), strict=True):
            out[j] = t
    return [t for t in out if t is not None]


def _gather_rows(params: Sequence[Any]) -> list[Tensor]:
    """Row-sharded DTensors of one mesh and dtype in one ``all_gather``: each rank's rows (``torch.chunk``
    of the global rows, as DTensor and FSDP2 split them), padded to equal size and flattened."""
    import torch.distributed as dist

    mesh = params[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = [-(-p.shape[0] // world) for p in params]  # rows per rank, the last ranks fewer or none
    pieces = []
    for p, c in zip(params, chunks, strict=True):
        local = p.to_local()
        expected = max(0, min(c, p.shape[0] - rank * c))
        if local.shape[0] != expected:
            raise RuntimeError(f"unexpected shard of {tuple(p.shape)}: {local.shape[0]} rows, not {expected}")
        pad = local.new_zeros((c - local.shape[0], *local.shape[1:]))
        pieces.append(torch.cat([local, pad]).reshape(-1))
    flat = torch.cat(pieces)
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=mesh.get_group())
    out, offset = [], 0
    for p, c in zip(params, chunks, strict=True):
        n = c * math.prod(p.shape[1:])
        rows = torch.stack([part[offset : offset + n] for part in parts]).reshape(world * c, *p.shape[1:])
        out.append(rows[: p.shape[0]])
        offset += n
    return out


# --------------------------------------------------------------------------- FSDP2 around forwards
def _fsdp_states(model: nn.Module) -> list[Any]:
    return [m._get_fsdp_state() for m in fsdp_modules(model)]  # type: ignore[operator]


def _fsdp_groups(model: nn.Module) -> list[Any]:
    return [group for state in _fsdp_states(model) for group in state._fsdp_param_groups]


def _fsdp_params(model: nn.Module) -> list[Any]:
    return [param for group in _fsdp_groups(model) for param in group.fsdp_params]


@contextmanager
def restore_sharding(model: nn.Module) -> Iterator[None]:
    """Leave every FSDP2 parameter group sharded or unsharded as it was on entry.

    The extra forwards unshard each module for its forward; the root (``reshard_after_forward``
    off by default) would stay unsharded afterwards. Groups sharded on entry are resharded on
    exit (no collective); a group unsharded on entry is all-gathered again.
    """
    groups = _fsdp_groups(model)
    was_unsharded = [g.is_unsharded for g in groups]
    try:
        yield
    finally:
        for group, unsharded in zip(groups, was_unsharded, strict=True):
            if unsharded and not group.is_unsharded:
                group.unshard()
                group.wait_for_unshard()
            elif not unsharded and group.is_unsharded:
                group.reshard()


@contextmanager
def fp32_all_gather(model: nn.Module) -> Iterator[None]:
    """FSDP2 all-gathers the FP32 master parameters and casts no module input (the exact pass).

    With ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` FSDP2 computes every forward with
    BF16 copies of the parameters and BF16 inputs, even without autocast: an "exact" reference
    run that way is a BF16 forward, and the mismatch against it a plausible, wrong, small number.
    Inside, each FSDP2 parameter all-gathers in its own dtype into fresh buffers and no state
    casts forward inputs; on exit the groups are resharded and FSDP2's own buffers and policies
    are put back as they were (the training forward all-gathers into them again).
    """
    params = [p for p in _fsdp_params(model) if p.param_dtype is not None]
    if not params:
        yield
        return
    states = [s for s in _fsdp_states(model) if s._mp_policy.param_dtype is not None]
    groups = _fsdp_groups(model)
    for group in groups:  # every group sharded first: its buffers are then free to swap
        if group.is_unsharded:
            group.reshard()
    kept = [(p, p.param_dtype, p.all_gather_outputs, p.__dict__.get("_unsharded_param")) for p in params]
    policies = [(s, s._mp_policy) for s in states]
    try:
        for p in params:
            p.param_dtype = None
            p.all_gather_outputs = []
            p.__dict__.pop("_unsharded_param", None)
        for state, policy in policies:
            state._mp_policy = dataclasses.replace(policy, param_dtype=None)
        yield
    finally:
        for group in groups:
            if group.is_unsharded:
                group.reshard()
        for p, dtype, outputs, unsharded in kept:
            p.param_dtype, p.all_gather_outputs = dtype, outputs
            p.__dict__.pop("_unsharded_param", None)
            if unsharded is not None:
                p._unsharded_param = unsharded
        for state, policy in policies:
            state._mp_policy = policy


@contextmanager
def unsharded(module: nn.Module, model: nn.Module) -> Iterator[None]:
    """``module``'s parameters unsharded as in training, for calling it on its own.

    An FSDP2 module all-gathers its own parameters when called, but a sub-layer inside one (a
    block's FFN when the block is what ``fully_shard`` wrapped) is not: its nearest FSDP2
    ancestor in ``model`` is unsharded (FSDP2's ``unshard()``, in the training's parameter
    dtype) for the duration and resharded afterwards.
    """
    owner = _fsdp_owner(module, model)
    if owner is None:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(restore_sharding(owner))
        owner.unshard()  # type: ignore[operator]
        yield


def _fsdp_owner(module: nn.Module, model: nn.Module) -> nn.Module | None:
    """The innermost FSDP2 module of ``model`` strictly containing ``module`` (``None``: none, or
    ``module`` is one itself)."""
    if FSDPModule is None or isinstance(module, FSDPModule) or not fsdp_modules(model):
        return None
    owner: nn.Module | None = None

    def visit(node: nn.Module, inner: nn.Module | None) -> bool:
        nonlocal owner
        if node is module:
            owner = inner
            return True
        here = node if isinstance(node, FSDPModule) else inner
        return any(visit(child, here) for child in node.children())

    visit(model, None)
    return owner


# --------------------------------------------------------------------------- tensor parallel heads
def head_groups(model: nn.Module, blocks: Sequence[Block]) -> dict[int, Any]:
    """Per block whose attention heads tensor parallelism splits across ranks, the process group.

    A block qualifies when its query projection is a separate weight sharded by rows on a
    one-dimensional mesh (``ColwiseParallel``): rank ``r`` then computes the ``r``-th slice of
    the heads. FSDP2 shards rows too, but all-gathers them for the forward: models with FSDP2
    modules only (no tensor parallelism) give none.
    """
    if not is_tensor_parallel(model):
        return {}
    out: dict[int, Any] = {}
    for block in blocks:
        for proj in block.qk:
            w = proj.w_q() if proj.layout == "separate" else None
            if is_dtensor(w) and w.device_mesh.ndim == 1 and _row_sharded(w):  # type: ignore[union-attr]
                out[block.index] = w.device_mesh.get_group()  # type: ignore[union-attr]
    return out


def _row_sharded(w: Any) -> bool:
    placement = w.placements[0]
    return bool(placement.is_shard() and placement.dim == 0)


def gather_heads(call: AttentionCall, group: Any) -> AttentionCall:
    """``call`` with the heads of every rank of ``group`` concatenated in rank order (a collective).

    Every ``(B, H_local, …)`` tensor of the call (queries, keys, values, per-head masks and
    biases, explicit scores) is all-gathered along the head axis; masks broadcast over heads
    stay as they are.
    """
    import torch.distributed as dist

    local = call.v.shape[1]
    world = dist.get_world_size(group)

    def gather(t: Tensor | None) -> Tensor | None:
        if t is None or t.dim() != 4 or t.shape[1] != local:
            return t
        flag = t.dtype == torch.bool  # gloo gathers no booleans
        src = (t.to(torch.uint8) if flag else t).contiguous()
        parts = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(parts, src, group=group)
        out = torch.cat(parts, 1)
        return out.bool() if flag else out

    return dataclasses.replace(
        call,
        q=gather(call.q),
        k=gather(call.k),
        v=gather(call.v),  # type: ignore[arg-type]
        keep=gather(call.keep),
        bias=gather(call.bias),
        scores=gather(call.scores),
    )

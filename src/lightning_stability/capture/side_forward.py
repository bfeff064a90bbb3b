"""Contexts that let the monitor run extra forwards without changing training.

Each one restores exactly what it changed, in ``finally``: module ``training``
flags, RNG streams, the fused-attention fast-path flag, TF32 and matmul-precision
settings, and the storage of parameters temporarily viewed in FP32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lightning_stability.capture.sharding import fp32_all_gather, mixed_precision_dtype, restore_sharding


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each one's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def fastpath_disabled() -> Iterator[None]:
    """Turn off PyTorch's fused MHA / encoder-layer fast path (it bypasses hooks and autocast rules)."""
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the CPU (and initialised CUDA) RNG state afterwards."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        yield


@contextmanager
def exact_fp32(model: nn.Module) -> Iterator[None]:
    """Exact FP32: autocast off, TF32 off, floating parameters and buffers viewed in FP32.

    Parameters of another floating dtype (``bf16-true``/``16-true`` training) get an FP32
    copy for the duration; the original tensors are put back untouched. Under FSDP2 with a
    ``MixedPrecisionPolicy`` the FP32 master parameters are all-gathered instead of their
    low-precision copies (:func:`~lightning_stability.capture.sharding.fp32_all_gather`).
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    with ExitStack() as stack:
        try:
            for device_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
            stack.enter_context(fp32_all_gather(model))
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    swapped.append((tensor, tensor.data))
                    tensor.data = tensor.data.float()
            yield
        finally:
            for tensor, data in swapped:
                tensor.data = data
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            torch.set_float32_matmul_precision(precision)


#: Seed of the private random stream every side forward starts from.
SIDE_SEED = 0x5EED


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def reseed(seed: int = SIDE_SEED) -> None:
    """Seed the CPU (and initialised CUDA) generators; only call inside :func:`preserved_rng`.

    Uninitialised CUDA is left alone: seeding it would be queued and change training's stream later.
    """
    torch.random.default_generator.manual_seed(seed)
    for device in _cuda_devices():
        torch.cuda.default_generators[device].manual_seed(seed)


def rng_snapshot() -> list[Any]:
    """The CPU (and initialised CUDA) generator states, for :func:`rng_restore`."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in _cuda_devices())]


def rng_restore(states: list[Any]) -> None:
    """Put back states from :func:`rng_snapshot` (inside :func:`preserved_rng`)."""
    torch.set_rng_state(states[0])
    for device, state in zip(_cuda_devices(), states[1:], strict=False):
        torch.cuda.set_rng_state(state, device)


@contextmanager
def side_forward(model: nn.Module) -> Iterator[Callable[[], None]]:
    """The context of every extra forward the package runs (probe, ``LNEpsilonBump``, overflow finder).

    No grad; the RNG forked (training's stream is restored afterwards) and the yielded
    ``same_stream()`` reseeds it, so passes that call it first draw the same random numbers
    (dropout inside an attention call gets the same mask in both passes, SPEC §5); every module
    in eval mode (each one's flag restored); PyTorch's fused MHA fast path off (it bypasses
    hooks and autocast rules); ``torch.compile`` forced eager (eager arithmetic is measured and
    our hooks cause no recompilation); FSDP2 modules left sharded as training left them.
    """
    with ExitStack() as stack:
        stack.enter_context(restore_sharding(model))
        stack.enter_context(torch.no_grad())
        stack.enter_context(preserved_rng())
        stack.enter_context(eval_mode(model))
        stack.enter_context(fastpath_disabled())
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        reseed()
        yield reseed


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s matmuls compute in under the current context.

    The autocast dtype when autocast is on for the model's device (so Lightning's silent CPU
    switch of ``16-mixed`` to bfloat16 reads as bfloat16), else the dtype FSDP2's
    ``MixedPrecisionPolicy`` all-gathers the parameters in, else the parameters' dtype
    (``*-true`` precision), else float32.
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    device_type = params[0].device.type if params else "cpu"
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    sharded = mixed_precision_dtype(model)
    if sharded is not None:
        return sharded
    return params[0].dtype if params else torch.float32

"""Lightning glue shared by the callbacks: argument checks, inputs, precision."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stability.capture.batch import split_batch
from lightning_stability.capture.sharding import DEEPSPEED_MESSAGE, FSDP1_MESSAGE
from lightning_stability.capture.side_forward import compute_dtype
from lightning_stability.meter.checks import check_int, check_number
from lightning_stability.meter.precision import PrecisionName, autocast_context
from lightning_stability.rules.thresholds import FP16_MAX_BITS


def is_distributed(trainer: Trainer) -> bool:
    """Whether ``trainer`` runs several processes with an initialised process group."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def unsupported_strategy(strategy: Any) -> str | None:
    """Why the monitor cannot measure under ``strategy`` (FSDP1, DeepSpeed), else ``None``."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return FSDP1_MESSAGE
    if isinstance(strategy, DeepSpeedStrategy):
        return DEEPSPEED_MESSAGE
    return None


def tensor_parallel_size(trainer: Trainer) -> int:
    """Ranks of one tensor-parallel group under ``ModelParallelStrategy`` (its ``"tensor_parallel"``
    mesh dimension), else 1. Its mesh is ``(data_parallel, tensor_parallel)``, row-major: ranks
    ``r·tp … r·tp + tp − 1`` hold one model replica."""
    try:
        mesh = getattr(trainer.strategy, "device_mesh", None)
    except Exception:  # not set up yet
        return 1
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return int(mesh["tensor_parallel"].size()) if mesh is not None and "tensor_parallel" in names else 1


def inputs_or_raise(batch: Any, owner: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """:func:`~lightning_stability.capture.batch.split_batch`, with an error naming the method to override."""
    try:
        return split_batch(batch)
    except TypeError as err:
        raise MisconfigurationException(
            f"{owner} {err}; override `{owner}.inputs_from_batch(batch)` to return (args, kwargs)."
        ) from None


def low_precision_context(
    trainer: Trainer, pl_module: LightningModule, precision: PrecisionName | None
) -> AbstractContextManager[Any]:
    """The context of the low-precision pass: the trainer's own, or a forced autocast.

    ``"fp8"`` is not a context but a factory with state, which the monitor keeps
    (:class:`~lightning_stability.capture.probe.FP8Precision`); here it raises.
    """
    if precision == "fp8":
        raise ValueError("precision='fp8' runs under an FP8Precision factory, not a plain context")
    if precision is None:
        return trainer.precision_plugin.forward_context()
    return autocast_context(pl_module.device.type, precision)


def low_precision_dtype(
    trainer: Trainer, pl_module: LightningModule, precision: PrecisionName | None
) -> torch.dtype:
    """The dtype the low-precision pass really computes matmuls in.

    Read from inside the context, so Lightning's silent CPU switch of ``16-mixed`` to
    bfloat16 is reported as bfloat16; for ``*-true`` precision it is the parameters' dtype.
    """
    with low_precision_context(trainer, pl_module, precision):
        return compute_dtype(pl_module)


def lightning_log_step(trainer: Trainer) -> int:
    """The step under which Lightning logs the current batch's ``training_step`` values.

    In ``on_train_batch_end`` the optimizer has stepped (``trainer.global_step`` counts it)
    but Lightning's own logging step, ``fit_loop.epoch_loop._batches_that_stepped``, is
    incremented only after the hook: logging under it makes the monitor's rows join
    ``train_loss`` rows on ``step`` (CSV) and share TensorBoard's x-axis. Falls back to
    ``global_step - 1`` should that private counter ever move.
    """
    counter = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(counter) if isinstance(counter, int) else max(0, trainer.global_step - 1)


def check_eps_rule(target_rho: Any, eps_min: Any, eps_max: Any, sample_size: Any, seed: Any) -> None:
    """The arguments of Algorithm 1 (``LNEpsilonBump``, ``StabilityGuard``), each named when bad."""
    check_number("target_rho", target_rho, 0.0, 1.0, open_low=True, open_high=True)
    check_number("eps_min", eps_min, 0.0, math.inf, open_low=True, open_high=True)
    check_number("eps_max", eps_max, 0.0, math.inf, open_low=True, open_high=True)
    if eps_max <= eps_min:
        raise MisconfigurationException(
            f"`eps_max` must exceed `eps_min`, got eps_max={eps_max!r} <= eps_min={eps_min!r}"
        )
    check_int("sample_size", sample_size)
    check_int("seed", seed, minimum=0)


def check_guard_levels(tau: float, alpha: float, rho_ln: float, r_local: float, headroom: float) -> None:
    """``MisconfigurationException`` naming the first level of the guard out of its range."""
    check_number("tau", tau, 0.0, math.inf, open_low=True, open_high=True)
    check_number("qk_clip_alpha", alpha, 0.0, 1.0)
    check_number("rho_ln_threshold", rho_ln, 0.0, math.inf, open_low=True, open_high=True)
    check_number("r_local_factor", r_local, 0.0, math.inf, open_low=True, open_high=True)
    check_number("min_fp16_headroom", headroom, 0.0, FP16_MAX_BITS)

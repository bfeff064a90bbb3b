"""Taking a few examples of a batch, without touching the global RNG."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

#: Keys dropped from dict batches before they are passed to the model as keyword arguments.
LABEL_KEYS = frozenset({"label", "labels", "target", "targets", "y", "class_labels"})


def batch_size(obj: Any) -> int | None:
    """Leading size of the first tensor found in ``obj`` (tensors, sequences, mappings)."""
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() > 0 else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            size = batch_size(item)
            if size is not None:
                return size
    return None


def take(obj: Any, index: Tensor, size: int) -> Any:
    """Index the leading axis of every tensor in ``obj`` whose leading size is ``size``."""
    if isinstance(obj, Tensor):
        if obj.dim() > 0 and obj.shape[0] == size:
            return obj.index_select(0, index.to(obj.device))
        return obj
    if isinstance(obj, Mapping):
        return (
            type(obj)(**{k: take(v, index, size) for k, v in obj.items()})
            if _rebuildable(obj)
            else {k: take(v, index, size) for k, v in obj.items()}
        )
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(take(v, index, size) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(take(v, index, size) for v in obj)
    return obj


def _rebuildable(obj: Mapping[str, Any]) -> bool:
    try:
        type(obj)(**dict(obj))
    except Exception:
        return False
    return True


def sample_index(size: int, sample_size: int, seed: int) -> Tensor:
    """``min(size, sample_size)`` distinct indices in ``[0, size)``, sorted, from a private generator.

    Example:
        >>> sample_index(10, 4, seed=0).tolist() == sample_index(10, 4, seed=0).tolist()
        True
        >>> sample_index(3, 16, seed=0).tolist()
        [0, 1, 2]
    """
    if sample_size >= size:
        return torch.arange(size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=gen)[:sample_size].sort().values


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor in ``obj`` to ``dtype`` (integer ids, masks untouched)."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(cast_floating(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floating(v, dtype) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model inputs in a training batch, as ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    A tensor is the input; a tuple or list holds the input first (``(x, y)``); a mapping
    is passed as keyword arguments with its label keys (:data:`LABEL_KEYS`) dropped.
    Raises ``TypeError`` for anything else.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> split_batch((x, torch.ones(2)))[0][0] is x
        True
        >>> sorted(split_batch({"input_ids": x, "labels": x})[1])
        ['input_ids']
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    raise TypeError(f"cannot find the model inputs in a batch of type {type(batch).__name__}")


def sample_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], sample_size: int, seed: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Keep ``sample_size`` examples (the leading axis of every tensor of the batch size)."""
    size = batch_size((args, kwargs))
    if size is None:
        return args, kwargs
    index = sample_index(size, sample_size, seed)
    return take(args, index, size), take(kwargs, index, size)

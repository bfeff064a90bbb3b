"""What a model's forward takes, as ``model(*args, **kwargs)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor

__all__ = ["call_arguments"]


def call_arguments(inputs: Any, name: str = "inputs") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of ``inputs``: a tensor is the one positional argument, a tuple holds the
    positional arguments, a dict (any mapping with string keys) the keyword arguments.

    Raises:
        MisconfigurationException: naming ``name`` and the value's type, for anything else.

    Example:
        >>> import torch
        >>> x = torch.zeros(2, 3)
        >>> call_arguments(x)[0][0] is x, call_arguments((x, 4))[0][1]
        (True, 4)
        >>> call_arguments({"input_ids": x})[1].keys()
        dict_keys(['input_ids'])
    """
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if type(inputs) is tuple:  # a namedtuple is one structured argument, not the argument list
        return inputs, {}
    if isinstance(inputs, Mapping) and all(isinstance(k, str) for k in inputs):
        return (), dict(inputs)
    raise MisconfigurationException(
        f"`{name}` must be what the model's forward takes: a tensor, a tuple of positional arguments or a "
        f"dict of keyword arguments, got {type(inputs).__name__} (pass one argument of another kind as a "
        "1-tuple: (x,))"
    )

"""transformers' ``eager`` attention, seen through its attention-interface lookup.

transformers ``eager`` attention never calls SDPA. While a capture is active, the lookup
``AttentionInterface.get_interface("eager", default)`` returns a wrapper that records the call
and delegates to exactly the function the model would have used (``default``, the model file's
``eager_attention_forward``), so outputs stay bitwise identical. The registry's contents are
never changed (no name is registered), and transformers is never imported here.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .normalize import _normalize
from .state import _STATE, _dispatch


def _attention_interface_class() -> Any:
    """transformers' ``AttentionInterface`` class if transformers is already imported, else None."""
    mu = sys.modules.get("transformers.modeling_utils")
    return getattr(mu, "AttentionInterface", None) if mu is not None else None


def _eager_mask(mask: Tensor | None, position_bias: Tensor | None) -> Tensor | None:
    """The additive mask an eager function applies: T5 adds ``position_bias`` before the mask."""
    if position_bias is None or not isinstance(position_bias, Tensor):
        return mask
    bias = position_bias.detach().float()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.detach().float()


def _eager_recorder(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap transformers' eager attention ``fn``: record the call, then run ``fn`` unchanged."""

    def eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if _STATE.captures and not _STATE.busy:
            mask = _eager_mask(args[0] if args else kwargs.get("attention_mask"), kwargs.get("position_bias"))
            scaling, softcap = kwargs.get("scaling"), kwargs.get("softcap")
            _dispatch(
                lambda name, _m: _normalize(name, module, query, key, value, mask, False, scaling, softcap)
            )
        _STATE.recorded += 1  # the eager function's own softmax/matmuls are this same call
        try:
            return fn(module, query, key, value, *args, **kwargs)
        finally:
            _STATE.recorded -= 1

    eager.__wrapped__ = fn  # type: ignore[attr-defined]
    return eager


def _patch_eager_lookup(stack: contextlib.ExitStack) -> None:
    """Make ``AttentionInterface.get_interface("eager", default)`` return a recording wrapper.

    transformers 5.x models look their attention up with
    ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``;
    ``"eager"`` is not a registered name, so the lookup returns the model file's own ``default``.
    Wrapping the lookup (rather than registering ``"eager"`` in the registry) delegates to exactly
    that function, whatever the model file calls it (``simple_eager_attention_forward``, …), and
    leaves the registry's contents untouched. Only done when transformers is already imported.
    """
    iface = _attention_interface_class()
    original = getattr(iface, "get_interface", None) if iface is not None else None
    if iface is None or original is None:
        return
    own = "get_interface" in vars(iface)

    def get_interface(self: Any, attn_implementation: Any, default: Callable[..., Any]) -> Any:
        fn = original(self, attn_implementation, default)
        if attn_implementation == "eager" and callable(fn):
            return _eager_recorder(fn)
        return fn

    def restore() -> None:
        if own:
            iface.get_interface = original
        else:
            delattr(iface, "get_interface")

    iface.get_interface = get_interface
    stack.callback(restore)

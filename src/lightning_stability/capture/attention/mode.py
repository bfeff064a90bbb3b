"""The ``TorchFunctionMode`` that sees every SDPA, MHA and hand-written attention call."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .manual import _dispatch_manual, _track
from .normalize import _mha_call, _normalize, _sdpa_args
from .state import _STATE, _dispatch


class _AttentionMode(TorchFunctionMode):
    """Sees SDPA and ``F.multi_head_attention_forward`` calls; passes every call through unchanged."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        st = _STATE
        if st.busy or not st.captures:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
            self._record(func, args, kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if st.recorded:
            return out
        try:
            found = _track(func, args, kwargs, out)
        except Exception as err:  # bookkeeping must never break the model's forward
            warnings.warn(f"AttentionCapture: tracing {func!r} failed: {err!r}", RuntimeWarning, stacklevel=2)
            found = None
        if found is not None:
            _dispatch_manual(*found)
        return out

    @staticmethod
    def _record(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record an SDPA or ``F.multi_head_attention_forward`` call."""
        if func is F.scaled_dot_product_attention:
            b = _sdpa_args(args, kwargs)
            _dispatch(
                lambda name, module: _normalize(
                    name,
                    module,
                    b["query"],
                    b["key"],
                    b["value"],
                    b["attn_mask"],
                    bool(b["is_causal"]),
                    b["scale"],
                )
            )
        else:
            _dispatch(lambda name, module: _mha_call(name, args, kwargs))

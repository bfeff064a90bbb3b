"""The capture itself: :class:`AttentionCapture` (a context manager) and :func:`observe_attention`.

The first active capture installs the process-wide machinery (the function mode, the
transformers eager lookup, the MHA fast-path flag) and the last one removes it; each capture
tracks the innermost module of its model running at the time of a call with forward hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .call import AttentionCall
from .eager import _patch_eager_lookup
from .mode import _AttentionMode
from .normalize import _normalize
from .state import _STATE, _dispatch


def _install_machinery() -> contextlib.ExitStack:
    """Install the process-wide pieces; the returned stack removes them again."""
    stack = contextlib.ExitStack()
    try:
        prev_fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        stack.callback(torch.backends.mha.set_fastpath_enabled, prev_fastpath)
        _patch_eager_lookup(stack)
        stack.enter_context(_AttentionMode())
    except BaseException:
        stack.close()
        raise
    return stack


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class AttentionCapture:
    """Context manager calling ``on_call`` once per attention evaluation, in model order.

    While active, every attention evaluation (SDPA, ``nn.MultiheadAttention`` and the
    ``nn.Transformer*`` layers, transformers ``eager``/``sdpa`` attention, hand-written
    ``softmax(q @ kᵀ·scale + mask) @ v``, and :func:`observe_attention`) calls
    ``on_call(AttentionCall(...))`` synchronously. Turn a record into numbers with
    :func:`call_diagnostics` (it honours ``scores`` and ``softcap``). The model's
    outputs are bit-identical with and without a capture (at the same MHA fast-path setting: the
    capture turns the fused eval fast paths off while active, and they compute differently).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> class Attn(nn.Module):
        ...     def forward(self, x):
        ...         return F.scaled_dot_product_attention(x, x, x, is_causal=True)
        >>> model = nn.Sequential(Attn())
        >>> seen = []
        >>> with AttentionCapture(model, seen.append) as cap:
        ...     _ = model(torch.randn(1, 2, 4, 8))
        >>> cap.calls, seen[0].name, tuple(seen[0].q.shape), seen[0].keep.shape
        (1, '0', (1, 2, 4, 8), torch.Size([4, 4]))

    Args:
        model: The model whose forward is observed; its submodules give the call names.
        on_call: Callback receiving each :class:`AttentionCall`; runs with the capture
            suspended (attention it computes itself is not recorded).
    """

    def __init__(self, model: nn.Module, on_call: Callable[[AttentionCall], None]) -> None:
        self.model = model
        self._on_call = on_call
        self.calls: int = 0
        self._stack: contextlib.ExitStack | None = None
        self._names: list[tuple[str, nn.Module]] = []

    # -- module-name tracking ---------------------------------------------------------------
    def _current(self) -> tuple[str, nn.Module | None]:
        return self._names[-1] if self._names else ("", None)

    def _push_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def pre(module: nn.Module, args: Any) -> None:
            self._names.append((name, module))

        return pre

    def _pop_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        for i in range(len(self._names) - 1, -1, -1):
            if self._names[i][1] is module:
                del self._names[i:]
                return

    def _install_hooks(self, stack: contextlib.ExitStack) -> None:
        for name, mod in self.model.named_modules():
            h_pre = mod.register_forward_pre_hook(self._push_hook(name))
            stack.callback(h_pre.remove)
            h_post = mod.register_forward_hook(self._pop_hook, always_call=True)
            stack.callback(h_post.remove)

    # -- context protocol ---------------------------------------------------------------------
    def __enter__(self) -> AttentionCapture:
        if self._stack is not None:
            raise RuntimeError("AttentionCapture is not re-entrant")
        stack = contextlib.ExitStack()
        try:
            self._names.clear()
            stack.callback(self._names.clear)
            self._install_hooks(stack)
            if not _STATE.captures:
                _STATE.machinery = _install_machinery()
            _STATE.captures.append(self)
            stack.callback(self._leave)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _leave(self) -> None:
        if self in _STATE.captures:
            _STATE.captures.remove(self)
        if not _STATE.captures:
            _STATE.reset_tracing()
        if not _STATE.captures and _STATE.machinery is not None:
            machinery, _STATE.machinery = _STATE.machinery, None
            machinery.close()

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def observe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> None:
    """Report an attention evaluation written with an explicit softmax.

    Call it with the arguments ``F.scaled_dot_product_attention`` would take for the same
    attention (bool mask ``True`` = attend, float mask additive). It is a cheap no-op unless an
    :class:`AttentionCapture` is active.

    Args:
        q: Queries ``(B, H, n_q, d)`` (or ``(B, n_q, d)``).
        k: Keys ``(B, H_kv, n_k, d)``; ``H_kv`` may divide ``H`` (grouped-query attention).
        v: Values ``(B, H_kv, n_k, d_v)``.
        attn_mask: Optional boolean or additive float mask.
        is_causal: Causal (top-left aligned, as SDPA).
        scale: Softmax scale; default ``1/sqrt(d)``.
        enable_gqa: Accepted for signature parity with SDPA; K/V heads are mapped regardless.
    """
    if not _STATE.captures or _STATE.busy:
        return
    del enable_gqa
    # the explicit softmax that follows is this same call: do not record it a second time
    _STATE.observed.extend(weakref.ref(t) for t in (q, k, v) if isinstance(t, Tensor))
    _dispatch(lambda name, module: _normalize(name, module, q, k, v, attn_mask, is_causal, scale))

"""Each head's largest attention logit in a module's own training forwards (QK-clip at every step).

:class:`HeadLogitWatch` is the measurement MuonClip (Kimi K2) clips by after every optimizer step:
head by head, the largest ``|scale·q·kᵀ + bias|`` the training forward computed, over its examples,
query rows and attended keys — the monitor's ``attn_logit_max``
(:func:`~lightning_stability.diagnostics.attention.attention_logit_max`), but of the training
forward itself rather than of a sampled side forward, and at every step.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.attention import AttentionCall, AttentionCapture
from lightning_stability.capture.hooks import HookContext
from lightning_stability.capture.stacks import plain_name
from lightning_stability.diagnostics.attention import attention_logit_max

__all__ = ["COMPILED", "HeadLogitWatch", "call_head_logit_max"]

#: :attr:`HeadLogitWatch.error` when the watched forward runs compiled.
COMPILED = "the block runs compiled (torch.compile): its training forward cannot be watched"


def _children(module: nn.Module) -> nn.Module:
    """A module holding ``module``'s children under their names (not ``module`` itself)."""
    holder = nn.Module()
    for name, child in module.named_children():
        holder.add_module(name, child)
    return holder


@torch.no_grad()
def call_head_logit_max(call: AttentionCall) -> Tensor:
    """Per head, the largest ``|attention logit|`` of one recorded call over its examples, ``(H,)`` float64.

    From the recorded scores (attention written by hand) when the call has them, else from
    ``q``, ``k``, the scale and the additive bias; only attended keys count.
    """
    if call.scores is not None:
        s = call.scores.abs()
        if call.keep is not None:
            s = s.masked_fill(~call.keep, 0.0)
        return s.double().amax(dim=(0, 2, 3))
    if call.q is None or call.k is None:
        raise ValueError(f"attention call in {call.name!r} has neither scores nor q/k")
    work = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    bias = None if call.bias is None else call.bias.to(work)
    logits = attention_logit_max(call.q.to(work), call.k.to(work), call.keep, call.scale, bias)
    return logits.amax(dim=0)


class HeadLogitWatch(HookContext):
    """While entered, record each head's largest attention logit in every training forward of ``module``.

    A forward of ``module`` is watched when it runs in training mode with gradients enabled: the
    training forward, not the monitor's side forwards (eval mode, no gradients), validation, or a
    loss evaluated under ``torch.no_grad()``. For its duration an :class:`AttentionCapture` (of
    ``module``'s children: no hook is added to or removed from ``module`` while it runs) sees every
    attention call inside it (SDPA, transformers' attention, hand-written softmax attention) as a
    neutral observer: outputs and gradients are those of the unwatched forward, and an exception
    raised by the forward reaches the caller unchanged. Each call's per-head maxima
    (:func:`call_head_logit_max`) are folded into a running maximum per attention (the module
    making the call), that :meth:`take_each` (or :meth:`take`, over all of them) hands over and
    resets, so several forwards before one optimizer step (gradient accumulation, activation
    checkpointing's recomputation) give their maximum.

    Nothing raised while recording reaches the forward: the first failure is kept in
    :attr:`error` and recording stops. A forward traced by ``torch.compile`` cannot be watched
    (the capture is Python that runs beside each attention call): its hooks do nothing then but set
    :attr:`error`, so that the traced graph is that of the unwatched forward. The hooks are removed
    on exit.

    Args:
        module: the block (or the attention) whose attention calls are watched.

    Attributes:
        error: the first failure in words (``None`` while recording works).
        forwards: watched forwards since the last :meth:`take`.
        heads: the number of heads seen (``None`` before the first recorded call).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.error: str | None = None
        self.forwards = 0
        self.heads: int | None = None
        self._max: dict[str, Tensor] = {}
        self._capture: AttentionCapture | None = None

    def _reset(self) -> None:
        self.error, self.forwards, self._max, self._capture = None, 0, {}, None

    def _install(self, stack: ExitStack) -> None:
        stack.enter_context(self.module.register_forward_pre_hook(self._enter))
        stack.enter_context(self.module.register_forward_hook(self._leave, always_call=True))
        stack.callback(self._close_capture)

    def take_each(self) -> dict[str, Tensor]:
        """Per attention, its per-head maxima ``(H,)`` (float64) since the last take, then reset.

        Keyed by the name, inside the watched module, of the module that made the attention call
        (``"self_attn"``, ``"encoder_attn"``, ``"attn"``). Empty when no call was recorded, and
        once recording failed (never a stale number: see :attr:`error`).
        """
        out, self._max, self.forwards = self._max, {}, 0
        return {} if self.error is not None else {name: m.cpu() for name, m in out.items()}

    def take(self) -> Tensor | None:
        """The per-head maxima ``(H,)`` over every attention since the last take, then reset.

        ``None`` when no call was recorded, and once recording failed (:meth:`take_each`).
        """
        each = list(self.take_each().values())
        return torch.stack(each).amax(dim=0) if each else None

    # ------------------------------------------------------------------ hooks
    def _enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # first: a traced hook reads no state (no guard on it)
            self.error = COMPILED
            return
        if self.error is not None or self._capture is not None:
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        try:
            # the capture hooks the block's children, not the block: it is entered and left inside
            # the block's own hooks, and torch runs the always-call hooks of a forward that raised
            # straight from the block's hook dict, which removing a hook there would mutate
            capture = AttentionCapture(_children(module), self._on_call)
            capture.__enter__()
        except Exception as err:
            self.error = f"could not watch the forward: {type(err).__name__}: {err}"
            return
        self._capture = capture

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capture is not None:
            self._close_capture()
            self.forwards += 1

    def _close_capture(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.__exit__(None, None, None)

    def _on_call(self, call: AttentionCall) -> None:
        if self.error is not None:
            return
        try:
            heads = call_head_logit_max(call)  # kept on its device: one copy to the host per take
        except Exception as err:  # an observer never breaks the forward
            self.error = f"{type(err).__name__}: {err}"
            return
        if self.heads is None:
            self.heads = int(heads.numel())
        if heads.numel() != self.heads:  # calls with another head count: the first call's heads
            return
        name = plain_name(call.name)  # as the block's projections are named (no wrapper segments)
        seen = self._max.get(name)
        self._max[name] = heads if seen is None else torch.maximum(seen, heads)

"""The process-wide state shared by active captures, and the hand-over of each record to them."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .call import AttentionCall

if TYPE_CHECKING:
    from .context import AttentionCapture
    from .manual import _Probs, _Trace


class _State:
    """Process-wide state: active captures, the installed machinery, a re-entrancy guard."""

    def __init__(self) -> None:
        self.captures: list[AttentionCapture] = []
        self.machinery: contextlib.ExitStack | None = None
        self.busy = False
        #: > 0 while a call already recorded as a whole runs (transformers eager): its own
        #: softmax and matmuls are not traced again.
        self.recorded = 0
        #: id(tensor) → trace of a score tensor made by a matmul (see :class:`_Trace`).
        self.traces: dict[int, _Trace] = {}
        #: id(tensor) → a softmax output waiting for the matmul that consumes it.
        self.probs: dict[int, _Probs] = {}
        #: weak references to tensors handed to :func:`observe_attention` (no double count).
        self.observed: list[weakref.ref[Tensor]] = []

    def reset_tracing(self) -> None:
        self.traces.clear()
        self.probs.clear()
        self.observed.clear()


_STATE = _State()


def _dispatch(build: Callable[[str, nn.Module | None], AttentionCall]) -> None:
    """Build the call (per capture, for its own module name) and hand it to every active capture.

    Errors while *building* the record are turned into a warning (an observer must not break the
    model's forward); errors raised by ``on_call`` propagate.
    """
    if _STATE.busy or not _STATE.captures:
        return
    _STATE.busy = True
    try:
        for cap in list(_STATE.captures):
            name, module = cap._current()
            try:
                call = build(name, module)
            except Exception as err:
                warnings.warn(
                    f"AttentionCapture: could not record an attention call in {name!r}: {err!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            cap.calls += 1
            cap._on_call(call)
    finally:
        _STATE.busy = False

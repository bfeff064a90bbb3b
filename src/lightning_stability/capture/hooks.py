"""The capture layer's one way of holding hooks: only inside ``with``, all removed on exit."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from typing_extensions import Self


class HookContext:
    """Base of the context managers that put hooks on a model for one forward.

    A subclass registers its hooks in :meth:`_install` (entering each handle into the stack
    it is given) and resets its per-forward state in :meth:`_reset`. Every handle is removed
    on exit — also when the forward raises, and when installing fails half way — so no hook
    outlives the ``with`` (TransformerLens/captum style).
    """

    def __init__(self) -> None:
        self._stack = ExitStack()

    def _reset(self) -> None:
        """Clear what one forward records (called on entry)."""

    def _install(self, stack: ExitStack) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._reset()
        try:
            self._install(self._stack)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

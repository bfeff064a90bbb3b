"""Taps on block outputs (and optionally inputs) during one forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch  # noqa: F401  (doctest namespace)
from torch import Tensor, nn

#: ``(block index, call number within the forward, output)``
OutputFn = Callable[[int, int, Tensor], None]
#: ``(block index, call number, args, kwargs)``
InputFn = Callable[[int, int, tuple[Any, ...], dict[str, Any]], None]


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a block contributes: itself, or the first element of a tuple/list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


class BlockTap:
    """Context manager calling ``on_output`` (and ``on_input``) for every block call.

    Hooks exist only inside the ``with``; they are removed on exit, also when the
    forward raises.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> seen = []
        >>> with BlockTap(list(model), lambda i, c, out: seen.append((i, c, tuple(out.shape)))):
        ...     _ = model(torch.zeros(1, 2))
        >>> seen
        [(0, 0, (1, 2)), (1, 0, (1, 2))]
        >>> model[0]._forward_hooks
        OrderedDict()
    """

    def __init__(
        self, blocks: Sequence[nn.Module], on_output: OutputFn, on_input: InputFn | None = None
    ) -> None:
        self.blocks = list(blocks)
        self.on_output = on_output
        self.on_input = on_input
        self._calls = [0] * len(self.blocks)
        self._stack = ExitStack()

    def __enter__(self) -> BlockTap:
        self._calls = [0] * len(self.blocks)
        try:
            for i, block in enumerate(self.blocks):
                if self.on_input is not None:
                    self._stack.enter_context(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._stack.enter_context(block.register_forward_hook(self._post(i)))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            assert self.on_input is not None
            self.on_input(i, self._calls[i], args, kwargs)

        return hook

    def _post(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = first_tensor(output)
            if out is not None:
                self.on_output(i, self._calls[i], out.detach())
            self._calls[i] += 1

        return hook

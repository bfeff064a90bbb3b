"""Taps on block outputs (and optionally inputs) during one forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.hooks import HookContext
from lightning_stability.capture.stacks import plain_name

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


class BlockTap(HookContext):
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
        super().__init__()

    def _reset(self) -> None:
        self._calls = [0] * len(self.blocks)

    def _install(self, stack: ExitStack) -> None:
        for i, block in enumerate(self.blocks):
            if self.on_input is not None:
                stack.enter_context(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            stack.enter_context(block.register_forward_hook(self._post(i)))

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


def floating_tensors(output: Any) -> list[Tensor]:
    """Every non-empty floating tensor of a module output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() and output.numel() else []
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in floating_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in floating_tensors(item)]
    return []


_ATTENTION_LEAVES = ("attn", "attention")
_FFN_LEAVES = {"mlp", "ffn", "feed_forward", "feedforward", "ff", "mlp_block", "fc", "channel_mixer"}


def find_sublayers(block: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """The block's attention and FFN sub-layers, by relative name: ``{"attention": (rel, m), "ffn": ...}``.

    The outermost submodule whose own name contains ``attn``/``attention`` (``attn``,
    ``self_attn``, ``attention``) is the attention; the outermost one named ``mlp``, ``ffn``,
    ``feed_forward``… is the FFN. Either may be missing (then its local error is not reported).

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2)
        >>> {k: rel for k, (rel, _) in find_sublayers(layer).items()}
        {'attention': 'self_attn'}
    """
    found: dict[str, tuple[str, nn.Module]] = {}
    for rel, sub in block.named_modules():
        if not rel:
            continue
        leaf = rel.rsplit(".", 1)[-1].lower()
        if "attention" not in found and any(w in leaf for w in _ATTENTION_LEAVES):
            found["attention"] = (rel, sub)
        elif (
            "ffn" not in found
            and leaf in _FFN_LEAVES
            and not any(w in rel.lower() for w in _ATTENTION_LEAVES)
        ):
            found["ffn"] = (rel, sub)
    return found


class ModuleAmax(HookContext):
    """Context manager recording ``max |output|`` of every module of a model during one forward.

    ``amax[name]`` is a 0-d tensor on the output's device (max over every floating output
    tensor and every call of that module); nothing is moved to the host. Hooks are removed on exit.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with ModuleAmax(model) as rec:
        ...     _ = model(torch.ones(1, 2))
        >>> sorted(rec.amax) == ["", "0", "1"]
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.amax: dict[str, Tensor] = {}
        super().__init__()

    def _reset(self) -> None:
        self.amax = {}

    def _install(self, stack: ExitStack) -> None:
        for name, module in self.model.named_modules():  # a wrapper and its module share a name: max of both
            stack.enter_context(module.register_forward_hook(self._hook(plain_name(name))))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            tensors = floating_tensors(output)
            if not tensors:
                return
            # max |t| = max(max t, −min t): two reductions, no |t| copy (vector_norm(t, inf): ~30× slower)
            values = [torch.maximum(t.detach().amax(), t.detach().amin().neg()).float() for t in tensors]
            value = values[0] if len(values) == 1 else torch.stack(values).amax()
            old = self.amax.get(name)
            self.amax[name] = value if old is None else torch.maximum(old, value)

        return hook

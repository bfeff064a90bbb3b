"""The FP32 override: run one module (a block, or its attention) outside autocast, in FP32, reversibly.

Pure model mutation, no Lightning: :class:`FP32Override` wraps the module's ``forward`` by an
instance attribute and :meth:`FP32Override.restore` puts it back; nothing else of the model changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.stacks import is_attention_name

__all__ = ["FP32Override", "attention_module"]


def _up(obj: Any) -> Any:
    """Cast half-precision floating tensors in ``obj`` to FP32 (FP32/FP64, ints, masks untouched)."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() and obj.element_size() < 4 else obj
    if isinstance(obj, dict):
        return {k: _up(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_up(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_up(v) for v in obj)
    return obj


class FP32Override:
    """Run ``module`` outside autocast, in FP32, until :meth:`restore` (or the ``with`` ends).

    The module's ``forward`` is wrapped by an instance attribute (the class's method is
    untouched): autocast is disabled for CPU and CUDA and half-precision floating inputs are
    cast to FP32, so under mixed precision (FP32 weights) the module computes exactly as in an
    FP32 run. Its output is FP32; the next module autocasts it again. :meth:`restore` puts the
    previous ``forward`` back (an instance ``forward`` set by someone else included).
    Forward hooks of the module still fire around the wrapped call.

    Raises:
        ValueError: on :meth:`apply` when the module holds half-precision parameters
            (``bf16-true``/``16-true`` training): leaving autocast cannot make it compute in FP32.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> with FP32Override(lin), torch.autocast("cpu", dtype=torch.bfloat16):
        ...     lin(torch.randn(2, 4)).dtype
        torch.float32
        >>> "forward" in lin.__dict__
        False
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._saved: Callable[..., Any] | None = None
        self._had_instance_forward = False
        self.active = False

    def apply(self) -> FP32Override:
        """Wrap the module's forward (idempotent)."""
        if self.active:
            return self
        half = sorted(
            {str(p.dtype) for p in self.module.parameters() if p.is_floating_point() and p.element_size() < 4}
        )
        if half:
            raise ValueError(
                f"{type(self.module).__name__} holds {', '.join(half)} parameters: running it outside "
                "autocast cannot make it compute in FP32 (half-precision `*-true` training)"
            )
        self._had_instance_forward = "forward" in self.module.__dict__
        original = self.module.forward
        self._saved = original

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return original(*_up(args), **_up(kwargs))

        self.module.forward = forward
        self.active = True
        return self

    def restore(self) -> None:
        """Put the previous ``forward`` back (idempotent)."""
        if not self.active:
            return
        if self._had_instance_forward and self._saved is not None:
            self.module.forward = self._saved
        else:
            del self.module.__dict__["forward"]
        self._saved = None
        self.active = False

    def __enter__(self) -> FP32Override:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def state_dict(self) -> dict[str, Any]:
        """Whether the override is on (the module is named by whoever keeps the object)."""
        return {"active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply or restore the override as ``state`` says."""
        if state.get("active", False):
            self.apply()
        else:
            self.restore()


def attention_module(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost submodule of ``block`` whose name contains ``attn``/``attention`` (not a Linear).

    ``("attn", …)`` for GPT-2, ``("self_attn", …)`` for Llama and ``nn.TransformerEncoderLayer``,
    ``("attention", …)`` for BERT/ViT; ``None`` when the block has none.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2)
        >>> attention_module(layer)[0]
        'self_attn'
    """
    for name, sub in block.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        projection = isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D"
        if name and not projection and is_attention_name(leaf):
            return name, sub
    return None

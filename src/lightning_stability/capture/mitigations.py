"""Mitigations a guard can apply to a model: pure model mutations, no Lightning.

- :class:`FP32Override`: run one module (a block, or its attention) outside autocast, in
  FP32, until :meth:`FP32Override.remove` — reversible, nothing else of the model changes.
- :func:`qk_clip_`: QK-clip (Kimi K2's MuonClip, Megatron's ``clip_qk``): rescale the query
  and key rows of the heads whose maximum attention logit ``S_h`` exceeds ``τ`` by
  ``η_h = min(1, τ/S_h)``, ``W_Q^h ← η_h^α W_Q^h`` and ``W_K^h ← η_h^{1−α} W_K^h`` (``α = ½``:
  ``√η_h`` on each), biases alike, so head ``h``'s logits ``q·k`` are multiplied by exactly
  ``η_h`` and its maximum becomes ``τ`` on the same input. Not reversible: it changes weights.

The ε of a normalization layer is raised and restored by
:class:`~lightning_stability.LNEpsilonBump` itself (the guard delegates to it), so no second
copy of that logic lives here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.structure import Block, QKProjection, is_attention_name


# ----------------------------------------------------------------------------- FP32 override
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
    """Run ``module`` outside autocast, in FP32, until :meth:`remove` (or the ``with`` ends).

    The module's ``forward`` is wrapped by an instance attribute (the class's method is
    untouched): autocast is disabled for CPU and CUDA and half-precision floating inputs are
    cast to FP32, so under mixed precision (FP32 weights) the module computes exactly as in an
    FP32 run. Its output is FP32; the next module autocasts it again. :meth:`remove` puts the
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

    def remove(self) -> None:
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
        self.remove()


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


# ------------------------------------------------------------------------------------ QK-clip
@dataclass
class QKParams:
    """The query/key weights ``(out, in)`` and biases of one attention, as views of its parameters."""

    name: str
    w_q: Tensor
    w_k: Tensor
    b_q: Tensor | None
    b_k: Tensor | None


def qk_params(block: Block, proj: QKProjection) -> QKParams:
    """Resolve ``proj``'s W_Q, W_K and their biases (its getters) to writable views.

    The rows are the ones the diagnostics measure: :class:`QKProjection` splits separate
    ``q_proj``/``k_proj``-style children, fused ``[Q | K | V]`` weights (``in_proj``, GPT-2
    ``c_attn``, ``qkv``) and per-head layouts, weights and biases alike, in one place.

    Raises:
        ValueError: when a weight or bias is not a view of one of the block's parameters
            (scaling it in place would not change the model: e.g. GPT-NeoX's per-head
            ``[q_h|k_h|v_h]`` rows, which no single view holds).
    """
    params = QKParams(proj.name, proj.w_q(), proj.w_k(), proj.b_q(), proj.b_k())
    storages = {p.untyped_storage().data_ptr() for p in block.module.parameters()}
    for label, t in (("W_Q", params.w_q), ("W_K", params.w_k), ("b_Q", params.b_q), ("b_K", params.b_k)):
        if t is not None and t.untyped_storage().data_ptr() not in storages:
            raise ValueError(f"{label} of {proj.name!r} is a copy, not a view of the block's parameters")
    return params


def qk_clip_factors(max_logits: Sequence[float], tau: float) -> list[float]:
    """``η_h = min(1, τ/S_h)`` per head (1 for a non-finite or non-positive ``S_h``).

    Example:
        >>> qk_clip_factors([150.0, 50.0], 100.0)
        [0.6666666666666666, 1.0]
    """
    return [tau / s if math.isfinite(s) and s > tau else 1.0 for s in max_logits]


def _head_rows(t: Tensor, n_heads: int) -> list[Tensor]:
    """Row blocks of ``t`` (``(n_heads·d_head, …)`` or ``(n_heads·d_head,)``), one view per head.

    ``chunk`` along dim 0 always returns views, also of a transposed (``Conv1D``) weight.
    """
    return list(t.chunk(n_heads, dim=0))


@torch.no_grad()
def qk_clip_(params: QKParams, factors: Sequence[float], alpha: float = 0.5) -> list[int]:
    """Scale head ``h``'s query rows by ``η_h^α`` and key rows by ``η_h^{1−α}``, in place.

    With one factor it applies to every head (the whole W_Q and W_K). With one per query
    head and fewer key heads (grouped-query attention, a key head shared by several query
    heads) the query rows take the whole ``η_h`` and the shared keys are left alone, as
    Megatron does for MLA's shared rotary key; the logits ``q_h·k`` still scale by ``η_h``.

    Args:
        params: the attention's weights and biases (:func:`qk_params`).
        factors: ``η_h`` per query head (or one for all), each in ``(0, 1]``.
        alpha: the query's share ``α`` of the rescaling (Kimi K2 and Megatron: 0.5).

    Returns:
        The heads actually rescaled (``η_h < 1``).
    """
    if not factors or not all(0.0 < f <= 1.0 for f in factors):
        raise ValueError(f"QK-clip factors must lie in (0, 1], got {list(factors)}")
    n_heads = len(factors)
    w_q, w_k = params.w_q, params.w_k
    if w_q.shape[0] % n_heads:
        raise ValueError(f"{params.name!r}: W_Q has {w_q.shape[0]} rows, not a multiple of {n_heads} heads")
    grouped = n_heads > 1 and w_k.shape[0] != w_q.shape[0]
    q_views = [_head_rows(w_q, n_heads)]
    k_views = [] if grouped else [_head_rows(w_k, n_heads)]
    if params.b_q is not None:
        q_views.append(_head_rows(params.b_q, n_heads))
    if params.b_k is not None and not grouped:
        k_views.append(_head_rows(params.b_k, n_heads))
    clipped = []
    for h, eta in enumerate(factors):
        if eta >= 1.0:
            continue
        clipped.append(h)
        q_scale = eta if grouped else eta**alpha
        for views in q_views:
            views[h].mul_(q_scale)
        for views in k_views:
            views[h].mul_(eta ** (1.0 - alpha))
    return clipped


def clip_block_qk(
    block: Block, max_logits: Sequence[float], tau: float, alpha: float = 0.5
) -> dict[str, list[int]]:
    """QK-clip every query/key projection of ``block``; ``{projection name: heads rescaled}``.

    ``max_logits`` holds ``S_h`` per head (or one value applied to every head).
    """
    factors = qk_clip_factors(max_logits, tau)
    resolved = [qk_params(block, proj) for proj in block.qk]  # all resolved before any is changed
    return {params.name: qk_clip_(params, factors, alpha) for params in resolved}

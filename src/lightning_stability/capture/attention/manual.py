"""Attention written out by hand, ``softmax(q @ kᵀ · scale + mask) @ v``, traced op by op.

The capture's function mode hands every op to :func:`_track`: a 4-D matmul's output starts a
trace (its operands are Q and Kᵀ), scaling, masking, views and casts carry it on (the factor
is tracked), a softmax over the last axis of a traced (or any 4-D) tensor is remembered, and the
matmul consuming that softmax's output (also through dropout, views and casts) completes a
record whose ``scores`` are the softmax input and whose ``v`` is the matmul's other operand.
Soft-capping ``c·tanh(x/c)`` (litgpt's Gemma-2) carries the trace on too: ``tanh`` of a traced
tensor caps it at 1, a positive number multiplying a capped trace scales the cap and the
factor alike, so ``c·tanh(scale·q kᵀ/c)`` becomes ``scale`` and ``softcap = c`` in the record.
The bookkeeping keeps references, never copies, keyed by tensor identity; an entry vanishes
with its tensor (weak reference).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .call import AttentionCall
from .masks import MASK_GAP, additive_floor
from .state import _STATE, _dispatch


def _methods(*names: str) -> frozenset[Any]:
    """The function objects a ``TorchFunctionMode`` receives for these ``Tensor`` methods."""
    found = {getattr(cls, n, None) for cls in (Tensor, torch._C.TensorBase) for n in names}
    found.discard(None)
    return frozenset(found)


_MATMUL = _methods("matmul", "__matmul__", "bmm") | {torch.matmul, torch.bmm}
_SOFTMAX = _methods("softmax") | {F.softmax, torch.softmax}
#: ops whose output is the traced input times a factor (the factor is tracked)
_SCALE = _methods("mul", "__mul__", "__rmul__", "div", "__truediv__", "true_divide") | {
    torch.mul,
    torch.div,
    torch.true_divide,
}
_SCALE_INPLACE = _methods("mul_", "__imul__", "div_", "__itruediv__", "true_divide_")
#: ops that add to / overwrite entries of the traced input (masks, biases): the trace carries on
_SHIFT = _methods("add", "__add__", "__radd__", "sub", "__sub__", "masked_fill") | {
    torch.add,
    torch.sub,
    torch.masked_fill,
}
_SHIFT_INPLACE = _methods("add_", "__iadd__", "sub_", "__isub__", "masked_fill_")
#: ops that keep the values (views, copies, casts) and, for probabilities, dropout
_SAME = _methods("view", "reshape", "contiguous", "float", "to", "type_as", "clone") | {
    torch.reshape,
    F.dropout,
    torch.dropout,
}
_TANH = _methods("tanh") | {torch.tanh, F.tanh}
_ADDS = _methods("add", "__add__", "__radd__") | {torch.add}
_DIVIDES = _methods("div", "__truediv__", "true_divide", "div_", "__itruediv__", "true_divide_") | {
    torch.div,
    torch.true_divide,
}


@dataclass
class _Trace:
    """A tensor computed as ``factor · (q @ kT)`` plus additive/overwritten entries; with a
    ``softcap`` ``c``, as ``c·tanh(factor · (q @ kT) / c)`` plus entries added after the cap."""

    ref: weakref.ref[Tensor]
    q: Tensor
    k_t: Tensor
    factor: float | Tensor
    softcap: float | None = None

    def carried(self, ref: weakref.ref[Tensor]) -> _Trace:
        """The same trace for another tensor (a view, a copy, the trace plus a mask)."""
        return _Trace(ref, self.q, self.k_t, self.factor, self.softcap)


@dataclass
class _Probs:
    """A softmax output (``ref``) of ``scores``; ``trace`` is the scores' trace, if any."""

    ref: weakref.ref[Tensor]
    scores: Tensor
    trace: _Trace | None


def _remember(table: dict[int, Any], out: Tensor, make: Callable[[weakref.ref[Tensor]], Any]) -> None:
    """``table[id(out)] = make(ref)``; the entry is dropped when ``out`` is freed."""
    key = id(out)

    def drop(_: object, key: int = key) -> None:
        entry = table.get(key)
        if entry is not None and entry.ref() is None:
            del table[key]

    table[key] = make(weakref.ref(out, drop))


def _lookup(table: dict[int, Any], t: object) -> Any:
    if not isinstance(t, Tensor):
        return None
    entry = table.get(id(t))
    return entry if entry is not None and entry.ref() is t else None


def _factor(x: object) -> float | Tensor | None:
    """A multiplier that keeps ``q @ kT``'s rows and columns (a number, or a tensor whose last two
    dims are 1, e.g. a per-head logit scale); ``None`` for anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Tensor) and x.is_floating_point() and (x.dim() < 2 or x.shape[-2:] == (1, 1)):
        return x.detach() if x.numel() > 1 else float(x.detach().reshape(()))
    return None


def _track(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> tuple[_Probs, Tensor] | None:
    """Bookkeeping by tensor identity after ``out = func(*args, **kwargs)``; no copies are made.

    Returns ``(probabilities, V)`` when ``func`` is the matmul consuming a softmax output.
    """
    st = _STATE
    if func in _MATMUL:
        a, b = (*args, None, None)[:2]
        probs = _lookup(st.probs, a)
        if probs is not None:
            del st.probs[id(a)]
            return (probs, b) if isinstance(b, Tensor) else None
        operands = isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 2 and b.dim() >= 2
        if operands and isinstance(out, Tensor) and out.dim() == 4 and out.is_floating_point():
            _remember(st.traces, out, lambda r: _Trace(r, a, b, 1.0))
        return None
    if func in _SOFTMAX:
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if isinstance(x, Tensor) and isinstance(out, Tensor) and x.dim() == 4 and dim in (-1, 3):
            scores: Tensor = x.detach()
            trace = _lookup(st.traces, x)
            _remember(st.probs, out, lambda r: _Probs(r, scores, trace))
        return None
    if not (st.traces or st.probs) or not args or not isinstance(out, Tensor):
        return None
    if func in _SAME:
        probs = _lookup(st.probs, args[0])
        if probs is not None and out is not args[0]:
            _remember(st.probs, out, lambda r: _Probs(r, probs.scores, probs.trace))
            return None
        trace = _lookup(st.traces, args[0])
        if trace is not None and out is not args[0]:
            _remember(st.traces, out, trace.carried)
        return None
    if func in _SCALE or func in _SCALE_INPLACE:
        _track_scale(func, args, kwargs, out)
        return None
    if func in _TANH:
        trace = _lookup(st.traces, args[0])
        if trace is not None and trace.softcap is None and isinstance(trace.factor, float):
            # tanh(factor·q kᵀ) = 1·tanh(factor·q kᵀ / 1): capped at 1
            _remember(st.traces, out, lambda r: _Trace(r, trace.q, trace.k_t, trace.factor, 1.0))
        return None
    if func in _SHIFT or func in _SHIFT_INPLACE:
        trace = _lookup(st.traces, args[0])
        if trace is None and func in _ADDS and len(args) > 1:
            trace = _lookup(st.traces, args[1])
        if trace is not None and out is not trace.ref():
            _remember(st.traces, out, trace.carried)
    return None


def _track_scale(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> None:
    """Carry a trace through a multiplication or division by a factor (:func:`_factor`).

    ``m · c·tanh(L/c) = (m·c)·tanh(m·L/(m·c))``: a capped trace scales its cap and its factor
    by a positive number ``m``; any other factor ends a capped trace.
    """
    x, y = (*args, kwargs.get("other"))[:2]
    trace = _lookup(_STATE.traces, x)
    if trace is None and func not in _DIVIDES:
        x, y = y, x
        trace = _lookup(_STATE.traces, x)
    f = _factor(y)
    if trace is None or f is None or (func in _DIVIDES and isinstance(f, float) and f == 0.0):
        return
    m = 1.0 / f if func in _DIVIDES else f
    cap = trace.softcap
    if cap is not None:
        if not (isinstance(m, float) and m > 0):
            return
        cap *= m
    new = trace.factor * m
    if out is x:
        trace.factor, trace.softcap = new, cap
    else:
        _remember(_STATE.traces, out, lambda r: _Trace(r, trace.q, trace.k_t, new, cap))


def _observed(*tensors: Tensor) -> bool:
    return any(r() is t for r in _STATE.observed for t in tensors)


def _dispatch_manual(probs: _Probs, v: Tensor) -> None:
    """Record ``softmax(scores) @ v`` unless :func:`observe_attention` already reported it."""
    trace = probs.trace
    if _observed(v) or (trace is not None and _observed(trace.q)):
        return
    _dispatch(lambda name, _m: _manual_call(name, probs.scores, trace, v))


def _manual_call(name: str, scores: Tensor, trace: _Trace | None, v: Tensor) -> AttentionCall:
    """An :class:`AttentionCall` from a softmax input, its traced Q/K (if any) and V.

    The keep-mask is the :func:`fold_mask` rule applied to the additive part of the scores,
    ``A = scores - factor·(q @ kT)`` (masks and biases added, ``masked_fill``-ed entries), when
    Q and K are traced; otherwise to the scores themselves shifted by their row maximum
    (``s <= max_row s - MASK_GAP``). ``-inf`` entries are always masked.

    A soft-capped trace gives the record transformers' eager Gemma-2 attention gives: Q, K,
    ``scale``, ``softcap`` and the keep-mask, no ``scores`` (so ``attn_logit_max`` is the logit
    before the cap, as for every other record), when they reproduce the scores to rounding on
    the attended entries; otherwise (something added between the cap and the softmax other
    than a mask) the record keeps the scores alone.
    """
    s = scores.detach()
    b, h, _, n_k = s.shape
    v4 = torch.broadcast_to(v.detach(), (b, h, n_k, v.shape[-1]))
    traced = _traced_call(name, s, trace, v4) if trace is not None else None
    if traced is not None:
        return traced
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    keep = ~(s <= top - MASK_GAP)
    keep_or_none = None if bool(keep.all()) else keep
    return AttentionCall(name=name, q=None, k=None, v=v4, keep=keep_or_none, bias=None, scale=1.0, scores=s)


def _traced_call(name: str, s: Tensor, trace: _Trace, v4: Tensor) -> AttentionCall | None:
    """The record of scores ``s`` whose Q/K were traced (:func:`_manual_call`); ``None`` when the
    trace does not fit them."""
    b, h, n_q, n_k = s.shape
    qk = trace.q.detach().double() @ trace.k_t.detach().double()
    if tuple(torch.broadcast_shapes(qk.shape, s.shape)) != tuple(s.shape) or trace.k_t.shape[-1] != n_k:
        return None
    f, cap = trace.factor, trace.softcap
    ref = (f.double() if isinstance(f, Tensor) else f) * qk
    if cap is not None:
        ref = cap * torch.tanh(ref / cap)
    additive = torch.where(torch.isneginf(s), float("-inf"), s.double() - ref)
    keep = ~(additive <= additive_floor(additive))
    keep_or_none = None if bool(keep.all()) else keep
    d = trace.q.shape[-1]
    q4 = torch.broadcast_to(trace.q.detach(), (b, h, n_q, d))
    k4 = torch.broadcast_to(trace.k_t.detach().mT, (b, h, n_k, d))
    factor = f if isinstance(f, float) else 1.0
    if cap is None:
        bias = _reproducing_bias(s, factor * qk, keep)
        return AttentionCall(name, q4, k4, v4, keep_or_none, bias, factor, scores=s)
    if _reproducing_bias(s, ref, keep) is not None:
        return None
    return AttentionCall(name, q4, k4, v4, keep_or_none, None, factor, softcap=cap)


def _reproducing_bias(s: Tensor, scaled_qk: Tensor, keep: Tensor) -> Tensor | None:
    """``s − scale·q kᵀ`` on attended entries (0 elsewhere), in ``s``'s float dtype, so that the
    SDPA-form fields of the record reproduce ``s`` too; ``None`` when that is rounding noise."""
    diff = torch.where(keep, s.double() - scaled_qk, 0.0)
    size = torch.where(keep, s.double().abs(), 0.0).amax() + 1.0
    if bool(diff.abs().amax() <= 64 * torch.finfo(s.dtype).eps * size):
        return None
    return diff.to(s.dtype if s.is_floating_point() else torch.float32)

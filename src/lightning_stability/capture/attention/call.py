"""One attention evaluation as a record (:class:`AttentionCall`), and the numbers it yields.

Every form of attention a capture sees (SDPA, ``nn.MultiheadAttention``, transformers' eager
attention, hand-written softmax attention, :func:`~.context.observe_attention`) becomes one
:class:`AttentionCall`; :func:`call_diagnostics` turns a record into the per-head diagnostics
of :mod:`lightning_stability.diagnostics`, :func:`call_probabilities` into its attention
probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_stability.diagnostics.attention import AttentionDiagnostics, attention_diagnostics

__all__ = ["AttentionCall", "call_diagnostics", "call_probabilities"]


@dataclass(frozen=True)
class AttentionCall:
    """One attention evaluation, normalised to ``(B, H, n, d)``.

    The attention it describes is ``softmax(scale · q kᵀ + bias, restricted to keep) @ v``.

    Attributes:
        name: Qualified name (as in ``model.named_modules()``) of the innermost module of the
            captured model running when the call happened, e.g. ``'h.0.attn'``; ``''`` for the
            root module or when no module of the model is running.
        q: Queries ``(B, H, n_q, d)``, detached, dtype as it arrived at the kernel.
        k: Keys ``(B, H, n_k, d)``, detached; grouped-query K/V heads are already mapped to the
            K/V head each query head really uses, so head ``h`` of ``q`` pairs with head ``h``.
        v: Values ``(B, H, n_k, d_v)``, detached, mapped like ``k``.
        keep: Boolean, broadcastable to ``(B, H, n_q, n_k)``; ``True`` = the key is attended.
            Folds causal masking, boolean masks, additive ``-inf``/``finfo.min`` entries and key
            padding masks. ``None`` when every key is attended. A row may be all ``False``
            (e.g. a left-padded query position).
        bias: The finite additive part of a float mask (masked entries zeroed), broadcastable to
            the scores; ``None`` when the mask is purely 0/masked.
        scale: Softmax scale actually used (SDPA's default is ``1/sqrt(d)``).
        softcap: Soft-capping constant ``c`` when the logits ``L = scale·q kᵀ + bias`` pass
            through ``c·tanh(L/c)`` before the softmax (Gemma-2 ``attn_logit_softcapping``).
        scores: The softmax input itself ``(B, H, n_q, n_k)`` (masks included, detached), for
            attention written out by hand (``softmax(q @ kᵀ · scale + mask) @ v``). When set it is
            authoritative: ``q``/``k`` are the matmul operands traced back from it (``None`` when
            they could not be traced: ``kappa_score`` is then unknown); with them, ``scale`` (the
            traced scalar factor, else 1) and ``bias`` (``scores − scale·q kᵀ`` on attended
            entries, ``None`` when that is only rounding) reproduce ``scores`` to rounding, so
            a consumer of the SDPA-form fields still sees the same attention.
    """

    name: str
    q: Tensor | None
    k: Tensor | None
    v: Tensor
    keep: Tensor | None
    bias: Tensor | None
    scale: float
    softcap: float | None = None
    scores: Tensor | None = None


def call_probabilities(call: AttentionCall) -> Tensor:
    """The attention probabilities of a recorded call, float64 ``(B, H, n_q, n_k)``.

    ``softmax`` of the recorded ``scores``, else of ``softcap(scale·q kᵀ + bias)``, over the attended
    keys; a row with no attended key is all zeros.
    """
    if call.scores is not None:
        s = call.scores.double()
    else:
        if call.q is None or call.k is None:
            raise ValueError("call_probabilities: the call has neither scores nor q/k")
        s = call.scale * (call.q.double() @ call.k.double().transpose(-1, -2))
        if call.bias is not None:
            s = s + call.bias.double()
        if call.softcap is not None:
            s = call.softcap * torch.tanh(s / call.softcap)
    if call.keep is not None:
        s = s.masked_fill(~call.keep, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def call_diagnostics(call: AttentionCall, *, chunk_size: int | None = None) -> AttentionDiagnostics:
    """The per-head diagnostics of one recorded call, whatever form it was recorded in.

    Passes every field the record has (``scores`` of hand-written attention, ``softcap``, the
    bias) to :func:`~lightning_stability.diagnostics.attention_diagnostics` in float32
    (float64 stays float64), with contiguous Q/K/V (they are usually permuted views).

    Args:
        call: A record handed to an :class:`AttentionCapture` callback.
        chunk_size: Passed on (number of (b, h) pairs per chunk).

    Returns:
        ``(B, H)`` float64 diagnostics; ``kappa_score`` is NaN for a call recorded from its scores
        without traceable Q/K.
    """

    def work(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return (t if t.dtype == torch.float64 else t.float()).contiguous()

    v = work(call.v)
    assert v is not None
    return attention_diagnostics(
        work(call.q),
        work(call.k),
        v,
        mask=call.keep,
        scale=call.scale,
        bias=work(call.bias),
        softcap=call.softcap,
        scores=work(call.scores),
        chunk_size=chunk_size,
    )

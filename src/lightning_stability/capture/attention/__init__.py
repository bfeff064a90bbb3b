"""Intercept every attention evaluation of a model's forward pass, as a neutral observer.

The stability diagnostics (SPEC §1) need, per attention call, the query/key/value tensors
exactly as the kernel saw them, which keys each query attended to, any additive bias, and the
softmax scale. Models compute attention in several ways; this module turns all of them into one
record, :class:`AttentionCall`:

1. ``F.scaled_dot_product_attention`` (hand-written models, timm-style blocks, transformers'
   ``sdpa`` attention) is seen by a :class:`torch.overrides.TorchFunctionMode`.
2. ``nn.MultiheadAttention`` / ``nn.Transformer{Encoder,Decoder}Layer`` call
   ``F.multi_head_attention_forward``; the same mode sees that call and recomputes Q/K/V from its
   arguments with torch's own in-projection helpers (bit-identical to what the kernel receives).
   The fused eval fast paths are switched off while a capture is active
   (``torch.backends.mha.set_fastpath_enabled(False)``), so the Python path really runs.
3. transformers ``eager`` attention never calls SDPA; while active, the lookup
   ``AttentionInterface.get_interface("eager", default)`` returns a wrapper that records the call
   and delegates to exactly the function the model would have used (``default``, the model
   file's ``eager_attention_forward``), so outputs stay bitwise identical. The registry's
   contents are never changed (no name is registered). Only done if ``transformers`` is already
   imported; it is never imported here.
   T5's ``position_bias`` keyword (added to the scores) and Gemma-2's ``softcap`` (tanh
   soft-capping) enter the record; the eager function's own softmax/matmuls are not recorded
   again.
4. Attention written out by hand (timm's non-fused path, Swin, nanoGPT's manual path,
   research code: ``softmax(q @ kᵀ · scale + mask) @ v``) is seen by the same mode without an
   adapter: a softmax over the last axis of a 4-D tensor, and the matmul (``@``,
   ``torch.matmul``, ``bmm``) consuming its output (also through dropout, views and casts),
   give a record whose ``scores`` are the softmax input (masks included) and whose ``v`` is the
   matmul's other operand. ``q``/``k`` are the operands of the 4-D matmul that produced the
   scores, followed by tensor identity through ``* scale``, ``/ scale``, ``+ mask``/``+ bias``,
   ``masked_fill``, views and casts (in place too); ``None`` when the chain is broken (e.g. a
   ``tanh``), then ``kappa_score`` is unknown. The bookkeeping keeps references, never copies,
   keyed by tensor identity; an entry vanishes with its tensor (weak reference).
5. Attention the above cannot see calls :func:`observe_attention` (a cheap no-op unless a
   capture is active); the explicit softmax that follows it is then not recorded twice.

The innermost module of ``model`` running at the time of the call is tracked with forward
pre-hooks and ``always_call=True`` forward hooks that push/pop its qualified name.

Everything installed is removed on exit, even when the forward raises: hooks, the function
mode, the ``get_interface`` wrapper and the MHA fast-path flag (restored to its previous value).
Captures may nest; the global machinery (mode, eager lookup, fast-path flag) is
installed by the first active capture and removed with the last, and every active capture is
told about every call. Not thread-safe: use one capture at a time per process.

Known limitations:
    * Calls made while a capture is active but outside ``model`` are recorded too (name ``''``).
    * ``q``/``k``/``v`` (and ``scores``) are detached views sharing storage with the model's
      tensors: read them inside ``on_call`` (or clone them) — a static KV cache may be updated
      in place later, and hand-written code may reuse the score buffer.
    * Not seen: flash/flex/paged transformers backends, GPT-2 ``eager`` with
      ``reorder_and_upcast_attn=True`` (bypasses the attention interface), models that fetch
      attention with ``getattr(ALL_ATTENTION_FUNCTIONS, impl, default)`` (kosmos2_5), fused
      kernels called directly (``torch._native_multi_head_attention``), compiled graphs.
    * Dropout inside the attention call (SDPA ``dropout_p``, ``F.dropout`` on the probabilities)
      is ignored: the record describes the attention before dropout.
    * Hand-written attention: only a softmax over the last axis of a 4-D ``(B, H, n_q, n_k)``
      tensor consumed by a matmul is recorded (not 3-D ``(B·H, n, n)`` layouts, ``einsum``,
      ``baddbmm``, or a softmax whose output reaches the matmul through other ops). Without
      traced Q/K its keep-mask comes from the scores themselves (``s <= max_row s - MASK_GAP``),
      so a row that is entirely masked by a finite value is then taken as attended.
    * A finite additive "mask" shallower than ``MASK_GAP`` ≈ 87.3 below its row (e.g. ``-50``)
      is kept as bias; an ALiBi key further than ``87.3/slope`` tokens counts as masked (see
      :func:`fold_mask`).
    * MHA's ``need_weights=True`` path scales q by ``sqrt(1/d)``; the record reports ``1/sqrt(d)``
      (equal up to one ulp).
"""
from lightning_stability.capture.attention.call import AttentionCall, call_diagnostics, call_probabilities
from lightning_stability.capture.attention.context import AttentionCapture, observe_attention
from lightning_stability.capture.attention.masks import (
    MASK_GAP,
    CausalAlignment,
    MaskParts,
    additive_floor,
    causal_keep,
    fold_mask,
    keep_mask,
)

__all__ = [
    "MASK_GAP",
    "AttentionCall",
    "AttentionCapture",
    "CausalAlignment",
    "MaskParts",
    "additive_floor",
    "call_diagnostics",
    "call_probabilities",
    "causal_keep",
    "fold_mask",
    "keep_mask",
    "observe_attention",
]

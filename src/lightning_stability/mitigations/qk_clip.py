"""QK-clip (Kimi K2's MuonClip, Megatron's ``clip_qk``): bound a block's attention logits by τ.

The query and key rows of the heads whose maximum attention logit ``S_h`` exceeds ``τ`` are
rescaled by ``η_h = min(1, τ/S_h)``, ``W_Q^h ← η_h^α W_Q^h`` and ``W_K^h ← η_h^{1−α} W_K^h``
(``α = ½``: ``√η_h`` on each), biases alike, so head ``h``'s logits ``q·k`` are multiplied by
exactly ``η_h`` and its maximum becomes ``τ`` on the same input. Not reversible: it changes
weights, which training then moves on from (:meth:`QKClip.restore` undoes nothing, and says so).

Two schedules: :meth:`QKClip.apply` clips by maxima measured elsewhere (the monitor's sampled
steps); once armed (:meth:`QKClip.arm`), :meth:`QKClip.clip_watched` clips after every optimizer step by
the per-head maxima of the block's own training forwards (:class:`HeadLogitWatch`), as MuonClip
does, so the optimizer cannot regrow the logits for several steps between two measurements.

Pure model mutation, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.logit_watch import HeadLogitWatch
from lightning_stability.capture.structure import Block, QKProjection
from lightning_stability.rules.thresholds import QK_CLIP_TAU

__all__ = ["QKClip", "QKParams", "clip_block_qk", "qk_clip_", "qk_clip_factors", "qk_norm", "qk_params"]

#: Names under which attention modules keep a norm of their queries or keys, applied after the
#: projection (transformers Qwen3/OLMo2/Gemma3/Cohere ``q_norm``, Llama 4 ``qk_norm``, litgpt
#: ``norm_q``, Megatron ``q_layernorm``, timm ``q_norm``, an ``nn.Identity`` when off).
QK_NORM_NAMES = frozenset(
    {
        "q_norm",
        "k_norm",
        "qk_norm",
        "norm_q",
        "norm_k",
        "query_norm",
        "key_norm",
        "q_layernorm",
        "k_layernorm",
    }
)


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


def qk_norm(block: Block) -> str | None:
    """The qualified name of a query or key norm in ``block`` (:data:`QK_NORM_NAMES`), else ``None``.

    Such a norm divides the projected queries (keys) by their own scale: rescaling W_Q and W_K
    before it leaves the logits as they were, so QK-clip cannot lower them.
    """
    for name, module in block.module.named_modules():
        if name.rpartition(".")[2] in QK_NORM_NAMES and not isinstance(module, nn.Identity):
            return f"{block.name}.{name}"
    return None


def _check_clippable(block: Block) -> None:
    """``ValueError`` when rescaling ``block``'s W_Q/W_K cannot lower its logits (a qk-norm after them)."""
    norm = qk_norm(block)
    if norm is not None:
        raise ValueError(
            f"{norm!r} normalizes the queries or keys after their projection (qk-norm): rescaling "
            "W_Q/W_K cannot lower the logits, so QK-clip does not change the block (lower the "
            "learning rate, or the norm's gain, instead)"
        )


def qk_clip_factors(max_logits: Sequence[float], tau: float) -> list[float]:
    """``η_h = min(1, τ/S_h)`` per head (1 for a non-finite or non-positive ``S_h``).

    Example:
        >>> qk_clip_factors([150.0, 50.0], tau=QK_CLIP_TAU)
        [0.6666666666666666, 1.0]
    """
    return [tau / s if math.isfinite(s) and s > tau else 1.0 for s in max_logits]


def _as_values(maxima: Tensor) -> list[float]:
    """Per-head maxima as floats, NaN as 0 (a head with NaN logits is left alone)."""
    return [float(v) for v in maxima.nan_to_num(nan=0.0, posinf=math.inf).tolist()]


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

    Raises:
        ValueError: when a weight cannot be rescaled in place (:func:`qk_params`), or when a
            qk-norm after the projections makes the rescaling useless (:func:`qk_norm`).
    """
    _check_clippable(block)
    factors = qk_clip_factors(max_logits, tau)
    resolved = [qk_params(block, proj) for proj in block.qk]  # all resolved before any is changed
    return {params.name: qk_clip_(params, factors, alpha) for params in resolved}


class QKClip:
    """QK-clip of one block as a mitigation object: at each measured step past τ, or at every step once armed.

    Not reversible: the clipped weights are the model's from then on (the optimizer moves on
    from them), so :meth:`restore` undoes no weight; it only stops watching (:meth:`disarm`).
    :meth:`state_dict` keeps the record.

    Args:
        block: the block whose query/key projections are clipped.
        tau: the largest logit a head keeps on the measured sample.
        alpha: the queries' share of the rescaling.

    Attributes:
        factors: the smallest ``η`` of each :meth:`apply` that rescaled a head.
        watched_clips: optimizer steps at which :meth:`clip_watched` rescaled a head.
    """

    def __init__(self, block: Block, tau: float = QK_CLIP_TAU, alpha: float = 0.5) -> None:
        self.block, self.tau, self.alpha = block, float(tau), float(alpha)
        self.factors: list[float] = []
        self.watched_clips = 0
        self._watch: HeadLogitWatch | None = None
        self._stack = ExitStack()

    def apply(self, max_logits: Sequence[float]) -> dict[str, list[int]]:
        """Clip the heads whose ``S_h > τ``; ``{projection name: heads rescaled}`` (:func:`clip_block_qk`)."""
        clipped = clip_block_qk(self.block, max_logits, self.tau, self.alpha)
        if any(clipped.values()):
            self.factors.append(min(qk_clip_factors(max_logits, self.tau)))
        return clipped

    # ------------------------------------------------------------ every step
    @property
    def armed(self) -> bool:
        """Whether the block's training forwards are watched (:meth:`arm`)."""
        return self._watch is not None

    @property
    def watch(self) -> HeadLogitWatch | None:
        """The watch of the block's training forwards while armed."""
        return self._watch

    def arm(self) -> None:
        """Watch the block's training forwards, so that :meth:`clip_watched` can clip after every step.

        Raises:
            ValueError: when the block's query/key weights cannot be rescaled in place, or a
                qk-norm makes rescaling them useless (checked now, not at the first step).
        """
        if self._watch is not None:
            return
        _check_clippable(self.block)
        for proj in self.block.qk:
            qk_params(self.block, proj)
        if not self.block.qk:
            raise ValueError(f"no query/key projections found in {self.block.name!r}")
        self._watch = self._stack.enter_context(HeadLogitWatch(self.block.module))

    def disarm(self) -> None:
        """Stop watching: the hooks are removed. Idempotent."""
        self._watch = None
        self._stack.close()

    def clip_watched(
        self, reduce: Callable[[dict[str, Tensor]], Mapping[str, Tensor] | Tensor | None] | None = None
    ) -> tuple[list[float], dict[str, list[int]]] | None:
        """Clip by the per-head maxima of the training forwards since the last call (MuonClip's schedule).

        Call it after each optimizer step: the maxima were computed by the forward of that step,
        the clip applies to the weights the step produced.

        Args:
            reduce: combines the maxima (per attention, :meth:`HeadLogitWatch.take_each`) across
                processes before they are used (a maximum over DDP ranks, so that every rank clips
                alike); every process must call it.

        Returns:
            As :meth:`clip_by`.
        """
        if self._watch is None:
            return None
        maxima = self._watch.take_each()
        return self.clip_by(reduce(maxima) if reduce is not None else maxima)

    def clip_by(
        self, maxima: Mapping[str, Tensor] | Tensor | None
    ) -> tuple[list[float], dict[str, list[int]]] | None:
        """Clip the heads whose watched maximum ``S_h`` passed ``τ`` (NaN or inf: left alone).

        Args:
            maxima: per-head maxima ``(H,)``, or per attention of the block (keyed by the name,
                inside the block, of the module making the attention call:
                :meth:`HeadLogitWatch.take_each`); then each query/key projection is clipped by the
                maxima of the attention it belongs to (a decoder block's self- and
                cross-attention each by its own), or by their maximum when none matches.

        Returns:
            ``(maxima, {projection: heads rescaled})`` (``maxima``: over the block's attentions),
            or ``None`` when there is no finite maximum (no training forward watched, or a failed
            watch: see ``watch.error``).

        Raises:
            ValueError: as :func:`clip_block_qk`.
        """
        each = dict(maxima) if isinstance(maxima, Mapping) else {}
        top = torch.stack(list(each.values())).amax(dim=0) if each else maxima
        if not isinstance(top, Tensor) or not bool(torch.isfinite(top).any()):
            return None
        values = _as_values(top)
        _check_clippable(self.block)
        resolved = [(qk_params(self.block, p), self._own_maxima(p.name, each, values)) for p in self.block.qk]
        clipped = {p.name: qk_clip_(p, qk_clip_factors(heads, self.tau), self.alpha) for p, heads in resolved}
        if any(clipped.values()):
            self.watched_clips += 1
        return values, clipped

    def _own_maxima(self, proj: str, each: Mapping[str, Tensor], values: list[float]) -> list[float]:
        """The maxima of the attention whose module holds projection ``proj``, else ``values`` (all)."""
        inside = proj.removeprefix(self.block.name + ".")
        owners = [name for name in each if name and (inside == name or inside.startswith(name + "."))]
        if len(each) < 2 or not owners:
            return values
        return _as_values(each[max(owners, key=len)])

    def restore(self) -> None:
        """Nothing to undo in the weights (QK-clip changes them for good); stops watching."""
        self.disarm()

    def state_dict(self) -> dict[str, Any]:
        return {"factors": list(self.factors), "watched_clips": self.watched_clips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a record (the numbers only: arming, which puts hooks on the block, is :meth:`arm`'s)."""
        self.factors = [float(f) for f in state.get("factors", [])]
        self.watched_clips = int(state.get("watched_clips", 0))

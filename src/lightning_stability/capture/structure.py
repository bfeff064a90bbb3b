"""A Transformer's layout: its blocks (:mod:`.stacks`) and, inside each, the weights the diagnostics need.

**Weights** (:func:`describe_block`). Inside a block, linear maps under a name containing
``attn``/``attention`` belong to attention (the output projection gives ``W_O``, the
query/key projections give ``W_Kᵀ W_Q``), the others to the FFN (``kappa_eff``, SPEC §3).
Fused QKV weights are split by the layout of their family (:class:`QKProjection`). MoE
experts are kept apart (:attr:`Block.experts`); the router is excluded. What could not be
found is listed in :attr:`Block.missing` and worded by :func:`structure_warnings`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_stability.capture.stacks import (
    _Q_NAMES,
    _QKV_NAMES,
    find_stacks,
    is_attention_name,
    match_blocks,
    plain_name,
)

_OUT_NAMES = {
    "out_proj",
    "o_proj",
    "c_proj",
    "proj",
    "out",
    "dense",
    "wo",
    "o",
    "to_out",
    "output",
    "out_lin",
}


_K_NAMES = {"k_proj", "key", "k", "wk", "to_k", "k_lin"}


_ROUTER_NAMES = {"gate", "router"}
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
#: ``n_query_groups``: litgpt's number of key/value heads (its ``Config``)
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "n_query_groups")
_HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")

#: A function returning a weight as ``(out_features, in_features)`` at call time
#: (weights change during training, so they are read when measured).
WeightFn = Callable[[], Tensor]

#: A function returning a bias (``(out_features,)``) at call time, ``None`` for none.
BiasFn = Callable[[], Tensor | None]

#: Names of the kinds of weights :attr:`Block.missing` can list.
MISSING_WO, MISSING_QK, MISSING_FFN = "W_O", "W_Q/W_K", "FFN"


@dataclass
class QKProjection:
    """Where one attention's query and key weights live (SPEC §8, κ(W_Kᵀ W_Q)).

    ``w_q()`` is ``(n_heads·d_head, d_in)`` with head ``h`` in rows ``h·d_head…``;
    ``w_k()`` is ``(n_kv_heads·d_head, d_in)`` the same way, query head ``h`` using key
    head ``h // (n_heads // n_kv_heads)`` (transformers' ``repeat_kv``, Falcon's groups).
    Head counts are ``None`` when the module does not say (then they come from the
    attention call). ``layout`` names how a fused weight was split. ``b_q()`` / ``b_k()``
    are the query and key biases split the same way (``None``: the projection has no bias),
    so whoever rescales a head (QK-clip) finds its weight and bias rows exactly as the
    diagnostics do. Where the split is a contiguous row range (separate projections,
    contiguous ``[Q|K|V]``) the getters return views of the parameters.
    """

    name: str
    w_q: WeightFn
    w_k: WeightFn
    n_heads: int | None = None
    n_kv_heads: int | None = None
    layout: str = "separate"
    b_q: BiasFn = field(default=lambda: None, repr=False)
    b_k: BiasFn = field(default=lambda: None, repr=False)

    def pair(self, n_heads: int | None = None) -> tuple[Tensor, Tensor]:
        """``(W_Q, W_K)`` of equal shape, K's heads repeated to the query head each serves.

        Args:
            n_heads: query heads, when the module did not say (e.g. from the attention call).
        """
        w_q, w_k = self.w_q(), self.w_k()
        heads = self.n_heads or n_heads
        if w_k.shape[0] != w_q.shape[0] and heads and w_q.shape[0] % heads == 0:
            d_head = w_q.shape[0] // heads
            if w_k.shape[0] % d_head == 0 and heads % (w_k.shape[0] // d_head) == 0:
                rep = heads // (w_k.shape[0] // d_head)
                w_k = w_k.reshape(-1, d_head, w_k.shape[1]).repeat_interleave(rep, 0).reshape_as(w_q)
        return w_q, w_k


@dataclass
class Block:
    """One residual block and the weights of its linear maps.

    Attributes:
        index: global block index, in model order across stacks.
        name: qualified module name.
        module: the block.
        stack: qualified name of the stack it belongs to (``encoder.layers``), or its
            parent for blocks named by pattern.
        ffn: the dense FFN weights (all of them enter ``kappa_eff``).
        wo: attention output projections.
        qk: query/key projections.
        experts: one dict of weights per MoE expert (router excluded); see
            :func:`moe_kappa_eff` for how they enter ``kappa_eff``.
        notes: what was assumed (fused layouts, MoE), for the user's information.
        warnings: what the user should be told (a fused weight of unknown layout).
        missing: kinds of weights not found (:data:`MISSING_WO`, :data:`MISSING_QK`,
            :data:`MISSING_FFN`): their diagnostics are absent, not defaulted.
    """

    index: int
    name: str
    module: nn.Module
    ffn: dict[str, WeightFn] = field(default_factory=dict)
    wo: dict[str, WeightFn] = field(default_factory=dict)
    qk: list[QKProjection] = field(default_factory=list)
    stack: str = ""
    experts: list[dict[str, WeightFn]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def contains(self, module_name: str) -> bool:
        """Whether the module named ``module_name`` (wrapper segments or not) lies inside this block."""
        module_name = plain_name(module_name)
        return module_name == self.name or module_name.startswith(self.name + ".")


# --------------------------------------------------------------------------- weights
def _linear_weight(module: nn.Module) -> WeightFn | None:
    """``(out, in)`` weight getter for ``nn.Linear`` and transformers' ``Conv1D`` (stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return _weight_of(module, "weight")
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), Tensor):
        return lambda: _weight_of(module, "weight")().t()
    return None


def _weight_of(module: nn.Module, attr: str) -> WeightFn:
    return lambda: getattr(module, attr)


def _bias_of(module: nn.Module, attr: str = "bias") -> BiasFn:
    """Getter of ``module.<attr>`` when it is a tensor (read at call time), else of ``None``."""
    return lambda: value if isinstance(value := getattr(module, attr, None), Tensor) else None


def _rows(fn: WeightFn, start: int, stop: int) -> WeightFn:
    return lambda: fn()[start:stop]


def _bias_rows(fn: BiasFn, start: int, stop: int) -> BiasFn:
    return lambda: None if (b := fn()) is None else b[start:stop]


def _split_rows(w: Tensor, groups: int, per_group: int, d_head: int, take: slice) -> Tensor:
    """Rows of ``w`` (weight or bias) laid out as ``(groups, per_group, d_head)`` keeping ``take`` of each."""
    rest = tuple(w.shape[1:])
    return w.reshape(groups, per_group, d_head, *rest)[:, take].reshape(-1, *rest)


def _heads_rows(fn: WeightFn, groups: int, per_group: int, d_head: int, take: slice) -> WeightFn:
    """Rows of a weight laid out as ``(groups, per_group, d_head)`` keeping ``take`` of each group."""
    return lambda: _split_rows(fn(), groups, per_group, d_head, take)


def _bias_heads_rows(fn: BiasFn, groups: int, per_group: int, d_head: int, take: slice) -> BiasFn:
    return lambda: None if (b := fn()) is None else _split_rows(b, groups, per_group, d_head, take)


def _first_int(objs: Iterable[object], attrs: Sequence[str]) -> int | None:
    for obj in objs:
        for attr in attrs:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def head_counts(attention: nn.Module) -> tuple[int | None, int | None, int | None]:
    """``(n_heads, n_kv_heads, d_head)`` an attention module (or its ``config``) declares."""
    sources = [attention, getattr(attention, "config", None)]
    heads = _first_int(sources, _HEAD_ATTRS)
    kv = _first_int(sources, _KV_HEAD_ATTRS)
    if getattr(attention, "multi_query", False) and not getattr(attention, "new_decoder_architecture", False):
        kv = 1  # Falcon multi-query: one K and one V head
    d_head = _first_int(sources, _HEAD_DIM_ATTRS)
    if heads and kv is None:
        kv = heads
    return heads, kv, d_head


def fused_qk(
    name: str,
    leaf: str,
    weight: WeightFn,
    out_features: int,
    attention: nn.Module,
    bias: BiasFn | None = None,
) -> QKProjection | None:
    """Split a fused QKV weight the way its family's forward does; ``None`` when the layout is unknown.

    - ``query_key_value`` with ``3·H·d`` rows (GPT-NeoX/Pythia, BLOOM, classic Falcon):
      per head ``[q_h | k_h | v_h]``;
    - Falcon ``new_decoder_architecture`` and litgpt before its ``qkv`` (a Linear named
      ``attn`` whose config has ``n_query_groups``): per K/V group ``[q … q | k | v]``
      (H/H_kv query heads);
    - otherwise contiguous ``[Q (H·d) | K (H_kv·d) | V (H_kv·d)]`` (GPT-2 ``c_attn``, timm
      ``qkv``, ``nn.MultiheadAttention``, Phi-3 ``qkv_proj``, Falcon multi-query, litgpt's
      ``qkv`` with ``n_query_groups`` K/V heads), thirds when the module declares no head
      counts.

    A module that declares its head counts and head size but whose rows do not fit them
    (``(H + 2·H_kv)·d``) gets ``None``, not thirds: a guessed split would pair the wrong rows.

    ``bias`` (the fused bias, if any) is split the same way into ``b_q`` / ``b_k``.
    """
    b = bias or (lambda: None)
    heads, kv, d_head = head_counts(attention)
    if heads and kv and not d_head and out_features % (heads + 2 * kv) == 0:
        d_head = out_features // (heads + 2 * kv)
    if not (heads and kv and d_head) or out_features != (heads + 2 * kv) * d_head:
        if out_features % 3 or (heads and d_head):
            return None
        third = out_features // 3
        return QKProjection(
            name,
            _rows(weight, 0, third),
            _rows(weight, third, 2 * third),
            layout="thirds",
            b_q=_bias_rows(b, 0, third),
            b_k=_bias_rows(b, third, 2 * third),
        )
    if getattr(attention, "new_decoder_architecture", False) or _legacy_litgpt(leaf, attention):
        layout = "per K/V group [q..q|k|v]"
        return _grouped_qk(name, weight, b, kv, heads // kv + 2, d_head, heads, kv, layout)
    if leaf == "query_key_value" and kv == heads and not getattr(attention, "multi_query", False):
        return _grouped_qk(name, weight, b, heads, 3, d_head, heads, kv, "per head [q_h|k_h|v_h]")
    q_rows, k_rows = heads * d_head, kv * d_head
    return QKProjection(
        name,
        _rows(weight, 0, q_rows),
        _rows(weight, q_rows, q_rows + k_rows),
        heads,
        kv,
        "contiguous [Q|K|V]",
        b_q=_bias_rows(b, 0, q_rows),
        b_k=_bias_rows(b, q_rows, q_rows + k_rows),
    )


def _legacy_litgpt(leaf: str, attention: nn.Module) -> bool:
    """Whether ``leaf`` is litgpt's fused QKV from before its ``qkv`` name: a Linear ``attn``
    whose forward views its rows as ``(n_query_groups, q_per_kv + 2, head_size)``."""
    config = getattr(attention, "config", None)
    return leaf == "attn" and isinstance(getattr(config, "n_query_groups", None), int)


def _grouped_qk(
    name: str,
    weight: WeightFn,
    bias: BiasFn,
    groups: int,
    per: int,
    d_head: int,
    heads: int,
    kv: int,
    layout: str,
) -> QKProjection:
    """Rows laid out as ``groups`` of ``[q … q | k | v]`` (``per − 2`` query heads each)."""
    q_take, k_take = slice(0, per - 2), slice(per - 2, per - 1)
    return QKProjection(
        name,
        _heads_rows(weight, groups, per, d_head, q_take),
        _heads_rows(weight, groups, per, d_head, k_take),
        heads,
        kv,
        layout,
        b_q=_bias_heads_rows(bias, groups, per, d_head, q_take),
        b_k=_bias_heads_rows(bias, groups, per, d_head, k_take),
    )


def _mha_qk(full: str, mha: nn.MultiheadAttention) -> QKProjection:
    d, heads = mha.embed_dim, mha.num_heads
    b = _bias_of(mha, "in_proj_bias")  # present for separate q/k/v weights too
    b_q, b_k = _bias_rows(b, 0, d), _bias_rows(b, d, 2 * d)
    if mha.in_proj_weight is not None:
        w = _weight_of(mha, "in_proj_weight")
        return QKProjection(
            full, _rows(w, 0, d), _rows(w, d, 2 * d), heads, heads, "contiguous [Q|K|V]", b_q, b_k
        )
    w_q, w_k = _weight_of(mha, "q_proj_weight"), _weight_of(mha, "k_proj_weight")
    return QKProjection(full, w_q, w_k, heads, heads, b_q=b_q, b_k=b_k)


def _expert_weights(experts: nn.Module, prefix: str) -> list[dict[str, WeightFn]]:
    """One weight dict per expert: members of a ``ModuleList`` of expert MLPs, or slices of 3-D parameters."""
    if not isinstance(experts, (nn.ModuleList, nn.Sequential)):
        return _stacked_expert_weights(experts, prefix)
    out = []
    for child_name, child in experts.named_children():
        weights: dict[str, WeightFn] = {}
        for rel, sub in child.named_modules():
            fn = _linear_weight(sub)
            if fn is not None:
                weights[f"{prefix}.{child_name}.{rel}" if rel else f"{prefix}.{child_name}"] = fn
        out.append(weights)
    return out


def _stacked_expert_weights(experts: nn.Module, prefix: str) -> list[dict[str, WeightFn]]:
    """Experts stored as 3-D parameters ``(n_experts, out, in)`` (transformers 5 Mixtral, Qwen-MoE).

    A fused ``gate_up_proj`` is split into its gate and up halves along the
    ``2·intermediate_dim`` axis, as the model's forward ``chunk(2)`` does, so an expert
    counts the same weights a dense gated FFN does.
    """
    params = [(n, p) for n, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    inner = getattr(experts, "intermediate_dim", None)
    out = []
    for e in range(params[0][1].shape[0] if params else 0):
        weights: dict[str, WeightFn] = {}
        for pname, p in params:
            fn = _expert_slice(experts, pname, e)
            if "gate_up" in pname and isinstance(inner, int) and 2 * inner in p.shape[1:]:
                dim = 0 if p.shape[1] == 2 * inner else 1
                for half, label in enumerate(("gate", "up")):
                    weights[f"{prefix}.{pname}[{e}].{label}"] = _half(fn, half, dim)
            else:
                weights[f"{prefix}.{pname}[{e}]"] = fn
        out.append(weights)
    return out


def _expert_slice(module: nn.Module, attr: str, e: int) -> WeightFn:
    return lambda: getattr(module, attr)[e]


def _half(fn: WeightFn, half: int, dim: int) -> WeightFn:
    return lambda: fn().chunk(2, dim=dim)[half]


def describe_block(index: int, name: str, module: nn.Module, stack: str = "") -> Block:
    """Sort a block's linear maps into FFN, MoE experts, attention output and query/key projections."""
    block = Block(index, name, module, stack=stack)
    q_found: dict[str, tuple[WeightFn, BiasFn]] = {}
    k_found: dict[str, tuple[WeightFn, BiasFn]] = {}
    skip: list[str] = []  # subtrees already handled (MHA, experts, routers)
    for rel, sub in module.named_modules():
        if any(rel == s or rel.startswith(s + ".") for s in skip):
            continue
        parts = rel.split(".") if rel else []
        leaf = parts[-1].lower() if parts else ""
        full = plain_name(f"{name}.{rel}" if rel else name)
        if isinstance(sub, nn.MultiheadAttention):
            block.wo[f"{full}.out_proj"] = _weight_of(sub.out_proj, "weight")
            block.qk.append(_mha_qk(full, sub))
            skip.append(rel)
            continue
        if isinstance(getattr(sub, "experts", None), nn.Module):
            _add_experts(block, sub, full)
            skip += [f"{rel}.{c}" if rel else c for c in ("experts", *_ROUTER_NAMES)]
            continue
        weight = _linear_weight(sub)
        if weight is None:
            continue
        in_attention = any(is_attention_name(p) for p in parts[:-1])
        if in_attention or is_attention_name(leaf) or leaf in _QKV_NAMES:
            _attention_weight(block, module, parts, leaf, full, (weight, _bias_of(sub)), q_found, k_found)
        elif leaf == "gate_up_proj" and weight().shape[0] % 2 == 0:
            # fused gated FFN (Phi-3): its forward chunks [gate | up]; counted like Llama's two maps
            block.ffn[f"{full}.gate"] = _half(weight, 0, 0)
            block.ffn[f"{full}.up"] = _half(weight, 1, 0)
        else:
            block.ffn[full] = weight
    for parent, (w_q, b_q) in q_found.items():
        if parent in k_found:
            w_k, b_k = k_found[parent]
            attention = module.get_submodule(parent) if parent else module
            heads, kv, _ = head_counts(attention)
            block.qk.append(
                QKProjection(f"{name}.{parent}" if parent else name, w_q, w_k, heads, kv, b_q=b_q, b_k=b_k)
            )
    for kind, found in (
        (MISSING_WO, block.wo),
        (MISSING_QK, block.qk),
        (MISSING_FFN, block.ffn or block.experts),
    ):
        if not found:
            block.missing.append(kind)
    return block


def _add_experts(block: Block, moe: nn.Module, full: str) -> None:
    """Record the experts of an MoE module (its router is skipped by the caller)."""
    groups = _expert_weights(moe.get_submodule("experts"), f"{full}.experts")
    if groups:
        block.experts += groups
        block.notes.append(
            f"{full}: mixture of {len(groups)} experts; kappa_eff = dense FFN + max over experts "
            "of the expert's sum of kappa(W), router excluded"
        )


def _attention_weight(
    block: Block,
    module: nn.Module,
    parts: list[str],
    leaf: str,
    full: str,
    found: tuple[WeightFn, BiasFn],
    q_found: dict[str, tuple[WeightFn, BiasFn]],
    k_found: dict[str, tuple[WeightFn, BiasFn]],
) -> None:
    """File one linear map (``found``: its weight and bias getters) found under an attention module."""
    weight, bias = found
    parent = ".".join(parts[:-1])
    attention = module.get_submodule(parent) if parent else module
    if leaf == "c_attn" and isinstance(getattr(attention, "q_attn", None), nn.Module):
        # GPT-2 cross-attention: c_attn is [K | V]
        k_found[parent] = (
            lambda: weight().chunk(2, dim=0)[0],
            lambda: None if (b := bias()) is None else b.chunk(2)[0],
        )
    elif leaf in _QKV_NAMES or _legacy_litgpt(leaf, attention):
        out_features = weight().shape[0]
        proj = fused_qk(full, leaf, weight, out_features, attention, bias)
        if proj is None:
            block.warnings.append(
                f"{full}: fused QKV of {out_features} rows, layout unknown; kappa_wkwq skipped"
            )
        else:
            block.qk.append(proj)
            if proj.layout != "contiguous [Q|K|V]":
                block.notes.append(f"{full}: fused QKV split {proj.layout}")
    elif leaf in _Q_NAMES or leaf == "q_attn":
        q_found[parent] = found
    elif leaf in _K_NAMES:
        k_found[parent] = found
    elif leaf in _OUT_NAMES or parts[-2:-1] == ["output"]:
        block.wo[full] = weight


def model_blocks(model: nn.Module, patterns: Sequence[str] | None = None) -> list[Block]:
    """The blocks of ``model`` (:func:`find_blocks`), each described by :func:`describe_block`."""
    if patterns:
        found = [(name, module, name.rpartition(".")[0]) for name, module in match_blocks(model, patterns)]
    else:
        found = [(name, module, stack.name) for stack in find_stacks(model) for name, module in stack.members]
    return [
        describe_block(i, plain_name(name), module, plain_name(stack))
        for i, (name, module, stack) in enumerate(found)
    ]


# --------------------------------------------------------------------------- for the monitor
def structure_warnings(blocks: Sequence[Block]) -> list[str]:
    """One message per kind of missing weight or doubtful weight, naming the blocks.

    Meant to be emitted once by the monitor: a diagnostic whose weight is missing is
    absent from the report (and ``predictor`` must then not assume ``‖W_O‖ = 1`` silently).
    """
    out = []
    for kind, meaning in (
        (MISSING_WO, "no attention output projection W_O found: wo_norm/kappa_wo are not measured"),
        (MISSING_QK, "no query/key projections found: kappa_wkwq is not measured"),
        (MISSING_FFN, "no FFN weights found: kappa_eff is not measured"),
    ):
        names = [b.name for b in blocks if kind in b.missing]
        if names:
            out.append(f"{_names(names)}: {meaning}")
    return out + _grouped(b.warnings for b in blocks)


def structure_notes(blocks: Sequence[Block]) -> list[str]:
    """The assumptions made (fused layouts, MoE rule), one line per kind, naming the modules."""
    return _grouped(b.notes for b in blocks)


def _grouped(lists: Iterable[list[str]]) -> list[str]:
    """``"where: what"`` lines merged by ``what``."""
    by_what: dict[str, list[str]] = {}
    for items in lists:
        for item in items:
            where, _, what = item.partition(": ")
            by_what.setdefault(what, []).append(where)
    return [f"{_names(where)}: {what}" for what, where in by_what.items()]


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def unattended_blocks(blocks: Sequence[Block], attended: Iterable[int]) -> list[str]:
    """Warnings for blocks that never saw an attention call while blocks of their stack did.

    Args:
        blocks: the measured blocks.
        attended: indices of the blocks that saw at least one attention call.

    Example:
        >>> bs = [Block(i, f"h.{i}", nn.Identity(), stack="h") for i in range(3)]
        >>> unattended_blocks(bs, {0, 2})
        ['block 1 (h.1) never sees attention while 2 of 3 blocks of stack h do']
    """
    seen = set(attended)
    stacks: dict[str, list[Block]] = {}
    for b in blocks:
        stacks.setdefault(b.stack, []).append(b)
    out = []
    for stack, members in stacks.items():
        hit = sum(b.index in seen for b in members)
        if 0 < hit < len(members):
            out += [
                f"block {b.index} ({b.name}) never sees attention while {hit} of {len(members)} blocks "
                f"of stack {stack or '(root)'} do"
                for b in members
                if b.index not in seen
            ]
    return out


def moe_kappa_eff(dense: Sequence[Tensor], experts: Sequence[Sequence[Tensor]]) -> Tensor:
    """``kappa_eff`` of an FFN with experts: ``Σ κ(dense) + max_e Σ κ(expert e)``.

    A token passes through the dense weights and, per routed expert, that expert's
    weights; the worst expert bounds the amplification any token can see (the router's
    weights only choose, so they are excluded).

    Args:
        dense: κ of each dense FFN weight (shared experts included).
        experts: per expert, κ of each of its weights.

    Example:
        >>> t = torch.tensor
        >>> float(moe_kappa_eff([t(2.0)], [[t(1.0), t(3.0)], [t(5.0)]]))
        7.0
    """
    total = torch.stack(list(dense)).sum() if dense else torch.tensor(0.0, dtype=torch.float64)
    sums = [torch.stack(list(e)).sum() for e in experts if e]
    return total + (torch.stack(sums).amax() if sums else 0.0)

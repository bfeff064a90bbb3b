"""A Transformer's layout: its blocks and, inside each, the weights the diagnostics need.

Found from module names and types alone, so that hand-written models,
``torch.nn.Transformer*``, Hugging Face and torchvision/timm-style models work without
configuration.

**Blocks** (:func:`find_stacks`). A *stack* is a uniform ``nn.ModuleList`` /
``nn.Sequential`` (all members of one type) whose members contain a normalization layer.
The blocks are the members of

1. every stack whose members also contain attention (a submodule named ``*attn*`` /
   ``*attention*``, an ``nn.MultiheadAttention``, a class named ``*Attention*``, or a
   ``qkv``/``q_proj``-style projection), keeping only the **innermost** ones: a stack
   with another such stack inside its members is a container of stacks (Swin's stages,
   ``layers.i.blocks``), not a stack of blocks. All remaining stacks are measured, so an
   encoder–decoder gives its encoder's and its decoder's layers; the block index is
   global, in model (registration) order, and each :class:`Block` names its ``stack``;
2. else (no attention anywhere) the innermost stacks of the same kind without the
   attention condition (MLP-Mixer-like, residual MLPs);
3. else the longest uniform ``nn.ModuleList``.

A uniform ``nn.Sequential`` *inside* a block (an MLP, attention heads, MoE experts) is
never taken: it has no norm, or no attention, or sits outside the innermost attention
stack. Members are named by their real qualified names (``encoder.layers.encoder_layer_0``
in torchvision's ViT), so attention calls and norms are attributed to them.

**Weights** (:func:`describe_block`). Inside a block, linear maps under a name containing
``attn``/``attention`` belong to attention (the output projection gives ``W_O``, the
query/key projections give ``W_Kᵀ W_Q``), the others to the FFN (``kappa_eff``, SPEC §3).
Fused QKV weights are split by the layout of their family (:class:`QKProjection`). MoE
experts are kept apart (:attr:`Block.experts`); the router is excluded. What could not be
found is listed in :attr:`Block.missing` and worded by :func:`structure_warnings`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor, nn

_ATTENTION_WORDS = ("attn", "attention")
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
_Q_NAMES = {"q_proj", "query", "q", "wq", "to_q", "q_lin"}
_K_NAMES = {"k_proj", "key", "k", "wk", "to_k", "k_lin"}
_QKV_NAMES = {"qkv", "c_attn", "wqkv", "query_key_value", "in_proj", "qkv_proj"}
_ROUTER_NAMES = {"gate", "router"}
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
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


# --------------------------------------------------------------------------- names
#: Name segments a wrapper inserts between a module and its parent: ``torch.compile``'s
#: ``OptimizedModule`` and ``checkpoint_wrapper`` (activation checkpointing).
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module"})


def plain_name(name: str) -> str:
    """A qualified module name without the segments wrappers insert (:data:`WRAPPER_SEGMENTS`).

    Blocks, normalization layers and modules are named this way in every report, key and
    pattern match, so a compiled or checkpoint-wrapped model reads like the plain one.

    Example:
        >>> plain_name("model._orig_mod.layers.0._checkpoint_wrapped_module.mlp")
        'model.layers.0.mlp'
    """
    if "_" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


# --------------------------------------------------------------------------- patterns
@lru_cache(maxsize=256)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a block pattern: ``*`` and ``?`` stay within one dotted name segment, ``**`` spans any depth.

    ``**.`` also matches no segment at all (``**.layers.*`` matches ``layers.0``);
    ``[seq]`` / ``[!seq]`` are character classes as in ``fnmatch``. The whole name must match.

    Example:
        >>> bool(pattern_regex("h.*").match("h.0")), bool(pattern_regex("h.*").match("h.0.attn"))
        (True, False)
        >>> deep = pattern_regex("**.attn")
        >>> bool(deep.match("model.h.0.attn")), bool(deep.match("attn"))
        (True, True)
    """
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**.", i):  # any number of leading segments, none included
            out.append(r"(?:.*\.)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def match_blocks(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Modules whose qualified name matches one of ``patterns`` (:func:`pattern_regex`), in model order.

    A match inside an earlier match is dropped (a block cannot contain a block). Names are
    matched without wrapper segments (:func:`plain_name`).
    """
    regexes = [pattern_regex(p) for p in patterns]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and any(r.match(plain_name(name)) for r in regexes):
            if found and (name == found[-1][0] or name.startswith(found[-1][0] + ".")):
                continue
            found.append((name, module))
    return found


def unmatched_patterns(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The patterns that match no module of ``model`` (for the caller to reject or warn)."""
    names = [plain_name(name) for name, _ in model.named_modules() if name]
    return [p for p in patterns if not any(pattern_regex(p).match(n) for n in names)]


# --------------------------------------------------------------------------- stacks
@dataclass
class Stack:
    """A run of repeated residual layers: its qualified name and its ``(name, member)`` pairs."""

    name: str
    members: list[tuple[str, nn.Module]]


def find_stacks(model: nn.Module) -> list[Stack]:
    """The stacks of blocks of ``model`` in model order (rule in the module docstring)."""
    uniform = [
        (name, module)
        for name, module in model.named_modules()  # pre-order = registration order
        if isinstance(module, (nn.ModuleList, nn.Sequential))
        and len(module) > 0
        and len({type(child) for child in module}) == 1
    ]
    with_norm = [(n, m) for n, m in uniform if _has_norm(m[0]) and not _is_norm(m[0])]
    chosen = _innermost([(n, m) for n, m in with_norm if _has_attention(m[0])]) or _innermost(with_norm)
    if not chosen:
        lists = [(n, m) for n, m in uniform if isinstance(m, nn.ModuleList)]
        chosen = [max(lists, key=lambda nm: len(nm[1]))] if lists else []
    return [
        Stack(name, [(f"{name}.{child}" if name else child, m) for child, m in stack.named_children()])
        for name, stack in chosen
    ]


def _innermost(stacks: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop every stack that has another of ``stacks`` strictly below it."""

    def below(inner: str, outer: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    return [(n, m) for n, m in stacks if not any(below(other, n) for other, _ in stacks)]


def find_blocks(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model`` in model order.

    Args:
        model: the model.
        patterns: block patterns on qualified module names (:func:`pattern_regex`: ``*``
            within one name segment, ``**`` across segments); when given, every module
            matching one is a block. By default the members of the stacks of
            :func:`find_stacks`.

    Example:
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), num_layers=3)
        >>> [name for name, _ in find_blocks(enc)]
        ['layers.0', 'layers.1', 'layers.2']
    """
    if patterns:
        return match_blocks(model, patterns)
    return [member for stack in find_stacks(model) for member in stack.members]


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.lower().endswith(
        ("layernorm", "rmsnorm")
    )


def _has_norm(module: nn.Module) -> bool:
    return any(_is_norm(m) for m in module.modules())


def is_attention_name(name: str) -> bool:
    """Whether a module name (its last segment, or a class name) says "attention" (``attn``/``attention``).

    The one rule by which weights are filed under attention (:func:`describe_block`) and a
    block's attention module is found for mitigations.

    Example:
        >>> is_attention_name("self_attn"), is_attention_name("SelfAttention"), is_attention_name("mlp")
        (True, True, False)
    """
    lowered = name.lower()
    return any(w in lowered for w in _ATTENTION_WORDS)


def _has_attention(module: nn.Module) -> bool:
    """Whether ``module`` contains attention (by submodule name, type or projection name)."""
    for rel, sub in module.named_modules():
        if not rel:
            continue
        leaf = rel.rsplit(".", 1)[-1].lower()
        cls = type(sub).__name__.lower()
        if (
            isinstance(sub, nn.MultiheadAttention)
            or is_attention_name(leaf)
            or is_attention_name(cls)
            or leaf in _QKV_NAMES
            or leaf in _Q_NAMES
        ):
            return True
    return False


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
    - Falcon ``new_decoder_architecture``: per K/V group ``[q … q | k | v]`` (H/H_kv query heads);
    - otherwise contiguous ``[Q (H·d) | K (H_kv·d) | V (H_kv·d)]`` (GPT-2 ``c_attn``, timm
      ``qkv``, ``nn.MultiheadAttention``, Phi-3 ``qkv_proj``, Falcon multi-query), thirds when
      the module declares no head counts.

    ``bias`` (the fused bias, if any) is split the same way into ``b_q`` / ``b_k``.
    """
    b = bias or (lambda: None)
    heads, kv, d_head = head_counts(attention)
    if heads and kv and not d_head and out_features % (heads + 2 * kv) == 0:
        d_head = out_features // (heads + 2 * kv)
    if not (heads and kv and d_head) or out_features != (heads + 2 * kv) * d_head:
        if out_features % 3:
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
    if getattr(attention, "new_decoder_architecture", False):
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
    elif leaf in _QKV_NAMES:
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

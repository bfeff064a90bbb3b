"""A Transformer's layout: its blocks and, inside each, the weights the diagnostics need.

Found from module names and types alone, so that hand-written models,
``torch.nn.Transformer*`` and Hugging Face models work without configuration:
blocks are the longest uniform ``nn.ModuleList``; inside a block, linear maps under
a name containing ``attn``/``attention`` belong to attention (the output projection
gives ``W_O``, the query/key projections give ``W_Kᵀ W_Q``), the others to the FFN
(``kappa_eff``, SPEC §3).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

_ATTENTION_WORDS = ("attn", "attention")
_OUT_NAMES = {"out_proj", "o_proj", "c_proj", "proj", "out", "dense", "wo", "o", "to_out", "output"}
_Q_NAMES = {"q_proj", "query", "q", "wq", "to_q", "q_lin"}
_K_NAMES = {"k_proj", "key", "k", "wk", "to_k", "k_lin"}
_QKV_NAMES = {"qkv", "c_attn", "wqkv", "query_key_value", "in_proj", "qkv_proj"}

#: A function returning a weight as ``(out_features, in_features)`` at call time
#: (weights change during training, so they are read when measured).
WeightFn = Callable[[], Tensor]


@dataclass
class QKProjection:
    """Where one attention's query and key weights live (SPEC §8, κ(W_Kᵀ W_Q))."""

    name: str
    w_q: WeightFn
    w_k: WeightFn


@dataclass
class Block:
    """One residual block and the weights of its linear maps."""

    index: int
    name: str
    module: nn.Module
    ffn: dict[str, WeightFn] = field(default_factory=dict)
    wo: dict[str, WeightFn] = field(default_factory=dict)
    qk: list[QKProjection] = field(default_factory=list)

    def contains(self, module_name: str) -> bool:
        """Whether the module named ``module_name`` lies inside this block."""
        return module_name == self.name or module_name.startswith(self.name + ".")


def _linear_weight(module: nn.Module) -> WeightFn | None:
    """``(out, in)`` weight getter for ``nn.Linear`` and transformers' ``Conv1D`` (stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return _weight_of(module, "weight")
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), Tensor):
        return lambda: _weight_of(module, "weight")().t()
    return None


def _weight_of(module: nn.Module, attr: str) -> WeightFn:
    return lambda: getattr(module, attr)


def _chunk(fn: WeightFn, i: int, parts: int = 3) -> WeightFn:
    return lambda: fn().chunk(parts, dim=0)[i]


def find_blocks(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model`` in model order.

    Args:
        model: the model.
        patterns: ``fnmatch`` patterns on qualified module names; when given, every
            module matching one is a block. By default the repeated layers: the children
            of the longest uniform ``nn.ModuleList`` (or ``nn.Sequential``) whose members
            contain a normalization layer, else of the longest uniform ``nn.ModuleList``.

    Example:
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), num_layers=3)
        >>> [name for name, _ in find_blocks(enc)]
        ['layers.0', 'layers.1', 'layers.2']
    """
    if patterns:
        return [
            (name, module)
            for name, module in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]
    best: tuple[str, nn.Module] | None = None
    best_key: tuple[bool, int] = (False, 0)
    for name, module in model.named_modules():  # pre-order: a container before its descendants
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if isinstance(module, nn.Sequential) and not _has_norm(module[0]):
            continue  # a uniform Sequential of plain layers is not a stack of blocks
        # residual blocks contain a normalization layer; attention heads and MoE experts do not
        key = (_has_norm(module[0]), len(module))
        if best is None or key > best_key:
            best, best_key = (name, module), key
    if best is None:
        return []
    prefix = best[0] + "." if best[0] else ""
    return [(f"{prefix}{i}", child) for i, child in enumerate(best[1].children())]


def _has_norm(module: nn.Module) -> bool:
    return any(
        isinstance(m, (nn.LayerNorm, nn.RMSNorm))
        or type(m).__name__.lower().endswith(("layernorm", "rmsnorm"))
        for m in module.modules()
    )


def describe_block(index: int, name: str, module: nn.Module) -> Block:
    """Sort a block's linear maps into FFN, attention output and query/key projections."""
    block = Block(index, name, module)
    q_found: dict[str, WeightFn] = {}
    k_found: dict[str, WeightFn] = {}
    for rel, sub in module.named_modules():
        parts = rel.split(".") if rel else []
        in_attention = any(w in p.lower() for p in parts[:-1] for w in _ATTENTION_WORDS)
        leaf = parts[-1].lower() if parts else ""
        full = f"{name}.{rel}" if rel else name
        if isinstance(sub, nn.MultiheadAttention):
            block.wo[f"{full}.out_proj"] = _weight_of(sub.out_proj, "weight")
            if sub.in_proj_weight is not None:
                w = _weight_of(sub, "in_proj_weight")
                block.qk.append(QKProjection(full, _chunk(w, 0), _chunk(w, 1)))
            continue
        if any(isinstance(m, nn.MultiheadAttention) for m in _ancestors(module, rel)):
            continue
        weight = _linear_weight(sub)
        if weight is None:
            continue
        if in_attention or any(w in leaf for w in _ATTENTION_WORDS):
            parent = ".".join(parts[:-1])
            if leaf in _QKV_NAMES:
                block.qk.append(QKProjection(full, _chunk(weight, 0), _chunk(weight, 1)))
            elif leaf in _Q_NAMES:
                q_found[parent] = weight
            elif leaf in _K_NAMES:
                k_found[parent] = weight
            elif leaf in _OUT_NAMES or parts[-2:-1] == ["output"]:
                block.wo[full] = weight
        else:
            block.ffn[full] = weight
    for parent, w_q in q_found.items():
        if parent in k_found:
            block.qk.append(QKProjection(f"{name}.{parent}" if parent else name, w_q, k_found[parent]))
    return block


def _ancestors(root: nn.Module, rel: str) -> list[nn.Module]:
    """Strict ancestors of the submodule at ``rel`` below ``root`` (``root`` included)."""
    chain = [root]
    if not rel:
        return []
    node = root
    for part in rel.split(".")[:-1]:
        node = getattr(node, part)
        chain.append(node)
    return chain


def model_blocks(model: nn.Module, patterns: Sequence[str] | None = None) -> list[Block]:
    """:func:`find_blocks` followed by :func:`describe_block` for each."""
    return [describe_block(i, name, module) for i, (name, module) in enumerate(find_blocks(model, patterns))]

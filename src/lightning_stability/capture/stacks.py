"""Finding a Transformer's blocks: block patterns, and stacks of repeated residual layers.

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
   global, in model (registration) order, and each block names its ``stack``;
2. else (no attention anywhere) the innermost stacks of the same kind without the
   attention condition (MLP-Mixer-like, residual MLPs);
3. else the longest uniform ``nn.ModuleList``.

A uniform ``nn.Sequential`` *inside* a block (an MLP, attention heads, MoE experts) is
never taken: it has no norm, or no attention, or sits outside the innermost attention
stack. Members are named by their real qualified names (``encoder.layers.encoder_layer_0``
in torchvision's ViT), so attention calls and norms are attributed to them. With block
patterns (:func:`pattern_regex`), every module matching one is a block instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

_ATTENTION_WORDS = ("attn", "attention")
_Q_NAMES = {"q_proj", "query", "q", "wq", "to_q", "q_lin"}


_QKV_NAMES = {"qkv", "c_attn", "wqkv", "query_key_value", "in_proj", "qkv_proj"}


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

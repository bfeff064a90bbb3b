"""Normalization layers: which a model has, their ε, and the variance of their inputs.

Shared by :class:`~lightning_stability.StabilityMonitor` (ρ_LN, C_LN) and
:class:`~lightning_stability.LNEpsilonBump` (Algorithm 1), so both see the same
layers and the same statistics (SPEC §2, §6).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.hooks import HookContext
from lightning_stability.capture.stacks import plain_name
from lightning_stability.diagnostics.norm import token_variance

#: Attribute names under which third-party RMSNorm/LayerNorm modules keep ε.
EPS_ATTRS = ("eps", "variance_epsilon")

_NORM_NAME = re.compile(r"(rms|layer)_?norm", re.IGNORECASE)
_NOT_TOKEN_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class NormLayer:
    """One normalization layer of a model.

    Attributes:
        name: qualified module name.
        module: the module itself.
        rms: ``True`` for RMS-style layers (no centring: σ² is the mean square).
        eps_attr: the attribute holding ε, or ``None`` when ε cannot be changed
            (the module ignores its attribute, e.g. it calls ``F.layer_norm`` with a literal).
        n_dims: how many trailing axes are normalized.
    """

    name: str
    module: nn.Module
    rms: bool
    eps_attr: str | None
    n_dims: int = 1

    def eps(self, dtype: torch.dtype = torch.float32) -> float:
        """The ε used for inputs of ``dtype`` (``nn.RMSNorm(eps=None)`` means ``finfo(dtype).eps``)."""
        value = getattr(self.module, self.eps_attr or "eps", None)
        if value is None:
            return torch.finfo(dtype).eps
        return float(value)

    def set_eps(self, value: float) -> None:
        """Set ε; raises ``AttributeError`` for a layer whose ε cannot be changed."""
        if self.eps_attr is None:
            raise AttributeError(f"the ε of normalization layer {self.name!r} cannot be changed")
        setattr(self.module, self.eps_attr, float(value))


def _eps_attr(module: nn.Module) -> str | None:
    for attr in EPS_ATTRS:
        if hasattr(module, attr):
            value = getattr(module, attr)
            if value is None or isinstance(value, (int, float)):
                return attr
    return None


def _probe(module: nn.Module, eps_attr: str | None) -> tuple[bool, bool]:
    """Run a third-party norm on a test input: is it RMS-style, and does its ε attribute act?

    Centring shows as invariance to adding a constant to every feature; a working ε
    shows as a changed output when ε is made huge. Parameters and buffers are untouched.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() == 0:
        raise ValueError("no weight to size the probe")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, *weight.shape, generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base = module(x)
        shifted = module(x + 1.5)
        rms = not torch.allclose(base, shifted, rtol=1e-3, atol=1e-3)
        acts = False
        if eps_attr is not None:
            old = getattr(module, eps_attr)
            try:
                setattr(module, eps_attr, 1e4)
                acts = not torch.allclose(module(x), base, rtol=1e-3, atol=1e-3)
            finally:
                setattr(module, eps_attr, old)
    return rms, acts


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return bool(patterns) and any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def find_norms(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[NormLayer]:
    """Token normalization layers of ``model`` in model order.

    ``nn.LayerNorm`` and ``nn.RMSNorm`` are recognised by type; any other module whose
    class name ends in ``LayerNorm``/``RMSNorm`` (e.g. ``LlamaRMSNorm``, ``T5LayerNorm``)
    is probed once to learn whether it centres and whether its ``eps``/``variance_epsilon``
    attribute is really used. ``include``/``exclude`` are ``fnmatch`` patterns on names.
    Names leave out wrapper segments (``_orig_mod``…:
    :func:`~lightning_stability.capture.stacks.plain_name`).
    """
    layers: list[NormLayer] = []
    for qualified, module in model.named_modules():
        name = plain_name(qualified)
        if include and not _matches(name, include):
            continue
        if _matches(name, exclude) or isinstance(module, _NOT_TOKEN_NORMS):
            continue
        if isinstance(module, nn.LayerNorm):
            layers.append(NormLayer(name, module, False, "eps", len(module.normalized_shape)))
        elif isinstance(module, nn.RMSNorm):
            layers.append(NormLayer(name, module, True, "eps", len(module.normalized_shape)))
        elif _NORM_NAME.search(type(module).__name__) and not any(True for _ in module.children()):
            attr = _eps_attr(module)
            try:
                rms, acts = _probe(module, attr)
            except Exception:
                rms, acts = "rms" in type(module).__name__.lower(), attr is not None
            weight = getattr(module, "weight", None)
            n_dims = weight.dim() if isinstance(weight, Tensor) and weight.dim() > 0 else 1
            layers.append(NormLayer(name, module, rms, attr if acts else None, n_dims))
    return layers


@dataclass
class NormStats:
    """What one normalization layer saw during a captured forward."""

    layer: NormLayer
    d: int
    eps: float
    variances: list[Tensor] = field(default_factory=list)
    input_dtype: torch.dtype | None = None
    compute_dtype: torch.dtype | None = None

    def median_variance(self) -> Tensor:
        """Median per-token variance (mean square for RMS layers), float64, 0-d, on device."""
        return torch.cat(self.variances).median()


def token_variances(x: Tensor, n_dims: int, rms: bool) -> Tensor:
    """Per-token σ² over the last ``n_dims`` axes, flattened to ``(tokens,)``, in float64."""
    return token_variance(x.detach().reshape(-1, math.prod(x.shape[x.dim() - n_dims :])), rms=rms)


class NormCapture(HookContext):
    """Context manager recording the input variance and compute dtype of normalization layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        >>> with NormCapture(find_norms(model)) as cap:
        ...     _ = model(torch.randn(3, 4))
        >>> stats = cap.stats["1"]
        >>> stats.d, stats.eps, stats.variances[0].shape
        (8, 1e-05, torch.Size([3]))
    """

    def __init__(self, layers: Sequence[NormLayer], variances: bool = True) -> None:
        self.layers = list(layers)
        self.record_variances = variances
        self.stats: dict[str, NormStats] = {}
        super().__init__()

    def _reset(self) -> None:
        self.stats = {}

    def _install(self, stack: ExitStack) -> None:
        for layer in self.layers:
            stack.enter_context(layer.module.register_forward_pre_hook(self._pre_hook(layer)))
            stack.enter_context(layer.module.register_forward_hook(self._post_hook(layer)))

    def _pre_hook(self, layer: NormLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            stats = self.stats.get(layer.name)
            if stats is None:
                d = math.prod(x.shape[x.dim() - layer.n_dims :])
                stats = self.stats[layer.name] = NormStats(layer, d, layer.eps(x.dtype))
            stats.input_dtype = x.dtype
            if self.record_variances:
                stats.variances.append(token_variances(x, layer.n_dims, layer.rms))

        return hook

    def _post_hook(self, layer: NormLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            stats = self.stats.get(layer.name)
            if stats is not None and isinstance(out, Tensor):
                stats.compute_dtype = out.dtype

        return hook

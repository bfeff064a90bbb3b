"""The ε-bump: raise the ε of ε-dominated normalization layers by Algorithm 1 (SPEC §6), reversibly.

:class:`EpsilonBump` holds a set of normalization layers, their original and current ε, and
applies the rule of :func:`~lightning_stability.diagnostics.propose_ln_eps_from_variance` to
measured input statistics: for ``ρ_LN = σ²·d·ε_mach/ε < 1`` the candidate
``ε_new = clip(σ²·d·ε_mach/ρ*, eps_min, eps_max)`` replaces ε only if it is larger (ε never
decreases). With several ranks' statistics every rank takes the largest proposal, so all apply
the same ε. :meth:`EpsilonBump.restore` puts the originals back. Used by
:class:`~lightning_stability.LNEpsilonBump` (every norm of the model) and by
:class:`~lightning_stability.StabilityGuard` (the norms of one block).

Pure model mutation, no Lightning: measuring (one side forward) is :meth:`EpsilonBump.measure`;
combining ranks is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.capture.norms import NormCapture, NormLayer, find_norms
from lightning_stability.capture.side_forward import preserved_rng, side_forward
from lightning_stability.diagnostics import propose_ln_eps_from_variance, rho_ln_from_variance
from lightning_stability.rules.thresholds import EPS_BUMP_MAX, EPS_BUMP_MIN, EPS_BUMP_TARGET_RHO

__all__ = ["EpsilonBump", "find_changeable_norms"]


def find_changeable_norms(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> tuple[list[NormLayer], list[NormLayer]]:
    """``(changeable, unchangeable)`` normalization layers of ``model`` (found with the RNG restored)."""
    with preserved_rng():
        layers = find_norms(model, include, exclude)
    return [n for n in layers if n.eps_attr is not None], [n for n in layers if n.eps_attr is None]


def _param_dtype(layer: NormLayer) -> torch.dtype:
    for p in layer.module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class EpsilonBump:
    """Algorithm 1 on a set of normalization layers, with their original ε kept for :meth:`restore`.

    Args:
        layers: the layers it may change (their ε attribute acts).
        target_rho: ρ* in (0, 1): a bumped layer is brought to ρ_LN = ρ*.
        eps_min: lower clip of a proposed ε.
        eps_max: upper clip of a proposed ε.

    Attributes:
        original_eps: each layer's ε attribute before any bump (``None`` for ``nn.RMSNorm(eps=None)``).
        current_eps: the ε each layer trains with.
        bumped: names of the layers bumped so far.
        min_rho: the smallest ρ_LN measured so far, ``(ρ_LN, layer name, step)`` (before that step's bump).
    """

    def __init__(
        self,
        layers: Sequence[NormLayer] = (),
        target_rho: float = EPS_BUMP_TARGET_RHO,
        eps_min: float = EPS_BUMP_MIN,
        eps_max: float = EPS_BUMP_MAX,
    ) -> None:
        self.layers = list(layers)
        self.target_rho, self.eps_min, self.eps_max = float(target_rho), float(eps_min), float(eps_max)
        self.original_eps: dict[str, float | None] = {}
        self.current_eps: dict[str, float] = {}
        self.bumped: set[str] = set()
        self.min_rho: tuple[float, str, int] | None = None

    def record_originals(self) -> None:
        """Read the layers' ε from the model, except those it still holds at a value this object set."""
        for layer in self.layers:
            value = getattr(layer.module, layer.eps_attr or "eps", None)
            value = None if value is None else float(value)
            still_bumped = layer.name in self.bumped and value == self.current_eps.get(layer.name)
            if layer.name not in self.original_eps or not still_bumped:
                self.original_eps[layer.name] = value
                if not still_bumped:
                    self.bumped.discard(layer.name)
            if layer.name not in self.bumped:
                self.current_eps[layer.name] = layer.eps(_param_dtype(layer))

    def measure(
        self,
        model: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        low_precision: Callable[[], AbstractContextManager[Any]],
    ) -> Tensor:
        """One side forward in ``low_precision()``: ``(layers, 3)`` float64 rows of median σ², d, ε.

        A layer the forward did not reach has a NaN row. Raises what the forward raises.
        """
        capture = NormCapture(self.layers)
        with side_forward(model), capture, low_precision():
            model(*args, **kwargs)
        return self.table(capture, _device(model))

    def table(self, capture: NormCapture | None, device: torch.device) -> Tensor:
        """The statistics ``capture`` holds as ``(layers, 3)`` rows (``None``: all NaN, a failed forward)."""
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        medians, meta = [], []
        for layer in self.layers:
            stats = capture.stats.get(layer.name) if capture is not None else None
            if stats is None or not stats.variances:
                medians.append(nan)
                meta.append((math.nan, math.nan))
            else:
                medians.append(stats.median_variance().to(device))
                meta.append((float(stats.d), stats.eps))
        if not medians:
            return torch.zeros(0, 3, dtype=torch.float64, device=device)
        meta_t = torch.tensor(meta, dtype=torch.float64, device=device)
        return torch.cat([torch.stack(medians)[:, None], meta_t], 1)

    def apply(
        self, ranks: Sequence[Sequence[Sequence[float]]], eps_mach: float, step: int
    ) -> dict[str, float]:
        """Algorithm 1 on every rank's ``(layers, 3)`` table; every layer takes its largest proposal.

        Returns:
            ``{layer name: new ε}`` for the layers whose ε rose.
        """
        changed: dict[str, float] = {}
        for j, layer in enumerate(self.layers):
            proposals = []
            eps = math.nan
            for rows in ranks:
                var, d, eps_r = rows[j]
                if math.isfinite(var) and math.isfinite(eps_r) and eps_r > 0 and d > 0:
                    eps = eps_r
                    rho = float(rho_ln_from_variance(var, int(d), eps_r, eps_mach))
                    if self.min_rho is None or rho < self.min_rho[0]:
                        self.min_rho = (rho, layer.name, step)
                    proposals.append(
                        propose_ln_eps_from_variance(
                            var, int(d), eps_r, eps_mach, self.target_rho, self.eps_min, self.eps_max
                        )
                    )
            if not proposals:
                continue
            new = max(proposals)
            if new > eps:
                layer.set_eps(new)
                self.current_eps[layer.name] = new
                self.bumped.add(layer.name)
                changed[layer.name] = new
            elif layer.name not in self.bumped:
                self.current_eps[layer.name] = eps
        return changed

    def restore(self) -> None:
        """Put the original ε back into every bumped layer (idempotent)."""
        for layer in self.layers:
            if layer.name in self.bumped and layer.name in self.original_eps and layer.eps_attr is not None:
                setattr(layer.module, layer.eps_attr, self.original_eps[layer.name])

    def state_dict(self) -> dict[str, Any]:
        """Originals, current values and bumped layers, by layer name."""
        return {
            "original_eps": dict(self.original_eps),
            "current_eps": dict(self.current_eps),
            "bumped": sorted(self.bumped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the state's originals and put its bumped ε values into the model."""
        originals = state.get("original_eps", {})
        current = state.get("current_eps", {})
        bumped = set(state.get("bumped", ()))
        for layer in self.layers:
            if layer.name in originals:
                value = originals[layer.name]
                self.original_eps[layer.name] = None if value is None else float(value)
            if layer.name in bumped and layer.name in current:
                layer.set_eps(float(current[layer.name]))
                self.current_eps[layer.name] = float(current[layer.name])
                self.bumped.add(layer.name)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")

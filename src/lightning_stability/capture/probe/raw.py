"""The raw statistics of one measurement, still on the device, keyed by :class:`RawKey` records.

Each key's cross-rank reduction is its metric row's (or raw statistic's): :attr:`RawKey.ranks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_stability.metrics import RankOp, RawKey

#: How each raw statistic is combined across ranks (declared in :mod:`lightning_stability.metrics`).
ReduceOp = RankOp


@dataclass
class RawMeasurement:
    """Raw statistics of one sampled step, still on the device.

    Attributes:
        values: float64 0-d tensors by :class:`RawKey` (``RawKey("kappa_v", 3)``,
            ``RawKey("err_sq", 0, metric="r_local")``, ``RawKey("variance", module="h.0.ln_1")``…);
            each key's cross-rank reduction is ``key.ranks``.
        dtype: the low-precision dtype the low-precision pass really used.
        attention_calls: attention evaluations seen in the FP32 pass.
        norm_dtypes: per normalization layer, the dtype it computed in during the low-precision pass.
        residual_gains: per block ``‖J_f‖₂`` when estimated (host floats).
        norm_meta: per normalization layer, ``(d, ε)`` as training uses them.
        attended: indices of the blocks that saw at least one attention call (exact pass).
        fp8_unquantized: FP8 passes: linear layers left out of FP8 (their own ``forward``, or a
            weight their parent uses directly), by module name.
    """

    values: dict[RawKey, Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    attention_calls: int = 0
    norm_dtypes: dict[str, str] = field(default_factory=dict)
    residual_gains: dict[int, float] = field(default_factory=dict)
    norm_meta: dict[str, tuple[int, float]] = field(default_factory=dict)
    attended: set[int] = field(default_factory=set)
    fp8_unquantized: list[str] = field(default_factory=list)

    def put(self, key: RawKey, value: Tensor) -> None:
        """Keep ``value`` (any 0-d or one-element tensor) under ``key``, as float64."""
        self.values[key] = value.detach().reshape(()).to(torch.float64)

    def flat(self) -> tuple[list[RawKey], Tensor]:
        """Keys and one float64 vector of all values (one transfer moves it to the host)."""
        keys = list(self.values)
        if not keys:
            return keys, torch.zeros(0, dtype=torch.float64)
        return keys, torch.stack([self.values[k] for k in keys])

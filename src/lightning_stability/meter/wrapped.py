"""The module a measurement runs: a model as training wrapped it, unwrapped.

Fabric's ``fabric.setup(model)`` returns a ``_FabricModule`` whose forward enters the precision's
autocast and goes through the strategy's wrapper (``DistributedDataParallel``): measured as it
is, the exact FP32 pass would run in that autocast too. The measurement runs the original module
instead (under FSDP2 or tensor parallelism that module is the sharded one), and the low precision
comes from the ``precision`` argument (``fabric.autocast`` for Fabric's own).
"""

from __future__ import annotations

from torch import nn

__all__ = ["measured_module"]


def measured_module(model: nn.Module) -> nn.Module:
    """``model`` itself, or the original module of a Fabric-wrapped model.

    Example:
        >>> from lightning.fabric import Fabric
        >>> layer = nn.Linear(2, 2)
        >>> wrapped = Fabric(accelerator="cpu", devices=1).setup_module(layer)
        >>> measured_module(wrapped) is layer, measured_module(layer) is layer
        (True, True)
    """
    from lightning.fabric.wrappers import _FabricModule

    if isinstance(model, _FabricModule):
        module: nn.Module = model.module
        return module
    return model

"""What one call dispatches, counted by ``TorchDispatchMode``s: live tensor bytes and host syncs.

``_AllocTracker`` stands in for the CUDA allocator's peak on CPU (the bytes of every storage a
dispatched op allocates, while it is alive); ``host_syncs`` counts the ops that would make the
host wait for a GPU. Shared by the benchmarks beside this file (``bench_overhead``,
``bench_scale``, ``bench_compiled``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _AllocTracker(TorchDispatchMode):
    """Live bytes of storages allocated by ops under the mode (peak kept); CPU memory stand-in."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[Any]] = {}  # storage ptr -> [bytes, tensor count]
        self._seen: set[int] = set()
        self._keep: dict[int, weakref.ref[torch.Tensor]] = {}

    def _release(self, ptr: int, key: int) -> None:
        self._keep.pop(key, None)
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def _track(self, t: torch.Tensor, input_ptrs: set[int]) -> None:
        try:
            storage = t.untyped_storage()
        except Exception:
            return
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        if ptr not in self._refs:
            if ptr in input_ptrs:
                return  # a view of something allocated before the measurement
            self._refs[ptr] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        key = id(t)
        if key in self._keep and self._keep[key]() is t:
            return
        self._refs[ptr][1] += 1
        self._keep[key] = weakref.ref(t, lambda _r, p=ptr, k=key: self._release(p, k))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        input_ptrs = set()
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                with suppress(Exception):
                    input_ptrs.add(a.untyped_storage().data_ptr())
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self._track(o, input_ptrs)
        return out


#: Ops that make the host wait for the device on CUDA: a value read back (``.item()``, ``bool()``,
#: ``allclose``, ``equal``), an output whose size depends on the data (``nonzero``, boolean
#: indexing, ``masked_select``, ``repeat_interleave`` without ``output_size``), and the dense
#: solvers, which read their LAPACK-style ``info`` back to raise on failure.
_SYNC_OPS = {
    "aten._local_scalar_dense": "value read back (.item(), bool(), allclose)",
    "aten.equal": "value read back (.item(), bool(), allclose)",
    "aten.is_nonzero": "value read back (.item(), bool(), allclose)",
    "aten.nonzero": "data-dependent size (nonzero, boolean index)",
    "aten.masked_select": "data-dependent size (nonzero, boolean index)",
    "aten.repeat_interleave": "data-dependent size (nonzero, boolean index)",
    "aten._linalg_eigh": "dense solver (eigvalsh/svdvals: info check)",
    "aten._linalg_svd": "dense solver (eigvalsh/svdvals: info check)",
    "aten.linalg_qr": "dense solver (eigvalsh/svdvals: info check)",
}


class _SyncCounter(TorchDispatchMode):
    """Counts the ops of ``_SYNC_OPS`` (and boolean-mask indexing) dispatched under the mode.

    On CPU nothing waits, but the same calls on CUDA each stall the host until the device has
    caught up: this is the count a GPU run would pay, measured where no GPU is available. The
    one explicit device-to-host transfer of the step (``.cpu().tolist()`` of the reduced
    statistics) does not dispatch on a CPU tensor and is not counted here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.ops = 0  # every dispatched op: about one kernel launch each on CUDA

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        name = str(func.overloadpacket)
        kind = _SYNC_OPS.get(name)
        if kind is None and name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                kind = _SYNC_OPS["aten.nonzero"]
        if kind is not None:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable[[], Any]) -> dict[str, int]:
    """Per kind, the number of host-syncing ops one call of ``fn`` dispatches (see ``_SyncCounter``),
    and under ``"ops"`` the number of ops it dispatches in all (≈ kernel launches on CUDA)."""
    counter = _SyncCounter()
    with counter:
        fn()
    return {**dict(sorted(counter.counts.items())), "ops": counter.ops}

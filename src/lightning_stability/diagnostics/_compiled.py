"""Compiled kernels for the diagnostics' chains of small ops: one place decides compile or eager.

The diagnostics are chains of many small tensor ops (row statistics, rigorous bounds, a
fixed number of Newton steps); run eagerly, each op costs its dispatch (~2–3 µs on CPU, one
kernel launch on a GPU), which at attention sizes of ~64 tokens is most of their time.
:class:`Kernel` wraps such a chain (a pure function of tensors with fixed control flow) with
``torch.compile`` (inductor: C++/OpenMP on CPU, Triton on GPU) and decides, per call, whether
the compiled kernel runs or the caller takes its eager path:

* **Mode** — :func:`set_compile_mode` or the environment variable
  ``LIGHTNING_STABILITY_COMPILE``: ``"auto"`` (default), ``"on"`` or ``"off"``. ``"on"``
  compiles at the first call; ``"off"`` never compiles. ``"auto"`` compiles a kernel once its
  eager path has taken :data:`AUTO_EAGER_SECONDS` of this process's time: compiling costs
  seconds (inductor's on-disk cache warm) to a minute or more (cold, on a busy 2-core CPU)
  per graph, repaid only by a run that spends real time in the diagnostics (dense
  monitoring, long sequences); a run sampled every 50 steps never pays it.
* **Where compiling is impossible** the eager path runs and a warning says once why:
  ``TORCH_COMPILE_DISABLE``/``torch._dynamo.config.disable``, a Python that dynamo does not
  support, no C++ compiler (CPU), no Triton (GPU), an inductor error on a kernel (that kernel
  only), a kernel past :data:`MAX_COMPILES` shapes.
* **Shapes** compile with dynamic sizes (``dynamic=True``, no duck sizing): one graph serves
  every size, so a run compiles each kernel once per (device, dtype, input layout, inference
  mode or not); kernels run without grad (grad mode would be one more guard). :func:`compile_stats`
  counts the graphs compiled per kernel and the seconds spent compiling them.
* **The user's model is never touched.** The monitor's own forwards run under
  ``torch.compiler.set_stance("force_eager")`` (its hooks must not recompile a user's
  compiled model); a kernel call overrides that stance for its own frame only (the previous
  stance is restored on return), so the diagnostics compile and run compiled inside it while
  the user's compiled modules stay eager and are never recompiled.

Values are unchanged by design: a kernel computes the same rigorous bounds and the same exact
float64 solve as the eager path (both paths are tested against float64 references).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

__all__ = [
    "AUTO_EAGER_SECONDS",
    "MAX_COMPILES",
    "Kernel",
    "compile_mode",
    "compile_stats",
    "constant",
    "set_compile_mode",
]

#: The environment variable read for the default mode (``auto``/``on``/``off``, or ``1``/``0``).
ENV = "LIGHTNING_STABILITY_COMPILE"
#: In ``"auto"`` mode, a kernel compiles once its eager path has taken this many seconds.
AUTO_EAGER_SECONDS = 5.0
#: Graphs a kernel may compile (new layouts or specialised sizes); past it the eager path runs.
MAX_COMPILES = 16

_MODES = {"auto": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off", "false": "off"}
_LOCK = threading.Lock()
_state: dict[str, Any] = {"mode": None, "warned": set()}


def _parse(value: str | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = _MODES.get(str(value).strip().lower())
    if mode is None:
        raise ValueError(f"compile mode must be one of 'auto', 'on', 'off' (or a bool), got {value!r}")
    return mode


def compile_mode() -> str:
    """The mode in force: ``"auto"``, ``"on"`` or ``"off"`` (see the module docstring)."""
    mode = _state["mode"]
    if mode is None:
        mode = _parse(os.environ.get(ENV, "auto") or "auto")
        _state["mode"] = mode
    return str(mode)


def set_compile_mode(mode: str | bool | None) -> None:
    """Set the mode for this process: ``"auto"``, ``"on"``/``True``, ``"off"``/``False``, or
    ``None`` (read ``LIGHTNING_STABILITY_COMPILE`` again).

    Raises:
        ValueError: On any other value.
    """
    _state["mode"] = None if mode is None else _parse(mode)


@contextmanager
def forced_mode(mode: str | bool) -> Any:
    """Run a block under ``mode`` (tests and benchmarks), restoring the previous setting."""
    before = _state["mode"]
    set_compile_mode(mode)
    try:
        yield
    finally:
        _state["mode"] = before


def _warn_once(key: str, message: str) -> None:
    with _LOCK:
        if key in _state["warned"]:
            return
        _state["warned"].add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def unavailable(device: torch.device) -> str | None:
    """Why kernels cannot be compiled for ``device`` in this process (``None``: they can)."""
    import torch._dynamo

    if os.environ.get("TORCH_COMPILE_DISABLE", "").strip() not in ("", "0") or torch._dynamo.config.disable:
        return "torch.compile is disabled (TORCH_COMPILE_DISABLE / torch._dynamo.config.disable)"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if device.type == "cpu":
        return None if _cxx() else "no C++ compiler found (inductor needs one on CPU: set CXX or install g++)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor needs it on CUDA)"
    return f"compiled kernels are only used on CPU and CUDA, not {device.type}"


def _cxx() -> bool:
    cached = _state.get("cxx")
    if cached is None:
        from torch._inductor import config

        names = [
            os.environ.get("CXX", ""),
            getattr(config.cpp, "cxx", (None, "g++"))[1] or "g++",
            "g++",
            "clang++",
        ]
        cached = any(n and shutil.which(n) for n in names)
        _state["cxx"] = cached
    return bool(cached)


@dataclass
class _Stats:
    calls: int = 0
    eager_s: float = 0.0
    compiles: int = 0
    seconds: float = 0.0
    first_call_s: float | None = None
    broken: str | None = None
    per_compile_s: list[float] = field(default_factory=list)


_REGISTRY: dict[str, Kernel] = {}


class Kernel:
    """A chain of tensor ops compiled on demand; see the module docstring for the rules.

    Args:
        fn: A pure function of tensors (and static Python values) with no data-dependent
            control flow: it must trace into one graph (``fullgraph=True``).
        name: The kernel's name in warnings and :func:`compile_stats`.
        options: Inductor options for this kernel only (``torch.compile(options=...)``).
    """

    def __init__(self, fn: Callable[..., Any], name: str, options: dict[str, Any] | None = None) -> None:
        self.fn, self.name, self.options = fn, name, dict(options or {})
        self.stats = _Stats()
        self._compiled: Callable[..., Any] | None = None
        self._compiling = False
        _REGISTRY[name] = self

    def wanted(self, device: torch.device) -> bool:
        """Whether the compiled kernel should run for a call on ``device`` (counts the call).

        False (take the eager path, timed by :meth:`eager`) when the mode is ``"off"``, in
        ``"auto"`` before the eager path has taken :data:`AUTO_EAGER_SECONDS`, inside a
        ``torch.compile`` trace or a ``TorchDispatchMode`` (fake tensors, op counters: dynamo
        compiles no frame there), or where compiling is impossible (warned once, with the reason).
        """
        mode = compile_mode()
        self.stats.calls += 1
        if mode == "off" or self.stats.broken is not None or torch.compiler.is_compiling():
            return False
        if torch._C._len_torch_dispatch_stack() > 0:  # a dispatch mode (fake tensors, op counters)
            return False
        if mode == "auto" and self._compiled is None and self.stats.eager_s < AUTO_EAGER_SECONDS:
            return False
        reason = unavailable(device)
        if reason is not None:
            _warn_once(
                f"unavailable:{device.type}",
                f"lightning-stability: the diagnostics run eagerly (slower, same values): {reason}. "
                f"Set {ENV}=off to silence this.",
            )
            return False
        return True

    @contextmanager
    def eager(self) -> Any:
        """Time a run of the eager path this kernel replaces (for ``"auto"``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats.eager_s += time.perf_counter() - t0

    def __call__(self, *args: Any) -> Any:
        """Run the compiled kernel; ``None`` when it could not be compiled (warned once: the
        caller then takes its eager path)."""
        import torch._dynamo

        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True, backend=self._backend)
        t0 = time.perf_counter()
        before = self.stats.compiles
        try:
            # The monitor's forwards force eager for the user's model; this frame compiles.
            # No duck sizing: equal sizes in the first call (e.g. 64 heads of 64 tokens) must not
            # become one symbol, or the next shape recompiles.
            # Dynamo's own recompile limit (8 by default, per function) is raised to ours for
            # this frame only; grad mode is a guard, so the kernels always run without grad.
            with (
                torch.no_grad(),
                torch.compiler.set_stance("default"),
                fx_config.patch(use_duck_shape=False),  # type: ignore[attr-defined]
                torch._dynamo.config.patch(recompile_limit=MAX_COMPILES + 1),
            ):
                out = self._compiled(*args)
        except Exception as err:  # an inductor/dynamo failure: this kernel runs eagerly from now on
            self.stats.broken = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            _warn_once(
                f"broken:{self.name}",
                f"lightning-stability: compiling the diagnostics kernel '{self.name}' failed, it runs "
                f"eagerly from now on (same values): {self.stats.broken}",
            )
            return None
        if self.stats.compiles > before:
            spent = time.perf_counter() - t0
            self.stats.per_compile_s.append(spent)
            if self.stats.first_call_s is None:
                self.stats.first_call_s = spent
            if self.stats.compiles >= MAX_COMPILES:
                self.stats.broken = f"{MAX_COMPILES} graphs compiled (too many input layouts or sizes)"
                _warn_once(
                    f"limit:{self.name}",
                    f"lightning-stability: the diagnostics kernel '{self.name}' compiled {MAX_COMPILES} "
                    "graphs; new shapes run eagerly from now on (same values)",
                )
        return out

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        t0 = time.perf_counter()
        compiled = compile_fx(gm, example_inputs, config_patches=self.options)
        self.stats.compiles += 1
        self.stats.seconds += time.perf_counter() - t0
        return compiled  # type: ignore[return-value]


_CONSTANTS: dict[tuple[float, torch.dtype, torch.device, bool], Tensor] = {}


def constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a cached 0-d tensor: a kernel's numeric parameter passed as a tensor is an
    input of its graph (a Python float would be baked in, one graph per value)."""
    key = (float(value), dtype, device, torch.is_inference_mode_enabled())
    out = _CONSTANTS.get(key)
    if out is None:
        out = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return out


def compile_stats() -> dict[str, dict[str, Any]]:
    """Per kernel: calls asked, seconds in its eager path, graphs compiled, seconds in inductor,
    the first compiling call's wall seconds (tracing included), each compiling call's seconds,
    and why it runs eagerly (if so)."""
    return {
        name: {
            "calls": k.stats.calls,
            "eager_s": k.stats.eager_s,
            "compiles": k.stats.compiles,
            "inductor_s": k.stats.seconds,
            "first_call_s": k.stats.first_call_s,
            "compiling_calls_s": list(k.stats.per_compile_s),
            "eager_because": k.stats.broken,
        }
        for name, k in _REGISTRY.items()
    }

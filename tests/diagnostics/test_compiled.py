"""The compiled diagnostics kernels: one place decides compile or eager, falls back once with a
reason, compiles inside the monitor's force-eager stance without recompiling a user's compiled
model, and keeps the values of the eager path (the float64-reference tests of
``test_softmax_solver.py`` run on both paths through the ``path`` fixture)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import lightning_stability.diagnostics.softmax_jacobian as jac
import lightning_stability.diagnostics.softmax_solver as solver
from lightning_stability.diagnostics import _compiled, attention_diagnostics, kappa_softmax
from lightning_stability.diagnostics._compiled import Kernel, compile_stats, forced_mode

F64 = torch.float64


@pytest.fixture()
def fresh_warnings() -> Iterator[None]:
    """Forget which reasons were already warned (each is warned once per process)."""
    before = set(_compiled._state["warned"])
    _compiled._state["warned"].clear()
    yield
    _compiled._state["warned"] = before


def needs_compiler() -> None:
    reason = _compiled.unavailable(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def test_mode_from_environment_and_setter(monkeypatch: pytest.MonkeyPatch) -> None:
    with forced_mode("auto"):
        for value, mode in (("1", "on"), ("off", "off"), ("AUTO", "auto"), ("false", "off")):
            monkeypatch.setenv(_compiled.ENV, value)
            _compiled.set_compile_mode(None)  # read the environment again
            assert _compiled.compile_mode() == mode
        _compiled.set_compile_mode(True)
        assert _compiled.compile_mode() == "on"
        with pytest.raises(ValueError, match="'auto', 'on', 'off'"):
            _compiled.set_compile_mode("sometimes")


def test_auto_compiles_only_after_the_eager_path_took_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel(lambda x: x + 1, "test_auto")
    monkeypatch.setattr(_compiled, "AUTO_EAGER_SECONDS", 0.05)
    with forced_mode("auto"):
        assert not kernel.wanted(torch.device("cpu"))
        with kernel.eager():
            pass
        assert not kernel.wanted(torch.device("cpu"))  # far below the budget
        kernel.stats.eager_s = 0.06
        assert kernel.wanted(torch.device("cpu")) == (_compiled.unavailable(torch.device("cpu")) is None)
    with forced_mode("off"):
        assert not kernel.wanted(torch.device("cpu"))


@pytest.mark.usefixtures("fresh_warnings")
def test_compile_disabled_or_no_compiler_falls_back_once_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, 9, generator=g) * 3
    with forced_mode("off"):
        ref = kappa_softmax(s)
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    with forced_mode("on"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(kappa_softmax(s), ref)
        assert torch.equal(kappa_softmax(s), ref)
    msgs = [str(w.message) for w in seen if "run eagerly" in str(w.message)]
    assert len(msgs) == 1 and "TORCH_COMPILE_DISABLE" in msgs[0]
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setitem(_compiled._state, "cxx", False)
    assert "no C++ compiler" in str(_compiled.unavailable(torch.device("cpu")))
    assert "Triton" in str(_compiled.unavailable(torch.device("cuda"))) or torch.cuda.is_available()


@pytest.mark.usefixtures("fresh_warnings")
def test_a_kernel_that_cannot_compile_runs_eagerly_and_says_why() -> None:
    def data_dependent(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if bool(x.sum() > 0) else x - 1  # a graph break: fullgraph refuses it

    kernel = Kernel(data_dependent, "test_broken")
    with forced_mode("on"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert kernel(torch.ones(3)) is None
        assert not kernel.wanted(torch.device("cpu"))  # eager from now on
    msgs = [str(w.message) for w in seen if "test_broken" in str(w.message)]
    assert len(msgs) == 1 and "eagerly from now on" in msgs[0]
    assert compile_stats()["test_broken"]["eager_because"]


def test_newton_continuation_when_the_fixed_steps_do_not_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused solve takes a fixed number of steps; too few leave rows unconverged, which the
    # eager continuation finishes: the same values as the eager solve (run here without compiling).
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 30, generator=g, dtype=F64) * 6
    rows[0, 5:] = -torch.inf  # masked keys
    monkeypatch.setattr(jac, "_FUSED_NEWTON", 1)
    _, lam, converged = jac._exact_rows_fused(rows)
    assert not bool(converged)
    got = jac._exact_rows_continue(rows, lam)
    ref = jac._exact_rows(rows)
    assert torch.allclose(got, ref, rtol=1e-13, atol=0)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x + self.mlp(x)


def test_compiled_diagnostics_inside_force_eager_never_recompile_the_users_model() -> None:
    needs_compiler()
    from lightning_stability.capture.probe import StabilityProbe

    torch.manual_seed(0)
    model = nn.Sequential(_Block(16, 2), _Block(16, 2))
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(1)
        return gm.forward  # the user's model: eager graphs, counted

    compiled_model = torch.compile(model, backend=counting_backend)
    x = torch.randn(4, 9, 16)
    with torch.no_grad():
        expected = compiled_model(x)
    assert len(graphs) == 1
    calls_before = compile_stats()["softmax_rows"]["calls"]
    probe = StabilityProbe(compiled_model)
    with forced_mode("on"):
        raw = probe.measure((x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        with torch.compiler.set_stance("force_eager"):  # the monitor's stance: kernels still compile
            d = attention_diagnostics(*(torch.randn(4, 2, 9, 8) for _ in range(3)))
    stats = compile_stats()["softmax_rows"]
    assert stats["calls"] > calls_before and stats["compiles"] >= 1 and stats["eager_because"] is None
    assert torch.isfinite(d.kappa_softmax).all()
    with forced_mode("off"):
        ref = StabilityProbe(compiled_model).measure(
            (x,), {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        )
    keys, vals = raw.flat()
    ref_keys, ref_vals = ref.flat()
    assert keys == ref_keys
    close = torch.isclose(vals.to(F64), ref_vals.to(F64), rtol=1e-6, atol=0) | (
        vals.isnan() & ref_vals.isnan()
    )
    assert bool(close.all()), [k for k, c in zip(keys, close.tolist(), strict=True) if not c]
    with torch.no_grad():
        assert torch.equal(compiled_model(x), expected)
    assert len(graphs) == 1  # the user's compiled model was never recompiled


def test_compiled_kernels_equal_the_eager_path_and_count_their_graphs() -> None:
    needs_compiler()
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 4, 10, 12, generator=g) * 5
    s[0, 0, 2] = 0.0  # a zero row
    s[1, 2, 3, :2] = 30.0  # an exact top-2 tie
    mask = torch.rand(3, 4, 10, 12, generator=g) > 0.3
    mask[2, 1] = False  # a fully masked head
    q, k, v = (torch.randn(3, 4, n, 6, generator=g) for n in (10, 12, 12))
    for m in (None, mask):
        with forced_mode("off"):
            ref, dref = kappa_softmax(s, m), attention_diagnostics(q, k, v, m)
        with forced_mode("on"):
            got, dgot = kappa_softmax(s, m), attention_diagnostics(q, k, v, m)
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)
        for name in ("kappa_softmax", "kappa_score", "kappa_v", "logit_max"):
            assert torch.allclose(getattr(dgot, name), getattr(dref, name), rtol=1e-12, atol=0), name
        assert torch.allclose(dgot.entropy, dref.entropy, rtol=2e-6, atol=1e-12)
    stats = compile_stats()
    # one graph per input layout (here: no mask, a full mask), whatever the sizes
    assert 1 <= stats["softmax_rows"]["compiles"] <= _compiled.MAX_COMPILES
    with forced_mode("on"):
        before = compile_stats()["softmax_rows"]["compiles"]
        kappa_softmax(torch.randn(5, 7, 17, 23, generator=g), torch.rand(5, 7, 17, 23, generator=g) > 0.2)
        q2, k2, v2 = (torch.randn(5, 3, n, 7, generator=g) for n in (9, 13, 13))
        attention_diagnostics(q2, k2, v2, torch.rand(5, 3, 9, 13, generator=g) > 0.2)
        assert compile_stats()["softmax_rows"]["compiles"] == before  # new sizes: no new graph
    assert solver._ROWS.stats.first_call_s is not None


@pytest.mark.usefixtures("fresh_warnings")
def test_no_cxx_compiler_runs_the_same_values_eagerly_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 2, 9, 11, generator=g) * 4
    q, k, v = (torch.randn(3, 2, n, 5, generator=g) for n in (9, 11, 11))
    with forced_mode("off"):
        ref, dref = kappa_softmax(s), attention_diagnostics(q, k, v)
    monkeypatch.setitem(_compiled._state, "cxx", False)  # as if no g++/clang++ were on the PATH
    calls = solver._ROWS.stats.calls
    with forced_mode("on"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(kappa_softmax(s), ref)
            d = attention_diagnostics(q, k, v)
            assert torch.equal(d.kappa_softmax, dref.kappa_softmax) and torch.equal(d.entropy, dref.entropy)
    assert solver._ROWS.stats.calls == calls + 6  # asked every time, refused every time
    msgs = [str(w.message) for w in seen if "run eagerly" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and _compiled.ENV in msgs[0]


class _CountingKernel(Kernel):
    """A kernel whose graphs are counted and run as traced (no inductor: the count is the test)."""

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        self.stats.compiles += 1
        return gm.forward


@pytest.mark.usefixtures("fresh_warnings")
def test_recompiles_are_bounded_then_new_shapes_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compiled, "MAX_COMPILES", 3)
    kernel = _CountingKernel(lambda x: (x * 2).sum(-1), "test_bounded")
    del _compiled._REGISTRY["test_bounded"]  # not a diagnostics kernel: out of compile_stats()
    with forced_mode("on"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for n in (5, 9, 17, 33):  # dynamic sizes: one graph for every length
            assert kernel.wanted(torch.device("cpu"))
            assert torch.equal(kernel(torch.ones(4, n)), torch.full((4,), 2.0 * n))
        assert kernel.stats.compiles == 1
        for dtype in (torch.float64, torch.bfloat16):  # each dtype is a graph of its own
            assert kernel(torch.ones(3, 7, dtype=dtype)) is not None
        assert kernel.stats.compiles == 3  # the limit: no further shape compiles
        assert not kernel.wanted(torch.device("cpu"))
    msgs = [str(w.message) for w in seen if "test_bounded" in str(w.message)]
    assert len(msgs) == 1 and "3 graphs" in msgs[0]
    assert kernel.stats.broken is not None and "3 graphs" in kernel.stats.broken

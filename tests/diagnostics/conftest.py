"""Shared fixtures and float64 references for the diagnostics tests.

The references are written out row by row in float64 (eigen-solver, plain softmax), so they
share no code with the functions they check.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run single-threaded: the machine is shared and multi-threaded LAPACK calls on it can stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["eager", "compiled"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on the eager path and on the compiled kernels (skipped where they cannot be
    compiled). The compiled graphs are kept by the kernels for the whole session, so every test
    of one input layout shares them."""
    from lightning_stability.diagnostics import _compiled

    if request.param == "compiled":
        reason = _compiled.unavailable(torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
    with _compiled.forced_mode("on" if request.param == "compiled" else "off"):
        yield str(request.param)
    if request.param == "compiled":  # the compiled path really ran (not a silent eager fallback)
        stats = _compiled.compile_stats()
        assert all(s["eager_because"] is None for s in stats.values() if s["compiles"]), stats


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eig_ref(p: torch.Tensor) -> torch.Tensor:
    """``λmax(Diag(p) − ppᵀ)`` by float64 ``eigvalsh``, row-wise."""
    # Entries below 1e-150 change λ by < 1e-150 but make LAPACK crawl through subnormals.
    p = p.to(F64)
    p = torch.where(p < 1e-150, 0.0, p)
    j = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.linalg.eigvalsh(j)[..., -1]


def ksm_ref(s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """max_i ‖J(P_i)‖₂‖S_i‖/‖P_i‖ written out with loops (attended keys only)."""
    s = s.to(F64)
    lead = s.shape[:-2]
    flat = s.reshape(-1, *s.shape[-2:])
    m = None if mask is None else mask.expand(s.shape).reshape(-1, *s.shape[-2:])
    out = torch.zeros(flat.shape[0], dtype=F64)
    for g in range(flat.shape[0]):
        best = 0.0
        for i in range(flat.shape[1]):
            row = flat[g, i] if m is None else flat[g, i][m[g, i]]
            if row.numel() == 0:
                continue
            p = torch.softmax(row, -1)
            best = max(best, eig_ref(p).item() * row.norm().item() / p.norm().item())
        out[g] = best
    return out.reshape(lead)


def entropy_ref(s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean row entropy over rows with a kept key, float64, written out per row."""
    s = s.to(F64)
    flat = s.reshape(-1, *s.shape[-2:])
    m = None if mask is None else mask.expand(s.shape).reshape(flat.shape)
    out = torch.zeros(flat.shape[0], dtype=F64)
    for g in range(flat.shape[0]):
        hs = []
        for i in range(flat.shape[1]):
            row = flat[g, i] if m is None else flat[g, i][m[g, i]]
            if row.numel():
                p = torch.softmax(row, -1)
                hs.append(-torch.special.xlogy(p, p).sum().item())
        out[g] = sum(hs) / len(hs) if hs else 0.0
    return out.reshape(s.shape[:-2])

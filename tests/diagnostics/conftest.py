"""Shared fixtures for the diagnostics tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


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

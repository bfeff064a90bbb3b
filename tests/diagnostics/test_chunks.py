"""The reused scratch buffers of the attention diagnostics."""

from __future__ import annotations

import torch

from lightning_stability.diagnostics import (
    attention_diagnostics,
    kappa_softmax,
)


def test_scratch_buffers_survive_inference_mode_and_another_default_device() -> None:
    """A buffer first made under inference mode is not reused outside it (an inference tensor
    cannot be written there), and buffers live on the scores' device, not the default one.
    Run in a fresh thread: the scratch cache is per thread, so its first buffers are made here."""
    import threading

    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 64, 512, generator=g)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g) for _ in range(3))
    expected = kappa_softmax(s), attention_diagnostics(q, k, v).kappa_softmax
    got: list[object] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                inside = kappa_softmax(s), attention_diagnostics(q, k, v).kappa_softmax
            outside = kappa_softmax(s), attention_diagnostics(q, k, v).kappa_softmax
            got.extend([inside, outside])
        except Exception as err:  # "Inplace update to inference tensor outside InferenceMode"
            got.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert len(got) == 2, got
    for pair in got:
        assert torch.equal(pair[0], expected[0]) and torch.equal(pair[1], expected[1])  # type: ignore[index]
    torch.set_default_device("meta")
    try:
        assert torch.equal(kappa_softmax(s).cpu(), expected[0])
    finally:
        torch.set_default_device(None)


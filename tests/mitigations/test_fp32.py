"""The FP32 override against float64 recomputations: the same FP32 arithmetic, reversibly."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import Block as PreLNBlock
from torch import Tensor, nn

from lightning_stability.mitigations import FP32Override, attention_module

D, H, N = 32, 4, 7


# ------------------------------------------------------------------------------ FP32 override
def _fp64_reference(module: nn.Module, x: Tensor) -> Tensor:

    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_override_block_output_equals_fp32_output(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    block = PreLNBlock(D, H)
    x = torch.randn(3, N, D)
    ref64 = _fp64_reference(block, x)
    with torch.no_grad():
        fp32 = block(x)
        with torch.autocast("cpu", dtype=dtype):
            low = block(x)
            with FP32Override(block):
                guarded = block(x)
            after = block(x)
    assert guarded.dtype == torch.float32
    assert torch.equal(guarded, fp32)  # the same FP32 arithmetic, bit for bit
    err = lambda y: float((y.double() - ref64).norm() / ref64.norm())  # noqa: E731
    assert err(guarded) < 1e-6 < 1e-4 < err(low)  # FP32 rounding vs half-precision rounding
    assert torch.equal(after, low)  # removed: the autocast arithmetic again
    assert "forward" not in block.__dict__


def test_fp32_override_attention_only_and_hooks_still_fire() -> None:
    torch.manual_seed(0)
    block = PreLNBlock(D, H)
    name, attn = attention_module(block)  # type: ignore[misc]
    assert name == "attn"
    seen: list[torch.dtype] = []
    handle = attn.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    x = torch.randn(2, N, D)
    override = FP32Override(attn).apply()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
            mlp_dtype = block.mlp[0](x).dtype
    finally:
        override.restore()
        handle.remove()
    assert seen == [torch.float32]
    assert mlp_dtype == torch.bfloat16  # the rest of the block still autocasts
    assert out.dtype == torch.float32  # residual add promotes


def test_fp32_override_keeps_an_existing_instance_forward_and_refuses_half_params() -> None:
    lin = nn.Linear(4, 4)
    custom = lin.forward
    lin.forward = custom  # type: ignore[method-assign]
    with FP32Override(lin):
        assert lin.forward is not custom
    assert lin.__dict__["forward"] is custom
    with pytest.raises(ValueError, match="bfloat16"):
        FP32Override(nn.Linear(4, 4).to(torch.bfloat16)).apply()


def test_attention_module_names() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=D, n_head=H, n_layer=1, n_positions=16, vocab_size=11)
    assert attention_module(transformers.GPT2Model(config).h[0])[0] == "attn"  # type: ignore[index]
    assert attention_module(nn.Sequential(nn.Linear(2, 2))) is None

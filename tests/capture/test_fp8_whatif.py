"""FP8WhatIf: per-layer statistics against float64, a model left untouched, planted outliers, controls."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from tests.diagnostics.fp8_reference import f32, ref_current, ref_mx, ref_with_scale
from torch import Tensor, nn

from lightning_stability.capture.fp8 import FP8WhatIf, linear_layers
from lightning_stability.diagnostics.fp8 import E4M3
from lightning_stability.diagnostics.fp8_recipe import FP8Recipe, fp8_attention

F64 = torch.float64


class Taps:
    """Test-owned hooks recording what each layer received and returned (inside the what-if)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.handles = []
        for name, m in modules.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.inputs[name] = args[0].detach().clone()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            self.outputs[name] = out.detach().clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(nf=32, nx=96)  # GPT-2's linear layer: weight stored (in, out)
    nn.init.normal_(conv.weight, std=0.1)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), conv)


def weight_of(model: nn.Module, name: str) -> Tensor:
    module, transposed = linear_layers(model)[0][name]
    w = module.weight.detach()
    return w.t() if transposed else w


def ref_stats(xs: list[float], recipe: str, scale: float | None) -> dict[str, Any]:
    if recipe == "current":
        return ref_current(xs)
    if recipe == "mxfp8":
        return ref_mx(xs, E4M3, "rceil")
    assert scale is not None
    return ref_with_scale(xs, scale, E4M3)


def check_layer(
    fp8: FP8WhatIf, taps: Taps, model: nn.Module, name: str, recipe: str, scales: dict[str, float]
) -> None:
    rec = fp8.records[name]
    x = taps.inputs[name].reshape(-1, taps.inputs[name].shape[-1])
    w = weight_of(model, name)
    for role, t in (("input", x), ("weight", w)):
        ref = ref_stats(t.float().flatten().tolist(), recipe, scales.get(f"{name}/{role}"))
        got = rec.operands[role]
        assert int(got.numel) == t.numel()
        for key in ("underflow", "saturated", "nonzero"):
            assert int(getattr(got, key)) == ref[key], (name, role, key)
        deq = torch.tensor(ref["deq"], dtype=F64).reshape(t.shape)
        assert float(got.err_sq) == pytest.approx(float((deq - t.to(F64)).square().sum()), rel=1e-5)
        if role == "input":
            deq_x = deq
        else:
            deq_w = deq
    b = model.get_submodule(name).bias.detach().to(F64)
    y = taps.outputs[name].to(F64).reshape(x.shape[0], -1)
    assert taps.outputs[name].dtype == torch.bfloat16
    emulated = deq_x @ deq_w.t() + b  # the FP8 GEMM in float64
    assert bool(((y - emulated).abs() <= 2**-8 * emulated.abs() + 1e-6).all())  # one BF16 rounding apart
    exact = x.to(F64) @ w.to(F64).t() + b
    assert float(rec.relative_error) == pytest.approx(float((y - exact).norm() / exact.norm()), rel=1e-5)
    rows = (y - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert float(rec.mean_token_error) == pytest.approx(float(rows.mean()), rel=1e-5)
    assert rec.tokens == x.shape[0] and rec.calls == 1
    base = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).to(F64)
    assert float(rec.relative_error_autocast) == pytest.approx(
        float((base - exact).norm() / exact.norm()), rel=1e-5
    )


@pytest.mark.parametrize("recipe", ["current", "mxfp8", "delayed"])
def test_statistics_equal_float64_recomputation(recipe: str) -> None:
    model = two_layers()
    names = list(linear_layers(model)[0])
    assert names == ["0", "2"]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 8, 64, generator=g) * s for s in (1.0, 30.0)]
    history = FP8Recipe(recipe).new_history() if recipe == "delayed" else None  # type: ignore[arg-type]
    scales: dict[str, float] = {}
    for step, x in enumerate(xs):  # delayed: the second step quantizes with the first step's amaxes
        taps = Taps({n: model.get_submodule(n) for n in names})
        with FP8WhatIf(model, recipe, history=history) as fp8:  # type: ignore[arg-type]
            model(x)
        taps.remove()
        if step == 1 or recipe != "delayed":
            for name in names:
                check_layer(fp8, taps, model, name, recipe, scales)
        for name in names:
            for role, t in (("input", taps.inputs[name]), ("weight", weight_of(model, name))):
                scales[f"{name}/{role}"] = f32(448 / float(t.float().abs().max()))
    if history is not None:  # the first step used scale 1, the second 448/amax of the first
        assert float(history.scale("0/input")) == scales["0/input"]


# ----------------------------------------------------------------------------- models not written here
def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=96)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


def litgpt_gpt() -> nn.Module:
    litgpt = pytest.importorskip("litgpt")
    cfg = litgpt.config.Config.from_name(
        "Llama-3.2-1B",
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_query_groups=2,
        head_size=16,
        intermediate_size=128,
        padded_vocab_size=96,
        block_size=64,
    )
    return litgpt.model.GPT(cfg)


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(64, d)
        self.h = nn.ModuleList(NanoBlock(d, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


MODELS = {"llama": llama, "gpt2": gpt2, "litgpt": litgpt_gpt, "nanogpt": NanoGPT}


@pytest.mark.parametrize("family", list(MODELS))
def test_models_not_written_here(family: str) -> None:
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    before, state = logits(model, ids), snapshot(model)
    layers, unsupported = linear_layers(model)
    assert layers and not unsupported
    for recipe in ("current", "delayed", "mxfp8"):
        with FP8WhatIf(model, recipe, attention=True) as fp8:  # type: ignore[arg-type]
            out = logits(model, ids)
        assert torch.isfinite(out).all()
        assert 0 < float((out - before).norm() / before.norm()) < 0.2, recipe
        assert fp8.not_called == [] and set(layers) <= set(fp8.records)
        attention = {k: r for k, r in fp8.records.items() if r.kind == "attention"}
        assert len(attention) == 2 and all(
            set(r.operands) == {"q", "k", "p", "v"} for r in attention.values()
        )
        for name in layers:
            rec = fp8.records[name]
            assert rec.relative_error is not None and rec.relative_error_autocast is not None
            assert 0 < float(rec.relative_error) < 0.15 and 0 < float(rec.relative_error_autocast) < 0.02
    # nothing left behind: no forwards, no hooks, same parameters, the same outputs bit for bit
    for m in model.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in state.items())
    assert torch.equal(logits(model, ids), before)
    assert not torch.is_autocast_enabled("cpu")
    assert torch.overrides._get_current_function_mode_stack() == []


def test_removed_when_the_forward_raises() -> None:
    model = two_layers()
    with pytest.raises(RuntimeError), FP8WhatIf(model, "mxfp8", attention=True):
        model(torch.randn(2, 5))  # wrong width
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in model.modules())
    assert torch.overrides._get_current_function_mode_stack() == []


def test_instance_forward_of_someone_else_is_put_back() -> None:
    lin = nn.Linear(4, 4)
    mine = lin.forward
    lin.forward = mine  # an instance attribute set by someone else
    with FP8WhatIf(lin):
        lin(torch.randn(2, 4))
    assert lin.__dict__["forward"] is mine


def test_unsupported_and_not_called_are_reported() -> None:
    class LoRA(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.lora = LoRA(32, 32)

        def forward(self, x: Tensor) -> Tensor:
            return self.lora(self.mha(x, x, x, need_weights=False)[0])

    net = Net().eval()
    x = torch.randn(2, 5, 32)
    with FP8WhatIf(net) as fp8:
        net(x)
    assert fp8.unsupported == ["lora"]
    assert fp8.not_called == ["mha.out_proj"]  # MHA uses its out_proj weight without calling it
    assert fp8.records == {}


def test_excluded_layers_stay_in_autocast() -> None:
    torch.manual_seed(0)
    model = NanoGPT().eval()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5))
    taps = Taps({"lm_head": model.lm_head})
    with FP8WhatIf(model, "current", exclude={"lm_head"}) as fp8:
        model(ids)
    taps.remove()
    assert "lm_head" not in fp8.records and "lm_head" not in fp8.not_called and len(fp8.records) == 8
    x = taps.inputs["lm_head"]
    assert torch.equal(taps.outputs["lm_head"], F.linear(x.bfloat16(), model.lm_head.weight.bfloat16()))


def test_delayed_history_made_when_none_given() -> None:
    model = two_layers()
    with FP8WhatIf(model, "delayed") as fp8:
        model(torch.randn(3, 64))
    assert fp8.history is not None and set(fp8.history.scales) == {
        "0/input",
        "0/weight",
        "2/input",
        "2/weight",
    }
    with FP8WhatIf(model, "delayed", history=fp8.history, update_history=False) as again:
        model(torch.randn(3, 64))
    assert again.history is fp8.history and fp8.history._pending == {
        "0/input",
        "0/weight",
        "2/input",
        "2/weight",
    }


# ----------------------------------------------------------------------------- attention
def test_attention_options_match_their_equivalents() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    recipe = FP8Recipe("current")
    causal, _ = fp8_attention(q, k, v, recipe, is_causal=True)
    tril = torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.equal(causal, fp8_attention(q, k, v, recipe, attn_mask=tril)[0])
    additive = torch.zeros(9, 9).masked_fill(~tril, -math.inf)
    assert torch.equal(causal, fp8_attention(q, k, v, recipe, attn_mask=additive)[0])
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert 0 < float((causal - exact).norm() / exact.norm()) < 0.1
    kv = k[:, :2], v[:, :2]  # grouped-query attention: 2 key/value heads for 4 query heads
    gqa = fp8_attention(q, *kv, recipe, enable_gqa=True)[0]
    repeated = fp8_attention(q, *(t.repeat_interleave(2, dim=1) for t in kv), recipe)[0]
    assert torch.equal(gqa, repeated)
    _, quant = fp8_attention(q, k, v, FP8Recipe("mxfp8"))
    assert quant["q"].scale_inv.shape == (2, 4, 9, 1) and quant["p"].scale_inv.shape == (2, 4, 9, 1)
    assert quant["k"].dim == 2 and quant["v"].dim == 2  # blocks along the reduction dims


def test_attention_dropout_is_left_alone() -> None:
    model = NanoGPT().train()
    with FP8WhatIf(model, attention=True) as fp8:
        model(torch.randint(0, 96, (1, 8)))
    assert fp8.skipped_attention == ["h.0", "h.1"]  # the enclosing module: nanoGPT calls SDPA in the block
    assert all(r.kind == "linear" for r in fp8.records.values())


# ----------------------------------------------------------------------------- planted outliers
class MassiveMLP(nn.Module):
    """up → GELU → down; ``massive`` > 0 plants massive activations before ``down``.

    As in LLMs (Sun et al. 2024, "Massive activations in large language models"): a few
    channels of one token (here channels 3 and 77 of the first token of every sequence) at
    ``massive`` × the median |activation|. E4M3 spans 448/2⁻⁹ ≈ 2.3·10⁵, so per-tensor scaling
    survives ratios up to about 10⁵ and breaks past it; at a SwiGLU down-projection's input
    (gate ⊙ up) outliers of 10³ in both factors make 10⁶.
    """

    def __init__(self, massive: float = 0.0) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)
        for lin in (self.up, self.down):
            nn.init.normal_(lin.weight, std=0.02)
        self.massive = massive

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.up(x))
        if self.massive:
            h = h.clone()
            h[:, 0, [3, 77]] = self.massive * h.abs().median()
        return self.down(h)


def run(model: nn.Module, recipe: FP8Recipe, x: Tensor, **kw: Any) -> FP8WhatIf:
    with FP8WhatIf(model, recipe, **kw) as fp8:
        model(x)
    return fp8


RECIPES = {
    "current": FP8Recipe("current"),
    "mxfp8": FP8Recipe("mxfp8"),
    "mxfp8_floor": FP8Recipe("mxfp8", mx_rounding="floor"),
}


def inputs(seed: int) -> Tensor:
    return torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(seed)) * 8


@pytest.mark.parametrize("name", list(RECIPES))
def test_stable_control_small_errors(name: str) -> None:
    torch.manual_seed(0)
    fp8 = run(MassiveMLP(), RECIPES[name], inputs(4))
    for layer in ("up", "down"):
        rec = fp8.records[layer]
        assert float(rec.operands["input"].underflow_fraction) < 0.005
        assert float(rec.mean_token_error) < 0.06 and float(rec.relative_error) < 0.06
        assert float(rec.relative_error_autocast) < 0.005  # BF16: ≈ 10x smaller, E4M3 has 3 mantissa bits
        if name != "mxfp8_floor":  # the spec's floor scale lets some block maxima pass 448
            assert int(rec.operands["input"].saturated) == 0


def test_planted_outliers_break_per_tensor_scaling_not_blocks() -> None:
    torch.manual_seed(0)
    model = MassiveMLP(massive=1e6)
    current = run(model, RECIPES["current"], inputs(4)).records
    block = run(model, RECIPES["mxfp8"], inputs(4)).records
    # per-tensor: the scale is set by the massive activations, the other tokens sink below E4M3's subnormals
    down = current["down"]
    assert float(down.operands["input"].underflow_fraction) > 0.5
    assert float(down.mean_token_error) > 0.15  # control: 0.037
    assert float(down.relative_error) < 0.05  # the pooled error hides it: the massive rows dominate the norm
    assert float(current["up"].mean_token_error) < 0.06  # the layer before is unaffected
    # MXFP8: each block of 32 has its own scale, only the blocks holding a massive value lose precision
    assert float(block["down"].operands["input"].underflow_fraction) < 0.01
    assert float(block["down"].mean_token_error) < 0.06


def test_outliers_of_a_thousand_do_not_break_e4m3_per_tensor() -> None:
    # what breaks INT8 absmax scaling (127 levels) stays within FP8's exponent range
    torch.manual_seed(0)
    down = run(MassiveMLP(massive=1e3), RECIPES["current"], inputs(4)).records["down"]
    assert float(down.operands["input"].underflow_fraction) < 0.01 and float(down.mean_token_error) < 0.045


def test_delayed_scaling_saturates_on_a_sudden_outlier() -> None:
    torch.manual_seed(0)
    clean, spiky = MassiveMLP(), MassiveMLP(massive=1e3)
    spiky.load_state_dict(clean.state_dict())
    recipe = FP8Recipe("delayed", amax_history_len=16)
    history = recipe.new_history()
    for seed in (5, 6):  # two clean steps fill the history
        warm = run(clean, recipe, inputs(seed), history=history)
    assert int(warm.records["down"].operands["input"].saturated) == 0
    state = history.state_dict()
    spike = run(spiky, recipe, inputs(7), history=history).records["down"]
    # the planted values (and any ordinary value above the clean steps' amax) clip at the old amax
    assert int(spike.operands["input"].saturated) >= 2 * 4
    assert float(spike.relative_error) > 0.5  # their rows are wrong by orders of magnitude
    current = run(spiky, RECIPES["current"], inputs(7)).records["down"]
    assert int(current.operands["input"].saturated) == 0 and float(current.relative_error) < 0.06
    # the history is the caller's: restoring it replays the same step
    history.load_state_dict(state)
    again = run(spiky, recipe, inputs(7), history=history).records["down"]
    assert torch.equal(again.err_sq, spike.err_sq)  # type: ignore[arg-type]

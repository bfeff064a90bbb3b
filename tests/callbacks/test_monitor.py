"""StabilityMonitor on real Lightning fits: values against float64 references, no side effects."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tests.conftest import MemoryLogger, TinyTransformer, make_loader, trainer_kwargs
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from lightning_stability import AlarmOptions, ProbeOptions, StabilityMonitor
from lightning_stability import diagnostics as D


def fit(model, tmp_path, monitor=None, steps=4, loader=None, **kw):  # type: ignore[no-untyped-def]
    logger = MemoryLogger()
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=steps, logger=logger, **kw),
        callbacks=[monitor] if monitor else [],
    )
    trainer.fit(model, loader or make_loader())
    return trainer, logger


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("every_n_steps", 0),
        ("sample_size", -1),
        ("precision", "fp4"),
        ("blocks", "blocks.*"),
        ("log_per_head", "yes"),
        ("seed", -1),
    ],
)
def test_bad_arguments_name_argument_and_value(arg: str, value: Any) -> None:
    with pytest.raises(MisconfigurationException, match=f"`{arg}`.*{value!r}"[:40].replace("(", r"\(")):
        StabilityMonitor(**{arg: value})


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("head_reduction", "median"),
        ("batch_reduction", "min"),
        ("residual_gain_iters", -1),
        ("ln_c2", -1.0),
        ("bound_c", float("nan")),
        ("eps_mach", 0.0),
        ("eps_mach", "bf16"),
        ("local_errors", "yes"),
        ("balanced_mass", None),
        ("reuse_weight_spectra", "yes"),
        ("weight_spectra", "fast"),
    ],
)
def test_bad_probe_options_name_the_option_and_value(arg: str, value: Any) -> None:
    with pytest.raises(MisconfigurationException, match=f"`probe.{arg}`.*{value!r}"[:46].replace("(", r"\(")):
        StabilityMonitor(probe=ProbeOptions(**{arg: value}))


def test_sampled_steps_logged_with_reference_values(tmp_path, tiny_model) -> None:
    monitor = StabilityMonitor(every_n_steps=2, sample_size=4)
    _, logger = fit(tiny_model, tmp_path, monitor, steps=4, precision="bf16-mixed")
    steps = [s for s, m in logger.records if "stability/r_block" in m]
    assert steps == [1, 3]  # measured after optimizer steps 2 and 4, logged at Lightning's steps 1 and 3
    report = monitor.last_report
    assert report is not None and report.step == 3  # the logged step
    assert report.dtype == "bfloat16" and report.eps_mach == 2.0**-7
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    metrics = logger.records[-1][1]
    for i in range(2):
        for name in (
            "kappa_score",
            "kappa_softmax",
            "kappa_v",
            "wo_norm",
            "kappa_eff",
            "c_ln",
            "rho_ln",
            "predictor",
            "r_block",
            "r_block_median",
            "attention_entropy",
            "kappa_wkwq",
        ):
            value = metrics[f"stability/block{i}/{name}"]
            assert math.isfinite(value), (i, name, value)
    assert 1e-5 < report.r_block < 1e-1  # bf16 autocast: ~1e-3
    assert report.predictor_scaled == pytest.approx(report.predictor * 2.0**-7)
    assert metrics["stability/kappa_softmax_max"] >= max(b.kappa_softmax for b in report.blocks) - 1e-12

    # weights: float64 references
    model = tiny_model
    for i, block in enumerate(model.blocks):
        got = report.blocks[i]
        s_proj = torch.linalg.svdvals(block.attn.proj.weight.double())
        assert got.wo_norm == pytest.approx(s_proj[0].item(), rel=1e-5)
        kappa = [torch.linalg.svdvals(m.weight.double()) for m in (block.mlp[0], block.mlp[3])]
        assert got.kappa_eff == pytest.approx(sum((s[0] / s[-1]).item() for s in kappa), rel=1e-4)


def _reference(model: TinyTransformer, x: torch.Tensor) -> dict[str, list[float]]:
    """Block outputs (fp32 vs bf16 autocast), attention and norm stats written out by hand."""
    out: dict[str, list[float]] = {"r": [], "ksm": [], "ksc": [], "kv": [], "rho": []}
    model.eval()
    with torch.no_grad():
        h32 = model.embed(x.double().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hlp = model.embed(x)
        for block in model.blocks:
            a = block.norm1(h32)
            q, k, v = block.attn.qkv(a).reshape(*a.shape[:2], 3, 4, 8).permute(2, 0, 3, 1, 4)
            s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)
            p = s.softmax(-1)
            jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            lam = torch.linalg.eigvalsh(jac)[..., -1]
            ksm = (lam * s.norm(dim=-1) / p.norm(dim=-1)).amax(-1)  # (B, H)
            out["ksm"].append(ksm.amax().item())
            ksc = (
                q.double().flatten(-2).norm(dim=-1)
                * k.double().flatten(-2).norm(dim=-1)
                / (s.flatten(-2).norm(dim=-1) * math.sqrt(8))
            )
            out["ksc"].append(ksc.amax().item())
            sv = torch.linalg.svdvals(v.double())
            out["kv"].append((sv[..., 0] / (sv[..., -1] + 1e-6)).amax().item())
            rhos = []
            for norm, inp in ((block.norm1, h32), (block.norm2, None)):
                if inp is None:
                    inp = h32 + block.attn(block.norm1(h32))
                var = inp.double().var(-1, unbiased=False).median()
                rhos.append((var / norm.eps * inp.shape[-1] * 2.0**-7).item())
            out["rho"].append(min(rhos))
            h32 = block(h32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hlp = block(hlp)
            out["r"].append(((hlp.double() - h32.double()).norm() / h32.double().norm()).item())
    return out


def test_values_match_hand_written_float64_reference(tmp_path, tiny_model) -> None:
    loader = make_loader(n=8, batch_size=8)
    monitor = StabilityMonitor(every_n_steps=1, sample_size=8)
    fit(tiny_model, tmp_path, monitor, steps=1, loader=loader, precision="bf16-mixed")
    x = next(iter(loader))[0]
    ref = _reference(tiny_model, x)
    report = monitor.last_report
    assert report is not None
    for i, block in enumerate(report.blocks):
        assert block.r_block == pytest.approx(ref["r"][i], rel=1e-4)
        assert block.kappa_softmax == pytest.approx(ref["ksm"][i], rel=1e-4)
        assert block.kappa_score == pytest.approx(ref["ksc"][i], rel=1e-4)
        assert block.kappa_v == pytest.approx(ref["kv"][i], rel=1e-3)
        assert block.rho_ln == pytest.approx(ref["rho"][i], rel=1e-5)


def _state() -> dict[str, Any]:
    return {
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "matmul": torch.get_float32_matmul_precision(),
        "dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
    }


def _no_hooks(model: nn.Module) -> bool:
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        and not torch.overrides._get_current_function_mode_stack()
    )


def test_training_unchanged_bitwise_with_dropout(tmp_path) -> None:
    params = []
    for monitor in (None, StabilityMonitor(every_n_steps=1, sample_size=3)):
        seed_everything(7)
        model = TinyTransformer(dropout=0.3)
        model.blocks[1].mlp.eval()  # a module deliberately left in eval mode must stay so
        fit(model, tmp_path, monitor, steps=5, precision="bf16-mixed")
        assert model.training and not model.blocks[1].mlp.training
        assert _no_hooks(model)
        params.append([p.detach().clone() for p in model.parameters()])
        params.append(torch.random.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[2], strict=True))
    assert torch.equal(params[1], params[3])


class AttentionDropout(TinyTransformer):
    """SDPA called with a dropout_p that is not tied to ``self.training``."""

    def __init__(self) -> None:
        super().__init__(dropout=0.1)
        for block in self.blocks:
            attn = block.attn

            def forward(x: torch.Tensor, attn: nn.Module = attn) -> torch.Tensor:
                b, n, d = x.shape
                q, k, v = attn.qkv(x).reshape(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
                return attn.proj(out.transpose(1, 2).reshape(b, n, d))

            attn.forward = forward  # type: ignore[method-assign]


def test_dropout_inside_attention_same_masks_training_unchanged_bitwise(tmp_path) -> None:
    state = []
    monitor = StabilityMonitor(every_n_steps=1, sample_size=4, probe=ProbeOptions(eps_mach=2.0**-8))
    for cb in (None, monitor):
        seed_everything(3)
        model = AttentionDropout()
        fit(model, tmp_path, cb, steps=3, precision="bf16-mixed")
        state.append(([p.detach().clone() for p in model.parameters()], torch.random.get_rng_state()))
        assert _no_hooks(model)
    assert all(torch.equal(a, b) for a, b in zip(state[0][0], state[1][0], strict=True))
    assert torch.equal(state[0][1], state[1][1])
    report = monitor.last_report
    assert report is not None and report.eps_mach == 2.0**-8
    for block in report.blocks:  # same dropout masks in both passes: BF16 rounding, not 0.08
        assert block.r_block is not None and block.r_block < 2e-2
        assert block.r_local is not None and block.r_local < 2e-2


def test_global_settings_restored(tmp_path, tiny_model) -> None:
    before = _state()
    fit(tiny_model, tmp_path, StabilityMonitor(every_n_steps=1, precision="fp16"), steps=2)
    assert _state() == before
    assert _no_hooks(tiny_model)


class Exploding(TinyTransformer):
    """Raises in eval mode only: inside the monitor's passes, never in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            raise RuntimeError("boom")
        return super().forward(x)


def test_model_raising_inside_monitor_does_not_stop_training(tmp_path) -> None:
    model = Exploding()
    with pytest.warns(UserWarning, match="StabilityMonitor skipped step 1: RuntimeError: boom"):
        trainer, _ = fit(model, tmp_path, StabilityMonitor(every_n_steps=1), steps=3)
    assert trainer.global_step == 3
    assert _no_hooks(model)
    assert torch.backends.mha.get_fastpath_enabled()


class Overflowing(TinyTransformer):
    """The second block's MLP overflows FP16 (max 65504) but not FP32."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        with torch.no_grad():
            self.blocks[1].mlp[0].weight.mul_(1e5)


def test_fp16_overflow_is_counted_named_and_training_goes_on(tmp_path) -> None:
    torch.manual_seed(0)
    model = Overflowing()
    monitor = StabilityMonitor(every_n_steps=1, precision="fp16")
    with pytest.warns(UserWarning, match=r"went non-finite.*blocks\.1\.mlp\.0"):
        trainer, logger = fit(model, tmp_path, monitor, steps=2)
    report = monitor.last_report
    assert report is not None and report.nonfinite > 0 and report.dtype == "float16"
    assert report.r_block == math.inf and report.first_nonfinite == "blocks.1.mlp.0"
    assert logger.records[-1][1]["stability/nonfinite"] > 0
    assert trainer.global_step == 2


def test_what_if_precision_on_fp32_run_and_cpu_16_mixed(tmp_path, tiny_model) -> None:
    monitor = StabilityMonitor(every_n_steps=1, precision="bf16")
    fit(tiny_model, tmp_path, monitor, steps=1)  # 32-true
    assert monitor.last_report is not None and monitor.last_report.dtype == "bfloat16"
    monitor = StabilityMonitor(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tiny_model, tmp_path, monitor, steps=1, precision="16-mixed")
    assert monitor.last_report is not None and monitor.last_report.dtype == "bfloat16"
    monitor = StabilityMonitor(every_n_steps=1)
    fit(tiny_model, tmp_path, monitor, steps=1)  # plain FP32 training: tiny mismatch
    assert monitor.last_report.dtype == "float32" and monitor.last_report.r_block < 1e-5


def test_true_half_training_gets_fp32_copy(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    monitor = StabilityMonitor(every_n_steps=1, sample_size=4)
    fit(model, tmp_path, monitor, steps=2, precision="bf16-true")
    report = monitor.last_report
    assert report is not None and report.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert 1e-4 < report.r_block < 1
    for block in report.blocks:  # the local re-runs get their exact input rounded to the weights' bf16
        assert 1e-4 < block.r_local < 1e-1 and 1e-4 < block.r_ffn_local < 1e-1
        assert 1e-4 < block.r_attention_local < 1e-1


class DictModel(TinyTransformer):
    def forward(self, inputs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        return super().forward(inputs * scale)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return F.cross_entropy(self(batch["inputs"]), batch["labels"])


def test_dict_batch_and_unsupported_batch(tmp_path) -> None:
    items = [{"inputs": torch.randn(5, 8), "labels": torch.tensor(i % 3)} for i in range(8)]
    monitor = StabilityMonitor(every_n_steps=1, sample_size=2)
    fit(DictModel(), tmp_path, monitor, steps=2, loader=DataLoader(items, batch_size=4))
    assert monitor.last_report is not None and monitor.last_report.r_block is not None

    class Odd:
        pass

    with pytest.raises(MisconfigurationException, match=r"StabilityMonitor.inputs_from_batch"):
        StabilityMonitor().inputs_from_batch(Odd())


class NoAttention(TinyTransformer):
    def __init__(self) -> None:
        super().__init__()
        for block in self.blocks:
            block.attn = nn.Identity()  # type: ignore[assignment]


def test_model_without_attention_warns_once_and_still_measures(tmp_path) -> None:
    monitor = StabilityMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match="found no attention") as record:
        fit(NoAttention(), tmp_path, monitor, steps=3, precision="bf16-mixed")
    assert sum("found no attention" in str(w.message) for w in record) == 1
    report = monitor.last_report
    assert report is not None and report.r_block is not None and report.r_block > 0
    assert report.blocks[0].kappa_softmax is None and report.kappa_softmax_max is None


def test_residual_gain_matches_dense_jacobian_and_bound(tmp_path, tiny_model) -> None:
    loader = make_loader(n=1, batch_size=1)
    monitor = StabilityMonitor(every_n_steps=1, probe=ProbeOptions(residual_gain_iters=12))
    fit(tiny_model, tmp_path, monitor, steps=1, loader=loader, precision="bf16-mixed")
    report = monitor.last_report
    assert report is not None and report.bound is not None
    x = next(iter(loader))[0]
    tiny_model.eval()
    with torch.no_grad():
        h = tiny_model.embed(x)
    for i, block in enumerate(tiny_model.blocks):
        jac = torch.autograd.functional.jacobian(lambda z, blk=block: blk(z) - z, h)
        sigma = torch.linalg.matrix_norm(jac.reshape(h.numel(), h.numel()).double(), ord=2).item()
        # the monitor runs diagnostics.residual_gain (tested against dense Jacobians there) on the
        # block's FP32 input, seeded by seed + step + block index
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            same = D.residual_gain(
                lambda z, blk=block: blk(z) - z, h, iters=12, generator=torch.Generator().manual_seed(1 + i)
            )
        assert report.blocks[i].residual_gain == pytest.approx(same, rel=1e-6)
        assert 0.9 * sigma < report.blocks[i].residual_gain <= sigma * (1 + 1e-5)
        with torch.no_grad():
            h = block(h)
    gains = [b.residual_gain or 0.0 for b in report.blocks]
    bound = D.unified_bound(
        [b.kappa_eff or 0 for b in report.blocks],
        [D.condition_number(blk.attn.proj.weight.detach()).item() for blk in tiny_model.blocks],
        [b.kappa_softmax or 0 for b in report.blocks],
        [b.kappa_score or 0 for b in report.blocks],
        [b.kappa_v or 0 for b in report.blocks],
        [b.c_ln or 0 for b in report.blocks],
        gains,
        report.eps_mach,
    )
    assert report.bound == pytest.approx(bound.first_order, rel=1e-5)
    assert report.small_gain == all(g < 1 for g in gains)


def test_alarm_fires_on_a_kappa_softmax_jump_and_calls_hook(tmp_path) -> None:
    fired: list[int] = []

    class Hooked(StabilityMonitor):
        def on_alarm(self, trainer, pl_module, report):  # type: ignore[no-untyped-def]
            fired.append(report.step)

    class Jump(TinyTransformer):
        def on_train_batch_start(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.global_step == 6:
                with torch.no_grad():  # sharpen attention: κ_softmax jumps
                    self.blocks[0].attn.qkv.weight[:64].mul_(8.0)

    torch.manual_seed(0)
    monitor = Hooked(every_n_steps=1, alarm=AlarmOptions(rule="paper", window=4, threshold=3.0))
    with pytest.warns(UserWarning, match="early warning at step 6"):
        # one fixed batch and lr=0: κ_softmax is constant until the planted jump
        _, logger = fit(Jump(lr=0.0), tmp_path, monitor, steps=8, loader=make_loader(n=8))
    assert fired == [6]  # report.step: the logged step
    alarms = {s: m["stability/alarm"] for s, m in logger.records}
    assert alarms[6] == 1.0 and alarms[4] == 0.0 and alarms[5] == 0.0  # logged at global_step - 1
    assert monitor.state_dict()["judge"]["z"]["kappa_softmax_z"]["history"]


def test_blocks_that_never_run_or_none_found_are_reported(tmp_path, tiny_model) -> None:
    with pytest.warns(UserWarning, match=r"found no blocks.*blocks=\['nothing\.\*'\]"):
        fit(tiny_model, tmp_path, StabilityMonitor(every_n_steps=1, blocks=["nothing.*"]), steps=1)

    class SkipsBlocks(TinyTransformer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(x)).mean(1))

    with pytest.warns(UserWarning, match=r"skipped step 1: RuntimeError: none of the blocks"):
        fit(SkipsBlocks(), tmp_path, StabilityMonitor(every_n_steps=1), steps=1)


def test_reuse_weight_spectra_on_a_fit_with_frozen_blocks_logs_the_same_numbers(tmp_path) -> None:
    """Block 0 frozen: its weight spectra are reused from the first measurement on; every logged
    value equals the run without reuse (same seed), block 1's spectra are recomputed each time."""
    logged = {}
    for reuse in (False, True):
        seed_everything(0)
        model = TinyTransformer(depth=2)
        for p in model.blocks[0].parameters():
            p.requires_grad_(False)
        monitor = StabilityMonitor(
            every_n_steps=1, sample_size=4, precision="bf16", probe=ProbeOptions(reuse_weight_spectra=reuse)
        )
        _, logger = fit(model, tmp_path / str(reuse), monitor, steps=3)
        logged[reuse] = [m for _, m in logger.records if "stability/r_block" in m]
        spectra = monitor._measurer.probe.spectra  # type: ignore[union-attr]
        if reuse:  # per block W_O, fc1, fc2, the Q/K pair: block 0's 4 reused at steps 2 and 3
            assert (spectra.hits, spectra.misses) == (8, 3 * 4 + 4)
        else:
            assert spectra.hits == 0 and not spectra._kept
    assert len(logged[True]) == 3 and logged[True] == logged[False]

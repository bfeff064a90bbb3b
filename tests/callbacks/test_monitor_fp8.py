"""StabilityMonitor(precision="fp8"): the FP8 what-if on real tiny fits, its recommendation and its state."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tests.conftest import MemoryLogger, SwiGLULM, TinyTransformer, make_loader, token_loader, trainer_kwargs
from tests.diagnostics.fp8_reference import F64, ref_current, ref_mx

from lightning_stability import ProbeOptions, StabilityMonitor
from lightning_stability.analysis.logs import load_run
from lightning_stability.analysis.report import build_report
from lightning_stability.analysis.verdict import run_verdict
from lightning_stability.capture.probe import FP8Precision
from lightning_stability.diagnostics.fp8 import E4M3
from lightning_stability.rules.thresholds import EPS_MACH

warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
PLANTED = "blocks.1.mlp.down"


def fit_fp8(
    tmp_path: Path,
    recipe: str,
    massive: float,
    steps: int = 4,
    logger: Any = None,
    extra_callbacks: tuple[Callback, ...] | list[Callback] = (),
    **monitor: Any,
) -> tuple[StabilityMonitor, MemoryLogger | Any]:
    seed_everything(0)
    model = SwiGLULM(massive)
    log = logger if logger is not None else MemoryLogger()
    mon = StabilityMonitor(
        every_n_steps=2, sample_size=8, precision="fp8", probe=ProbeOptions(fp8_recipe=recipe), **monitor
    )  # type: ignore[arg-type]
    trainer = Trainer(
        **trainer_kwargs(tmp_path, logger=log, max_steps=steps, gradient_clip_val=1.0),
        callbacks=[*extra_callbacks, mon],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the printed verdict
        trainer.fit(model, token_loader())
    return mon, log


def layer_values(log: MemoryLogger, stat: str) -> list[dict[str, float]]:
    """Per logged step, ``{layer: value}`` of ``stability/layer/<layer>/<stat>``."""
    out = []
    for _, metrics in log.records:
        prefix = "stability/layer/"
        out.append(
            {
                k[len(prefix) : -len(stat) - 1]: v
                for k, v in metrics.items()
                if k.startswith(prefix) and k.endswith("/" + stat) and k.count("/") == 3
            }
        )
    return out


class LastBatch(Callback):
    """Keeps the last training batch and a copy of the weights after its optimizer step."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        self.batch = _[1]
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def ref_operand(t: torch.Tensor, recipe: str) -> dict[str, Any]:
    """Float64 statistics of quantizing ``t`` (rows along its last axis) by an independent E4M3 rounding."""
    xs = t.float().flatten().tolist()
    if recipe == "current":
        ref = ref_current(xs)
        inv = (ref["scale_inv"], ref["scale_inv"])
    else:
        ref = ref_mx(xs, E4M3, "rceil")
        exps = ref["exps"]
        inv = (2.0 ** min(exps), 2.0 ** max(exps))  # type: ignore[type-var, operator]
    deq = torch.tensor(ref["deq"], dtype=F64).reshape(t.shape)
    return {
        "fp8_underflow": ref["underflow"] / ref["nonzero"],
        "fp8_saturation": ref["saturated"] / t.numel(),
        "fp8_amax": float(t.abs().max()),
        "fp8_scale_inv_min": inv[0],
        "fp8_scale_inv_max": inv[1],
        "deq": deq,
    }


def relative_errors(y: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Pooled ``‖y − exact‖ / ‖exact‖`` and its mean over tokens (rows)."""
    pooled = float((y - exact).norm() / exact.norm())
    return pooled, float(((y - exact).norm(dim=-1) / exact.norm(dim=-1)).mean())


@pytest.mark.parametrize("recipe", ["current", "mxfp8"])
def test_logged_statistics_equal_float64_recomputation(tmp_path: Path, recipe: str) -> None:
    """Every linear layer's weight statistics, and the first layer's input and output errors (its
    input, LayerNorm(embedding), is the same in FP32 and under the what-if), from the log of a fit."""
    last = LastBatch()
    _, log = fit_fp8(tmp_path, recipe, massive=0.0, extra_callbacks=[last])
    assert [step for step, _ in log.records] == [1, 3]  # measured after the 2nd and the 4th (last) batch
    metrics = log.records[-1][1]
    model = SwiGLULM()
    model.load_state_dict(last.weights)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 16
    for name in layers:  # the batch of 8 is the sample, reordered: these statistics do not see order
        ref = ref_operand(model.get_submodule(name).weight.detach(), recipe)
        for stat in ("fp8_underflow", "fp8_saturation", "fp8_amax", "fp8_scale_inv_min", "fp8_scale_inv_max"):
            got = metrics[f"stability/layer/{name}/weight/{stat}"]
            assert got == pytest.approx(ref[stat], rel=1e-12, abs=1e-15), (name, stat)
    (ids,) = last.batch
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        x = model.blocks[0].norm1(model.embed(ids)).reshape(-1, 64)
    ref_x = ref_operand(x, recipe)
    for stat in ("fp8_underflow", "fp8_saturation", "fp8_amax", "fp8_scale_inv_min", "fp8_scale_inv_max"):
        assert metrics[f"stability/layer/blocks.0.attn.qkv/input/{stat}"] == pytest.approx(
            ref_x[stat], rel=1e-6
        )
    w64, b64 = qkv.weight.detach().to(F64), qkv.bias.detach().to(F64)
    exact = x.to(F64) @ w64.t() + b64
    deq_w = ref_operand(qkv.weight.detach(), recipe)["deq"]
    fp8 = (ref_x["deq"] @ deq_w.t() + b64).to(torch.bfloat16).to(F64)  # FP8 GEMM, FP32 accumulation, BF16 out
    bf16 = lambda t: t.to(torch.bfloat16).to(F64)  # noqa: E731
    autocast = bf16(bf16(x) @ bf16(w64).t() + bf16(b64))
    for precision, y in (("fp8", fp8), ("bf16", autocast)):
        pooled, token = relative_errors(y, exact)
        assert metrics[f"stability/layer/blocks.0.attn.qkv/{precision}_error"] == pytest.approx(
            pooled, rel=1e-2
        )
        assert metrics[f"stability/layer/blocks.0.attn.qkv/{precision}_error_token"] == pytest.approx(
            token, rel=1e-2
        )


@pytest.mark.parametrize("recipe", ["current", "delayed", "mxfp8"])
def test_stable_control_recommends_nothing(tmp_path: Path, recipe: str) -> None:
    mon, log = fit_fp8(tmp_path, recipe, massive=0.0)
    j = mon.judgement
    assert j is not None and j.status == "healthy" and j.advice == [] and j.steps == 2
    assert j.eps_mach == EPS_MACH["fp8"] and mon.summary is not None and "low precision FP8" in mon.summary
    for step in layer_values(log, "fp8_error_token"):
        # 16 linear layers: qkv, proj, gate, up, down per block, and the head
        assert len(step) == 16 and all(0.02 < v < 0.06 for v in step.values())
    for step in layer_values(log, "bf16_error_token"):
        assert all(1e-3 < v < 5e-3 for v in step.values())  # FP8's 3 mantissa bits vs BF16's 7: ~16x
    ext = j.extremes["fp8_layer"]
    assert ext.level is None and ext.value < 0.5  # below one E4M3 rounding by a wide margin


def test_planted_outliers_current_scaling_names_the_layer_mxfp8_nothing(tmp_path: Path) -> None:
    mon, log = fit_fp8(tmp_path / "current", "current", massive=1e3)
    j = mon.judgement
    assert j is not None and j.status == "at risk"
    keep = [a for a in j.advice if a.kind == "keep_bf16"]
    assert [(a.layer, a.answers, a.block) for a in keep] == [(PLANTED, "fp8_layer", None)]
    (finding,) = [f for f in j.findings if f.rule == "fp8_layer"]
    assert finding.layer == PLANTED and finding.level == "at risk"
    errors = layer_values(log, "fp8_error_token")
    for step in errors:  # the planted layer's small values sink below E4M3's subnormals
        others = sorted(v for k, v in step.items() if k != PLANTED)
        assert step[PLANTED] > 0.5 and step[PLANTED] > 10 * others[len(others) // 2] and others[-1] < 0.06
    assert finding.value == pytest.approx(max(s[PLANTED] for s in errors) / EPS_MACH["fp8"])
    underflow = [m[f"stability/layer/{PLANTED}/input/fp8_underflow"] for _, m in log.records]
    assert all(u > 0.9 for u in underflow)
    pooled = [m[f"stability/layer/{PLANTED}/fp8_error"] for _, m in log.records]
    assert all(p < 0.1 for p in pooled)  # the pooled error hides it: the massive rows dominate the norm
    summary = mon.summary or ""
    assert f"keep {PLANTED} in BF16 (out of FP8)" in summary and "underflow" in summary

    mon, log = fit_fp8(tmp_path / "mxfp8", "mxfp8", massive=1e3)
    j = mon.judgement
    assert j is not None and j.status == "healthy" and j.advice == []
    for step in layer_values(log, "fp8_error_token"):  # one block of 32 per outlier loses precision
        assert step[PLANTED] < 0.06


def test_delayed_scaling_keeps_its_history_across_sampled_steps(tmp_path: Path) -> None:
    mon, log = fit_fp8(tmp_path, "delayed", massive=1e3)
    state = mon.state_dict()["fp8"]
    assert state["recipe"] == "delayed"
    history = state["history"]["histories"]
    # two sampled steps: the planted layer's input amax of each, in the window's last two slots
    window = history[f"{PLANTED}/input"]
    amaxes = [m[f"stability/layer/{PLANTED}/input/fp8_amax"] for _, m in log.records]
    assert window[-2:].tolist() == pytest.approx(amaxes, rel=1e-6) and float(window[:-2].abs().sum()) == 0
    # the first sampled step quantized with TE's initial scale 1 (the planted values saturate); the
    # second with 448 / the first step's amax, which sinks the ordinary values below E4M3's range
    scales = [m[f"stability/layer/{PLANTED}/input/fp8_scale_inv_max"] for _, m in log.records]
    assert scales[0] == 1.0 and scales[1] == pytest.approx(amaxes[0] / 448, rel=1e-6)
    saturation = [m[f"stability/layer/{PLANTED}/input/fp8_saturation"] for _, m in log.records]
    errors = [s[PLANTED] for s in layer_values(log, "fp8_error_token")]
    assert saturation[0] > 0 and errors[0] < 0.1 < 0.5 < errors[1]
    j = mon.judgement
    assert j is not None and [a.layer for a in j.advice if a.kind == "keep_bf16"] == [PLANTED]
    second = log.records[1][0]  # the second sampled step: where the planted layer first stands out
    assert j.layers[PLANTED].step == second and j.layers[PLANTED].first_step == second

    # a resumed monitor continues the same history
    resumed = StabilityMonitor(precision="fp8", probe=ProbeOptions(fp8_recipe="delayed"))
    resumed.load_state_dict(mon.state_dict())
    model = SwiGLULM(1e3)
    fp8 = resumed._low_precision(None, model)  # type: ignore[arg-type]
    assert isinstance(fp8, FP8Precision) and fp8.history is not None
    assert torch.equal(fp8.history.histories[f"{PLANTED}/input"], window)
    # the next scale: 448 / the window's max ("max" amax_compute_algo, TE's default)
    expected = torch.tensor(448.0) / torch.tensor(max(amaxes))
    assert torch.equal(fp8.history.scale(f"{PLANTED}/input"), expected)
    other = StabilityMonitor(precision="fp8", probe=ProbeOptions(fp8_recipe="current"))
    other.load_state_dict(mon.state_dict())  # another recipe: nothing to take
    assert other._low_precision(None, model).history is None  # type: ignore[arg-type, union-attr]


def test_training_is_unchanged_by_the_fp8_what_if(tmp_path: Path) -> None:
    def final_params(monitor: bool) -> list[torch.Tensor]:
        seed_everything(0)
        model = SwiGLULM(1e3)
        callbacks = [
            StabilityMonitor(every_n_steps=1, precision="fp8", probe=ProbeOptions(fp8_recipe="delayed"))
        ]
        trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=callbacks if monitor else [])
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(model, token_loader())
        assert all("forward" not in m.__dict__ for m in model.modules())  # no FP8 forward left behind
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(final_params(True), final_params(False), strict=True):
        assert torch.equal(a, b)


def test_online_and_offline_fp8_judgements_agree(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    mon, _ = fit_fp8(tmp_path, "current", massive=1e3, steps=6, logger=logger)
    online = mon.judgement
    assert online is not None and [a.layer for a in online.advice] == [PLANTED]
    offline = run_verdict(load_run(tmp_path / "run" / "version_0")).judgement
    assert offline.key() == online.key() and offline.layers.keys() == online.layers.keys()
    rep = build_report(tmp_path / "run", tmp_path / "report", n_permutations=20, plots=False, progress=False)
    text = rep.markdown.read_text()
    assert f"keep {PLANTED} in BF16 (out of FP8)" in text and "FP8, ε_mach = 0.12" in text


def test_fp8_arguments_are_validated() -> None:
    with pytest.raises(MisconfigurationException, match=r"`precision` must be one of .*'fp8'.*got 'fp9'"):
        StabilityMonitor(precision="fp9")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"`probe.fp8_recipe` must be one of .*got 'blocks'"):
        StabilityMonitor(precision="fp8", probe=ProbeOptions(fp8_recipe="blocks"))  # type: ignore[arg-type]
    with pytest.raises(
        MisconfigurationException, match=r"`probe.fp8_recipe` applies to precision='fp8' only"
    ):
        StabilityMonitor(precision="bf16", probe=ProbeOptions(fp8_recipe="mxfp8"))
    with pytest.raises(MisconfigurationException, match=r"`probe.fp8_attention` applies to precision='fp8'"):
        StabilityMonitor(probe=ProbeOptions(fp8_attention=True))
    with pytest.raises(MisconfigurationException, match=r"`probe.fp8_attention` must be one of"):
        StabilityMonitor(precision="fp8", probe=ProbeOptions(fp8_attention=1))  # type: ignore[arg-type]
    StabilityMonitor(precision="fp8", probe=ProbeOptions(fp8_recipe="mxfp8", fp8_attention=True))


def test_fp8_attention_logs_the_attention_operands(tmp_path: Path) -> None:
    seed_everything(0)
    log = MemoryLogger()
    mon = StabilityMonitor(
        every_n_steps=2, precision="fp8", probe=ProbeOptions(fp8_recipe="mxfp8", fp8_attention=True)
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, logger=log, max_steps=2), callbacks=[mon])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(TinyTransformer(), make_loader())
    ((_, metrics),) = log.records
    for operand in ("q", "k", "p", "v"):
        assert 0 <= metrics[f"stability/layer/blocks.0.attn/{operand}/fp8_underflow"] < 0.05
    assert 0.01 < metrics["stability/layer/blocks.0.attn/fp8_error_token"] < 0.1

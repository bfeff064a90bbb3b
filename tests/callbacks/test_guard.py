"""StabilityGuard: its decisions on reports, and real tiny fits where one block is fragile by construction."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tests.conftest import MemoryLogger, TinyTransformer, make_loader, trainer_kwargs
from tests.scripts import load_script
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from lightning_stability import StabilityGuard, StabilityMonitor
from lightning_stability.capture.side_forward import eval_mode, preserved_rng
from lightning_stability.stability_report import BlockReport, StabilityReport

D, H = 32, 4
DH = D // H

pytestmark = pytest.mark.filterwarnings("ignore:.*StabilityGuard at step.*", "ignore:.*StabilityMonitor.*")


# ------------------------------------------------------------------- independent reference
def fp32_signals(model: TinyTransformer, x: Tensor) -> tuple[list[list[float]], list[float]]:
    """Per block: max |q·kᵀ/√d_h| per head and max |output| over the block's modules, in FP32."""
    logits: list[list[float]] = []
    amax = [0.0] * len(model.blocks)

    def on_attn(module: nn.Module, args: tuple[Any, ...]) -> None:
        z = args[0]
        b, n, _ = z.shape
        q, k, _ = module.qkv(z).reshape(b, n, 3, H, DH).permute(2, 0, 3, 1, 4)
        logits.append((q @ k.transpose(-1, -2) / math.sqrt(DH)).abs().amax(dim=(0, 2, 3)).tolist())

    def on_out(i: int) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                amax[i] = max(amax[i], float(out.abs().max()))

        return hook

    with ExitStack() as stack, torch.no_grad(), preserved_rng(), eval_mode(model):
        for i, block in enumerate(model.blocks):
            stack.enter_context(block.attn.register_forward_pre_hook(on_attn))
            for sub in block.modules():
                stack.enter_context(sub.register_forward_hook(on_out(i)))
        model(x.float())
    return logits, amax


def signal_monitor(precision: str) -> StabilityMonitor:
    """The real monitor with per-head values: ``attn_logit_max`` per head, ``amax``, ``r_local``."""
    return StabilityMonitor(every_n_steps=2, precision=precision, log_per_head=True)  # type: ignore[arg-type]


def fragile_logits(model: TinyTransformer, factor: float = 12.0) -> None:
    """Scale head 0's query and key rows of block 0: its logits grow by ``factor²`` (≈150 here)."""
    with torch.no_grad():
        w = model.blocks[0].attn.qkv.weight
        w[:DH].mul_(factor)
        w[D : D + DH].mul_(factor)


def fit(model: TinyTransformer, tmp_path: Any, callbacks: list[Any], **kw: Any) -> Trainer:
    extra = {"max_steps": 4, "logger": MemoryLogger(), **kw}
    ckpt = extra.pop("ckpt_path", None)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **extra))
    trainer.fit(model, make_loader(n=8, batch_size=8), ckpt_path=ckpt)
    return trainer


def tiny(lr: float = 0.0) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(lr=lr)


def logged(trainer: Trainer, prefix: str = "stability/guard") -> dict[tuple[int | None, str], float]:
    logger = trainer.logger
    assert isinstance(logger, MemoryLogger)
    return {(s, k): v for s, m in logger.records for k, v in m.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- decisions
def report(dtype: str = "bfloat16", eps_mach: float = 2.0**-7, **fields: Any) -> StabilityReport:
    blocks = [BlockReport(name=f"blocks.{i}", rho_ln=5.0) for i in range(3)]
    out = StabilityReport(step=10, dtype=dtype, eps_mach=eps_mach, blocks=blocks)
    for key, value in fields.items():
        i, name = key.split("__")
        setattr(out.blocks[int(i[1:])], name, value)
    return out


def test_decide_maps_each_cause_to_its_action_in_its_block() -> None:
    guard = StabilityGuard()
    rep = report(b1__attn_logit_max=150.0, b0__rho_ln=0.8, b2__r_local=0.2)
    rep.blocks[1].per_head["attn_logit_max"] = [150.0, 20.0, 120.0, 3.0]
    plans = {(p.block, p.action): p for p in guard.decide(rep)}
    assert set(plans) == {(1, "qk_clip"), (0, "eps_bump"), (2, "fp32")}
    assert {p.rule for p in plans.values()} == {"attn_logit_max", "rho_ln", "r_local"}
    assert plans[(1, "qk_clip")].heads == [150.0, 20.0, 120.0, 3.0]
    assert plans[(1, "qk_clip")].cause == "attn_logit_max 150 > 100"
    assert plans[(0, "eps_bump")].cause == "rho_ln 0.8 < 1"
    assert plans[(2, "fp32")].cause == "r_local 25.6 × ε_mach > 10 × ε_mach"  # 0.2 / 2⁻⁷
    assert not any(p.applied for p in plans.values())


def test_decide_thresholds_are_strict_and_a_control_gets_nothing() -> None:
    guard = StabilityGuard()
    floor = 10 * 2.0**-7
    # at the thresholds (logit = τ, ρ_LN = 1, r_local = 10 ε_mach): nothing fires
    assert guard.decide(report(b0__attn_logit_max=100.0, b1__rho_ln=1.0, b2__r_local=floor)) == []
    assert guard.decide(report()) == []
    assert guard.decide(report("float32", 2.0**-23, b0__rho_ln=0.1)) == []  # FP32: ρ_LN < 1 is normal
    assert guard.decide(report(b0__attn_logit_max=100.0 * (1 + 1e-5))) == []  # a head clipped to τ
    # without per-head maxima the block maximum stands for every head
    (plan,) = guard.decide(report(b0__attn_logit_max=100.5))
    assert plan.heads == [100.5]


def test_fp16_headroom_counts_only_when_fp16_is_measured() -> None:
    guard = StabilityGuard(min_fp16_headroom=1.0)
    assert guard.decide(report(b1__amax=40000.0)) == []  # BF16: the FP16 range is not its limit
    (plan,) = guard.decide(report("float16", 2.0**-10, b1__amax=40000.0))
    assert (plan.block, plan.action) == (1, "fp32")
    assert plan.cause == "fp16_headroom 0.7116 bits < 1 bits"  # log2(65504 / 40000)
    assert guard.decide(report("float16", 2.0**-10, b1__amax=30000.0)) == []  # 1.13 bits left
    # model-level headroom, attributed to the block holding amax_module
    rep = report("float16", 2.0**-10)
    rep.fp16_headroom, rep.amax_module = 0.5, "blocks.2.mlp.3"  # type: ignore[attr-defined]
    (plan,) = guard.decide(rep)
    assert (plan.block, plan.action) == (2, "fp32")


def test_alarm_without_a_matching_cause_says_so_and_require_alarm_filters() -> None:
    rep = report(b2__attn_logit_max=500.0)
    rep.alarm_rule, rep.alarm_block = "entropy_collapse", 1  # an alarm no mitigation answers
    plans = StabilityGuard().decide(rep)
    assert [(p.block, p.action, p.rule) for p in plans] == [
        (2, "qk_clip", "attn_logit_max"),
        (1, "none", "entropy_collapse"),
    ]
    assert "no mitigation matches" in plans[1].detail
    # require_alarm: only the block the alarm names, which has nothing to fix
    only = StabilityGuard(require_alarm=True).decide(rep)
    assert [(p.block, p.action) for p in only] == [(1, "none")]
    rep.alarm_rule, rep.alarm_block = "attn_logit_max", 2
    assert [(p.block, p.action) for p in StabilityGuard(require_alarm=True).decide(rep)] == [(2, "qk_clip")]
    assert StabilityGuard(require_alarm=True).decide(report(b2__attn_logit_max=500.0)) == []


def test_disabled_actions_do_not_fire() -> None:
    rep = report(b1__attn_logit_max=150.0, b0__rho_ln=0.8, b2__r_local=0.2)
    guard = StabilityGuard(qk_clip=False, eps_bump=False, fp32=False)
    assert guard.decide(rep) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tau": 0.0}, "tau"),
        ({"qk_clip_alpha": 1.5}, "qk_clip_alpha"),
        ({"rho_ln_threshold": -1.0}, "rho_ln_threshold"),
        ({"r_local_factor": math.nan}, "r_local_factor"),
        ({"min_fp16_headroom": 20.0}, "min_fp16_headroom"),
        ({"fp32_scope": "ffn"}, "fp32_scope"),
        ({"dry_run": 1}, "dry_run"),
        ({"target_rho": 1.0}, "target_rho"),
        ({"eps_max": 1e-7}, "eps_max"),
        ({"sample_size": 0}, "sample_size"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        StabilityGuard(**kwargs)


def test_arguments_settable_from_cli_parser() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(StabilityGuard, "guard")
    cfg = parser.parse_args(["--guard.tau=50", "--guard.fp32_scope=attention", "--guard.dry_run=true",
                             "--guard.eps_bump=false"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    guard = instantiate(cfg).guard
    got = (guard.tau, guard.fp32_scope, guard.dry_run, guard.enabled["eps_bump"])
    assert got == (50.0, "attention", True, False)
    with pytest.raises(jsonargparse.ArgumentError, match="fp32_scope"):
        parser.parse_args(["--guard.fp32_scope=ffn"])


def test_needs_a_monitor_listed_before_it(tmp_path: Any) -> None:
    with pytest.raises(MisconfigurationException, match="list a StabilityMonitor before it"):
        fit(tiny(), tmp_path, [StabilityGuard(), StabilityMonitor(every_n_steps=2)], max_steps=1)


# ---------------------------------------------------------------------------- real fits
def test_qk_clip_fit_acts_once_on_the_fragile_block_and_control_is_untouched(tmp_path: Any) -> None:
    model = tiny()
    fragile_logits(model)
    x = make_loader(n=8, batch_size=8).dataset.tensors[0]  # type: ignore[attr-defined]
    before, _ = fp32_signals(model, x)
    assert before[0][0] > 100 > max(before[0][1:] + before[1])  # the construction: head 0 of block 0
    v_rows = model.blocks[0].attn.qkv.weight[2 * D :].detach().clone()
    guard = StabilityGuard(tau=100.0)
    trainer = fit(model, tmp_path, [signal_monitor("bf16"), guard], max_steps=6)
    assert [(a.step, a.block_name, a.action, a.applied) for a in guard.actions] == [
        (1, "blocks.0", "qk_clip", True)
    ]
    assert "heads [0]" in guard.actions[0].detail
    # the monitor's per-head maxima (what the guard clipped by) equal a plain-hook FP32 recomputation
    assert guard.actions[0].heads == pytest.approx(before[0], rel=1e-5)
    after, _ = fp32_signals(model, x)  # lr = 0: only the guard changed weights
    assert after[0][0] == pytest.approx(100.0, rel=1e-5)  # exactly τ on the measured sample
    assert after[0][1:] == before[0][1:]  # block 0's other heads: same weights, same input
    assert max(after[1]) < 100  # block 1 sees block 0's new output; still below τ
    assert torch.equal(model.blocks[0].attn.qkv.weight[2 * D :], v_rows)
    tags = logged(trainer)
    assert tags[(1, "stability/guard/block0/qk_clip")] == pytest.approx(100.0 / before[0][0], rel=1e-5)
    assert tags[(5, "stability/guard/actions")] == 1.0

    control = tiny()
    guard_c = StabilityGuard(tau=100.0)
    monitor_c = signal_monitor("bf16")
    trainer_c = fit(control, tmp_path, [monitor_c, guard_c], max_steps=6)
    assert guard_c.actions == []
    assert {k for _, k in logged(trainer_c)} == {"stability/guard/actions", "stability/guard/fp32_blocks"}
    assert all(v == 0.0 for v in logged(trainer_c).values())


def test_dry_run_changes_nothing_and_says_what_it_would_do(tmp_path: Any) -> None:
    model = tiny()
    fragile_logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = StabilityGuard(dry_run=True)
    with pytest.warns(UserWarning, match="dry run: would QK-clip to tau 100"):
        trainer = fit(model, tmp_path, [signal_monitor("bf16"), guard])
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert [(a.step, a.action, a.applied) for a in guard.actions] == [
        (1, "qk_clip", False),
        (3, "qk_clip", False),
    ]
    assert (1, "stability/guard/dry_run/block0/qk_clip") in logged(trainer)


def fragile_norm(model: TinyTransformer, scale: float = 0.01) -> None:
    """Shrink the embedding: block 0's first LayerNorm sees σ² ≈ 3e-5, ρ_LN ≈ 0.7 at BF16's ε_mach.

    ``scale=0.028`` gives the same ρ_LN at FP16's ε_mach (8× smaller).
    """
    with torch.no_grad():
        model.embed.weight.mul_(scale)
        model.embed.bias.mul_(scale)


def test_eps_fit_bumps_block0_norm_once_by_lnepsilonbumps_rule_and_restores(tmp_path: Any) -> None:
    model = tiny()
    fragile_norm(model)
    monitor = StabilityMonitor(every_n_steps=2, precision="bf16")
    guard = StabilityGuard()
    seen: list[float] = []
    model.blocks[0].norm1.register_forward_pre_hook(lambda m, a: seen.append(m.eps) if m.training else None)
    fit(model, tmp_path, [monitor, guard], max_steps=6)
    assert [(a.step, a.block_name, a.action, a.applied) for a in guard.actions] == [
        (1, "blocks.0", "eps_bump", True)
    ]
    (action,) = guard.actions
    rho = float(action.cause.split()[1])  # "rho_ln 0.7 < 1"
    assert 0.6 < rho < 1.0
    new = seen[-1]
    # Algorithm 1: ε_new = σ²·d·ε_mach/ρ*, i.e. ε_new/ε = ρ_LN/ρ* (both measured on the same sample)
    assert new / 1e-5 == pytest.approx(rho / 0.6, rel=0.02)
    assert seen[:2] == [1e-5, 1e-5] and set(seen[2:]) == {new}  # from step 3 on, one bump only
    assert "blocks.0.norm1" in action.detail and "blocks.0.norm2" not in action.detail
    assert model.blocks[0].norm1.eps == 1e-5  # restored at fit end

    control = tiny()
    guard_c = StabilityGuard()
    fit(control, tmp_path, [StabilityMonitor(every_n_steps=2, precision="bf16"), guard_c], max_steps=6)
    assert guard_c.actions == []


def fragile_range(model: TinyTransformer) -> float:
    """Scale block 1's last FFN layer so its output reaches 45000 on the data (0.54 bits of FP16 left)."""
    x = make_loader(n=8, batch_size=8).dataset.tensors[0]  # type: ignore[attr-defined]
    out: list[float] = []
    handle = model.blocks[1].mlp[3].register_forward_hook(lambda m, a, o: out.append(float(o.abs().max())))
    with torch.no_grad():
        model(x)
        handle.remove()
        scale = 45000.0 / out[0]
        model.blocks[1].mlp[3].weight.mul_(scale)
        model.blocks[1].mlp[3].bias.mul_(scale)
    return scale


def ffn_dtypes(model: TinyTransformer, index: int) -> list[torch.dtype]:
    """Output dtype of block ``index``'s first FFN layer in every training forward."""
    seen: list[torch.dtype] = []
    model.blocks[index].mlp[0].register_forward_hook(
        lambda m, a, o: seen.append(o.dtype) if m.training else None
    )
    return seen


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_fp32_fit_guards_the_fp16_fragile_block_and_a_resumed_run_keeps_it(tmp_path: Any) -> None:
    model = tiny()
    fragile_range(model)
    dtypes = ffn_dtypes(model, 1)
    guard = StabilityGuard()
    monitor = signal_monitor("fp16")
    trainer = fit(model, tmp_path, [monitor, guard], max_steps=4, precision="bf16-mixed")
    assert [(a.step, a.block_name, a.action, a.applied) for a in guard.actions] == [
        (1, "blocks.1", "fp32", True)
    ]
    assert guard.actions[0].cause.startswith("fp16_headroom 0.54")
    assert dtypes == [torch.bfloat16] * 2 + [torch.float32] * 2  # FP32 from step 3 on
    assert guard.fp32_blocks == ["blocks.1"] and "forward" not in model.blocks[1].__dict__  # restored
    ckpt = str(tmp_path / "guarded.ckpt")
    trainer.save_checkpoint(ckpt)

    resumed = tiny()
    fragile_range(resumed)
    ffn = ffn_dtypes(resumed, 1)
    guard2 = StabilityGuard()
    fit(resumed, tmp_path, [signal_monitor("fp16"), guard2], max_steps=6,
        precision="bf16-mixed", ckpt_path=ckpt)
    assert ffn == [torch.float32] * 2  # steps 5 and 6: block 1 in FP32 from the first resumed step
    assert guard2.fp32_blocks == ["blocks.1"]
    assert [(a.step, a.action) for a in guard2.actions] == [(1, "fp32")]  # kept, not repeated
    assert "forward" not in resumed.blocks[1].__dict__

    control = tiny()
    control_dtypes = ffn_dtypes(control, 1)
    guard_c = StabilityGuard()
    fit(control, tmp_path, [signal_monitor("fp16"), guard_c], max_steps=4,
        precision="bf16-mixed")
    assert guard_c.actions == [] and control_dtypes == [torch.bfloat16] * 4


def test_fp32_decision_under_fp32_training_is_refused_once_not_at_every_check(tmp_path: Any) -> None:
    # training in FP32, measuring the FP16 what-if: "run the block in FP32" has nothing to change
    model = tiny()
    fragile_range(model)
    guard = StabilityGuard()
    fit(model, tmp_path, [signal_monitor("fp16"), guard], max_steps=6, precision="32-true")
    assert [(a.block_name, a.action, a.applied) for a in guard.actions] == [("blocks.1", "fp32", False)]
    assert guard.actions[0].detail == "training already computes in float32" and guard.fp32_blocks == []


def test_fp32_scope_attention_moves_only_the_attention(tmp_path: Any) -> None:
    model = tiny()
    fragile_range(model)
    attn: list[torch.dtype] = []
    model.blocks[1].attn.register_forward_hook(lambda m, a, o: attn.append(o.dtype) if m.training else None)
    ffn = ffn_dtypes(model, 1)
    guard = StabilityGuard(fp32_scope="attention")
    fit(model, tmp_path, [signal_monitor("fp16"), guard], max_steps=4,
        precision="bf16-mixed")
    assert "'blocks.1.attn' runs outside autocast" in guard.actions[0].detail
    assert attn == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert ffn == [torch.bfloat16] * 4


def test_nothing_fired_means_training_unchanged_bitwise(tmp_path: Any) -> None:
    runs = []
    guard = StabilityGuard()
    for callbacks in ([StabilityMonitor(every_n_steps=2)], [StabilityMonitor(every_n_steps=2), guard]):
        model = tiny(lr=1e-2)
        fit(model, tmp_path, callbacks, max_steps=4)
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert guard.actions == []


class FailAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def test_fp32_and_eps_restored_when_fit_raises(tmp_path: Any) -> None:
    model = tiny()
    fragile_norm(model, 0.028)
    fragile_range(model)
    guard = StabilityGuard()
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, tmp_path, [signal_monitor("fp16"), guard, FailAt(3)],
            max_steps=6, precision="bf16-mixed")
    assert {(a.block_name, a.action, a.applied) for a in guard.actions} == {
        ("blocks.0", "eps_bump", True),
        ("blocks.1", "fp32", True),
    }
    assert "forward" not in model.blocks[1].__dict__
    assert model.blocks[0].norm1.eps == 1e-5


# ------------------------------------------------------------------------------------ DDP
class RecordingGuard(StabilityGuard):
    """Writes each rank's decisions, its norm's ε and its W_Q/W_K rows, before the fit-end restore."""

    out_dir = ""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "actions": [(a.step, a.block_name, a.action, a.applied, a.detail, a.heads) for a in self.actions],
            "eps": pl_module.blocks[0].norm1.eps,  # type: ignore[index]
            "qkv": pl_module.blocks[0].attn.qkv.weight.detach().double().flatten().tolist(),  # type: ignore[index]
        }
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
        super().on_fit_end(trainer, pl_module)


@pytest.mark.timeout(240)
@pytest.mark.distributed
def test_ddp_two_processes_take_the_same_action(tmp_path: Path) -> None:
    model = tiny()  # lr = 0: the shrunk embedding stays ε-dominated
    fragile_norm(model)
    fragile_logits(model, 40.0)  # head 0 of block 0 far above τ on every rank's examples
    qkv = model.blocks[0].attn.qkv.weight.detach().clone()
    # step 2 (logged as 1) measures each rank's second batch of 4, from the DistributedSampler Lightning puts
    # on a training loader (shuffled, seed 0, epoch 0)
    data = make_loader(n=32, batch_size=4).dataset
    batches = [list(DistributedSampler(data, num_replicas=2, rank=r, seed=0))[4:8] for r in (0, 1)]
    x = data.tensors[0]  # type: ignore[attr-defined]
    local = [fp32_signals(model, x[b])[0][0] for b in batches]
    guard = RecordingGuard()
    guard.out_dir = str(tmp_path)  # an instance attribute travels to the spawned ranks
    monitor = StabilityMonitor(every_n_steps=2, sample_size=4, precision="bf16", log_per_head=True)
    trainer = Trainer(
        **{**trainer_kwargs(tmp_path, max_steps=4), "devices": 2, "strategy": "ddp_spawn"},
        callbacks=[monitor, guard],
    )
    trainer.fit(model, make_loader(n=32, batch_size=4))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # same decisions, same per-head maxima (max over both ranks' examples), same new ε and the
    # same clipped weights, though each rank measured other examples
    assert ranks[0] == ranks[1]
    first = {a[2]: a for a in ranks[0]["actions"] if a[0] == 1}
    assert {"eps_bump", "qk_clip"} <= set(first) and first["eps_bump"][3] and first["qk_clip"][3]
    heads = first["qk_clip"][5]
    assert len(heads) == H and heads[0] > 100.0 > max(heads[1:])
    # reduced across ranks by max, head by head (not one rank's values)
    assert heads == pytest.approx([max(a, b) for a, b in zip(*local, strict=True)], rel=1e-5)
    assert heads != pytest.approx(local[0], rel=1e-5) and heads != pytest.approx(local[1], rel=1e-5)
    assert "heads [0]" in first["qk_clip"][4]
    assert ranks[0]["eps"] > 1e-5
    clipped = torch.tensor(ranks[0]["qkv"]).reshape(3 * D, D)
    assert not torch.equal(clipped[:DH].float(), qkv[:DH])  # head 0's queries rescaled
    assert torch.equal(clipped[DH:D].float(), qkv[DH:D])  # the other heads' queries untouched


# ------------------------------------------------------------------------------ benchmark
@pytest.mark.timeout(240)
def test_bench_guard_quick_runs(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "bench_guard.py"
    bench = load_script(script)
    out = tmp_path / "guard.json"
    result = bench.main(["--quick", "--reps", "1", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())


def test_defaults_are_the_rule_tables_guard_levels() -> None:
    from lightning_stability.rules.mitigation import GUARDED, MITIGATION

    assert StabilityGuard().levels == GUARDED == {
        "attn_logit_max": 100.0,
        "fp16_headroom": 1.0,
        "rho_ln": 1.0,
        "r_local": 10.0,
    }
    assert StabilityGuard(tau=50.0).levels["attn_logit_max"] == 50.0
    assert set(MITIGATION.values()) == {"qk_clip", "eps_bump", "fp32"}

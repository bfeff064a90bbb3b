"""LNEpsilonBump (Algorithm 1, SPEC §6) on real, tiny Lightning fits.

The norm inputs are built so every number is exact: each token is ``amp·(+1, −1, +1, …)``
with ``amp`` a power of two, so its (biased) variance and its mean square are exactly
``amp²``, and with ``d = 8`` and ``ε_mach = 2⁻⁷`` (BF16) the product ``σ²·d·ε_mach`` is
a power of two; only the division by ``ρ*`` rounds, as it does in the rule itself.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tests.conftest import MemoryLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability.callbacks.ln_eps import LNEpsilonBump

D = 8
AMP = 2.0**-4  # σ² = 2⁻⁸; with d = 8 and ε_mach = 2⁻⁷: σ²·d·ε_mach = 2⁻¹²
BF16 = 2.0**-7
FP32 = 2.0**-23


def sigma2_d_em(amp: float = AMP, d: int = D, em: float = BF16) -> float:
    return amp * amp * d * em


def expected_bump(amp: float = AMP, rho_star: float = 0.6, em: float = BF16) -> float:
    return amp * amp * D * em / rho_star


def alternating(n: int, amps: list[float] | float, tokens: int = 3) -> torch.Tensor:
    """``n`` examples of ``tokens`` tokens, each ``amp·(+1, −1, …)`` (σ² = mean square = amp² exactly)."""
    pattern = torch.tensor([1.0, -1.0] * (D // 2))
    amps_t = torch.tensor(amps if isinstance(amps, list) else [amps] * n, dtype=torch.float32)
    return amps_t[:, None, None] * pattern.expand(n, tokens, D)


class NormNet(LightningModule):
    """``x → norm(x) → Linear``; the norm sees the data itself, so its input variance is known exactly."""

    def __init__(self, norm: nn.Module | None = None, fail_at: int | None = None, **extra: nn.Module) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(D, eps=3e-4)
        for name, module in extra.items():
            self.add_module(name, module)
        self.extra_names = list(extra)
        self.head = nn.Linear(D, 1)
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        for name in self.extra_names:
            h = h + getattr(self, name)(x)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(x: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Any, callbacks: list[Callback], **kw: Any) -> Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        precision="bf16-mixed", num_sanity_val_steps=0,
    )
    args.update(kw)
    return Trainer(callbacks=callbacks, **args)


class Recorder(Callback):
    """The ε attribute of ``pl_module.<attr>`` at every batch start and end (after the bump callback)."""

    def __init__(self, attr: str = "norm") -> None:
        self.attr = attr
        self.start: list[tuple[int, Any]] = []
        self.end: list[tuple[int, Any]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        self.start.append((trainer.global_step, getattr(pl_module, self.attr).eps))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, out: Any, batch: Any,
                           i: int) -> None:
        self.end.append((trainer.global_step, getattr(pl_module, self.attr).eps))


class LiteralLayerNorm(nn.Module):
    """Has an ``eps`` attribute but calls ``F.layer_norm`` with a literal: its ε cannot be changed."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 3e-4)


class NoEpsRMSNorm(nn.Module):
    """RMS-style norm with no ε attribute at all (a literal inside)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 3e-4)


# ---------------------------------------------------------------------------- the rule
def test_band_rho_bumped_to_exact_formula_and_restored(tmp_path: Any) -> None:
    eps0 = 3e-4
    rho = sigma2_d_em() / eps0
    assert 0.6 < rho < 1  # ρ* < ρ < 1: the band where Algorithm 1 acts
    model = NormNet(nn.LayerNorm(D, eps=eps0))
    cb, rec = LNEpsilonBump(every_n_steps=1), Recorder()
    trainer(tmp_path, [cb, rec], max_steps=3).fit(model, loader(alternating(12, AMP)))

    want = expected_bump()  # σ²·d·ε_mach/ρ*, by hand
    assert want > eps0
    assert [v for _, v in rec.end] == [want, want, want]  # bumped at step 1, then ρ = ρ*: stays
    assert cb.current_eps == {"norm": want}
    assert cb.original_eps == {"norm": eps0}
    assert cb.bumped == {"norm"}
    assert model.norm.eps == eps0  # restored at fit end
    cb.restore()
    cb.restore()  # twice: harmless
    assert model.norm.eps == eps0


@pytest.mark.parametrize(
    ("eps0", "amp", "kwargs", "want"),
    [
        pytest.param(2e-4, AMP, {}, 2e-4, id="rho>=1-unchanged"),
        pytest.param(5e-4, AMP, {}, 5e-4, id="rho<=rho*-unchanged"),  # candidate = ε·ρ/ρ* < ε
        pytest.param(3e-4, AMP, {"eps_max": 3.5e-4}, 3.5e-4, id="eps_max-binds"),
        # ρ ≪ ρ* but ε < eps_min: clip(candidate, eps_min, ·) = eps_min > ε, so it is raised
        pytest.param(1e-7, 2.0**-12, {"eps_min": 1e-6}, 1e-6, id="eps_min-binds"),
        pytest.param(3e-4, AMP, {"target_rho": 0.7}, expected_bump(rho_star=0.7), id="rho*=0.7"),
    ],
)
def test_rule_cases(tmp_path: Any, eps0: float, amp: float, kwargs: dict[str, float], want: float) -> None:
    model = NormNet(nn.LayerNorm(D, eps=eps0))
    cb, rec = LNEpsilonBump(every_n_steps=1, restore_on_fit_end=False, **kwargs), Recorder()
    trainer(tmp_path, [cb, rec], max_steps=2).fit(model, loader(alternating(8, amp)))
    assert model.norm.eps == want
    assert [v for _, v in rec.end] == [want, want]
    assert cb.bumped == ({"norm"} if want != eps0 else set())


def test_eps_never_decreases_as_variance_shrinks(tmp_path: Any) -> None:
    # batch k has amplitude AMP·0.8^k: the first is in the band, later candidates are smaller
    amps = [AMP * 0.8 ** (i // 2) for i in range(16)]
    model = NormNet(nn.LayerNorm(D, eps=3e-4))
    cb, rec = LNEpsilonBump(every_n_steps=1, restore_on_fit_end=False), Recorder()
    trainer(tmp_path, [cb, rec], max_steps=8).fit(model, loader(alternating(16, amps), batch_size=2))
    values = [v for _, v in rec.end]
    assert values == [expected_bump()] * 8
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_rms_norm_eps_none_bumped_then_restored_to_none(tmp_path: Any) -> None:
    # 32-true: ε = finfo(float32).eps = 2⁻²³ = ε_mach, so ρ = σ²·d = 2⁻⁵ < ρ*; ε < eps_min → eps_min
    model = NormNet(nn.RMSNorm(D, eps=None))
    cb, rec = LNEpsilonBump(every_n_steps=1), Recorder()
    trainer(tmp_path, [cb, rec], max_steps=2, precision="32-true").fit(model, loader(alternating(8, AMP)))
    assert [v for _, v in rec.end] == [1e-6, 1e-6]
    assert cb.original_eps == {"norm": None}
    assert model.norm.eps is None


def test_third_party_rmsnorm_variance_epsilon(tmp_path: Any) -> None:
    class LlamaLikeRMSNorm(nn.Module):
        def __init__(self, d: int, eps: float) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.variance_epsilon = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = NormNet(LlamaLikeRMSNorm(D, 3e-4))
    cb = LNEpsilonBump(every_n_steps=1, restore_on_fit_end=False)
    trainer(tmp_path, [cb], max_steps=1).fit(model, loader(alternating(4, AMP)))
    assert model.norm.variance_epsilon == expected_bump()  # mean square = σ² here
    cb.restore()
    assert model.norm.variance_epsilon == 3e-4


# ------------------------------------------------------------------- restore / resume
def test_restored_when_fit_raises(tmp_path: Any) -> None:
    model = NormNet(nn.LayerNorm(D, eps=3e-4), fail_at=3)
    cb, rec = LNEpsilonBump(every_n_steps=1), Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [cb, rec], max_steps=5).fit(model, loader(alternating(20, AMP)))
    assert [v for _, v in rec.end] == [expected_bump()] * 3  # it was bumped before the failure
    assert model.norm.eps == 3e-4


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_resume_continues_bumped_and_restores_true_originals(tmp_path: Any) -> None:
    data = alternating(24, AMP)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    model_a = NormNet(nn.LayerNorm(D, eps=3e-4))
    cb1 = LNEpsilonBump(every_n_steps=1, restore_on_fit_end=False)
    trainer(tmp_path, [cb1, ckpt_cb], max_steps=2, enable_checkpointing=True).fit(model_a, loader(data))
    assert model_a.norm.eps == expected_bump()  # kept (restore_on_fit_end=False)
    ckpt = ckpt_cb.best_model_path or ckpt_cb.last_model_path
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("LNEpsilonBump")]
    assert state["original_eps"] == {"norm": 3e-4} and state["current_eps"] == {"norm": expected_bump()}

    # a fresh model: the resumed run goes on with the bumped ε from the first batch
    model_b = NormNet(nn.LayerNorm(D, eps=3e-4))
    cb2, rec2 = LNEpsilonBump(every_n_steps=1), Recorder()
    trainer(tmp_path, [cb2, rec2], max_steps=4).fit(model_b, loader(data), ckpt_path=ckpt)
    assert rec2.start[0] == (2, expected_bump())
    assert cb2.original_eps == {"norm": 3e-4} and cb2.bumped == {"norm"}
    assert model_b.norm.eps == 3e-4

    # the first model still holds the bumped ε: the restore must still put back 3e-4
    cb3 = LNEpsilonBump(every_n_steps=1)
    trainer(tmp_path, [cb3], max_steps=4).fit(model_a, loader(data), ckpt_path=ckpt)
    assert model_a.norm.eps == 3e-4


# ------------------------------------------------------------------- layers selection
def test_include_exclude(tmp_path: Any) -> None:
    def fit(**kw: Any) -> NormNet:
        model = NormNet(nn.LayerNorm(D, eps=3e-4), other=nn.LayerNorm(D, eps=3e-4))
        cb = LNEpsilonBump(every_n_steps=1, restore_on_fit_end=False, **kw)
        trainer(tmp_path, [cb], max_steps=1).fit(model, loader(alternating(4, AMP)))
        return model

    only = fit(include=["oth*"])
    assert (only.norm.eps, only.other.eps) == (3e-4, expected_bump())
    but = fit(exclude=["oth*"])
    assert (but.norm.eps, but.other.eps) == (expected_bump(), 3e-4)


def test_literal_eps_norms_reported_once_and_untouched(tmp_path: Any) -> None:
    model = NormNet(nn.LayerNorm(D, eps=3e-4), lit=LiteralLayerNorm(D), noeps=NoEpsRMSNorm(D))
    cb = LNEpsilonBump(every_n_steps=1, restore_on_fit_end=False)
    with pytest.warns(UserWarning, match=r"cannot be changed") as record:
        trainer(tmp_path, [cb], max_steps=2).fit(model, loader(alternating(8, AMP)))
    msgs = [str(w.message) for w in record if "cannot be changed" in str(w.message)]
    assert len(msgs) == 1 and "'lit'" in msgs[0] and "'noeps'" in msgs[0]
    assert cb.unchangeable == ["lit", "noeps"]
    assert model.lit.eps == 1e-5 and not hasattr(model.noeps, "eps")
    assert model.norm.eps == expected_bump()
    assert set(cb.current_eps) == {"norm"}


# ----------------------------------------------------------------------------- ε_mach
@pytest.mark.parametrize(
    ("precision", "override", "want"),
    [
        ("bf16-mixed", None, BF16),
        ("16-mixed", None, BF16),  # on CPU Lightning trains 16-mixed in bfloat16
        ("32-true", None, FP32),
        ("bf16-mixed", 1e-3, 1e-3),
        ("32-true", 1e-3, 1e-3),
    ],
)
def test_eps_mach_default_and_override(tmp_path: Any, precision: str, override: float | None,
                                       want: float) -> None:
    model = NormNet(nn.LayerNorm(D, eps=3e-4))
    cb = LNEpsilonBump(every_n_steps=1, eps_mach=override, restore_on_fit_end=False)
    trainer(tmp_path, [cb], max_steps=1, precision=precision).fit(model, loader(alternating(4, AMP)))
    assert cb.resolved_eps_mach == want
    rho = sigma2_d_em(em=want) / 3e-4
    new = min(max(sigma2_d_em(em=want) / 0.6, 1e-6), 1e-2)
    assert model.norm.eps == (new if rho < 1 and new > 3e-4 else 3e-4)
    # BF16: ρ ≈ 0.81, bumped; FP32 ε_mach (2⁻²³): ρ ≈ 1.2e-5 but the candidate is below ε, unchanged
    assert (model.norm.eps != 3e-4) == (want == BF16)


# ------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_rho": 2}, "target_rho"),
        ({"target_rho": 0.0}, "target_rho"),
        ({"eps_min": 1e-3, "eps_max": 1e-3}, "eps_max"),
        ({"eps_min": 1e-2, "eps_max": 1e-3}, "eps_max"),
        ({"eps_min": 0.0}, "eps_min"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"sample_size": 0}, "sample_size"),
        ({"eps_mach": 1.5}, "eps_mach"),
        ({"include": "norm"}, "include"),
        ({"exclude": []}, "exclude"),
        ({"restore_on_fit_end": "yes"}, "restore_on_fit_end"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        LNEpsilonBump(**kwargs)


def test_arguments_settable_from_cli_parser() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LNEpsilonBump, "bump")
    cfg = parser.parse_args(["--bump.eps_mach=0.001", "--bump.include=[blocks.*]", "--bump.target_rho=0.5",
                             "--bump.restore_on_fit_end=false"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    cb = instantiate(cfg).bump
    assert (cb.eps_mach, cb.include, cb.target_rho, cb.restore_on_fit_end) == (1e-3, ["blocks.*"], 0.5, False)


# -------------------------------------------------------------------------- logging
def test_logged_exactly_at_bump_steps_once_per_global_step(tmp_path: Any) -> None:
    logger = MemoryLogger()
    model = NormNet(nn.LayerNorm(D, eps=3e-4))
    cb = LNEpsilonBump(every_n_steps=2)
    trainer(tmp_path, [cb], max_steps=6, logger=logger, accumulate_grad_batches=2, log_every_n_steps=1).fit(
        model, loader(alternating(48, AMP), batch_size=2))
    logged = [(step, m) for step, m in logger.records if any(k.startswith("ln_eps/") for k in m)]
    assert logged == [
        (2, {"ln_eps/norm": expected_bump(), "ln_eps/bumped_layers": 1.0}),
        (4, {"ln_eps/bumped_layers": 1.0}),
        (6, {"ln_eps/bumped_layers": 1.0}),
    ]


# ----------------------------------------------------------------- side-effect free
class TinyEncoder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True, layer_norm_eps=1e-9)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.layer(self.embed(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _seeded_fit(tmp_path: Any, callbacks: list[Callback]) -> tuple[TinyEncoder, torch.Tensor]:
    seed_everything(7, verbose=False)
    model = TinyEncoder()
    data = torch.randn(24, 5, D)
    trainer(tmp_path, callbacks, max_steps=4).fit(model, loader(data))
    return model, torch.rand(3)  # the global RNG stream after the fit


def test_no_bump_is_bitwise_side_effect_free_and_composes_with_monitor(tmp_path: Any) -> None:
    from lightning_stability.callbacks.monitor import StabilityMonitor

    base, rng0 = _seeded_fit(tmp_path, [])
    cb = LNEpsilonBump(every_n_steps=1)
    with_cb, rng1 = _seeded_fit(tmp_path, [cb])
    assert cb.bumped == set() and cb._last_step == 4  # it measured (ρ ≥ 1 everywhere) and changed nothing
    monitor, cb2 = StabilityMonitor(every_n_steps=1), LNEpsilonBump(every_n_steps=1)
    both, rng2 = _seeded_fit(tmp_path, [monitor, cb2])
    assert monitor.last_report is not None and cb2._last_step == 4
    for model, rng in ((with_cb, rng1), (both, rng2)):
        assert list(base.state_dict()) == list(model.state_dict())
        for name, p0 in base.state_dict().items():
            assert torch.equal(p0, model.state_dict()[name]), name
        assert torch.equal(rng0, rng)
        assert model.training
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks

"""StabilityMonitor on a transformers model inside Lightning, and under DDP (2 CPU processes)."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from tests.conftest import TinyTransformer, make_loader, trainer_kwargs
from torch.utils.data import DataLoader

from lightning_stability import ProbeOptions, StabilityMonitor
from lightning_stability.metrics import RawKey

transformers = pytest.importorskip("transformers")


class TinyGPT(LightningModule):
    def __init__(self, impl: str) -> None:
        super().__init__()
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=40)
        self.lm = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.lm(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gpt2_dict_batches_with_padding(tmp_path: Path, impl: str) -> None:
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(8):
        ids = torch.randint(0, 40, (12,), generator=gen)
        mask = torch.ones(12, dtype=torch.long)
        mask[: i % 4] = 0  # left padding of varying length
        items.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    torch.manual_seed(0)
    model = TinyGPT(impl)
    monitor = StabilityMonitor(every_n_steps=1, sample_size=3, log_per_head=True)
    Trainer(**trainer_kwargs(tmp_path, max_steps=2, precision="bf16-mixed"), callbacks=[monitor]).fit(
        model, DataLoader(items, batch_size=4)
    )
    report = monitor.last_report
    assert report is not None and [b.name for b in report.blocks] == [
        "lm.transformer.h.0",
        "lm.transformer.h.1",
    ]
    for block in report.blocks:
        assert block.kappa_softmax is not None and math.isfinite(block.kappa_softmax)
        assert block.r_block is not None and 0 < block.r_block < 0.1
        assert len(block.per_head["kappa_softmax"]) == 4
        assert max(block.per_head["kappa_softmax"]) == pytest.approx(block.kappa_softmax)
    assert "stability/block1/head3/kappa_v" in report.metrics()


class RecordingMonitor(StabilityMonitor):
    """Writes each rank's local (pre-reduction) values next to the reduced ones."""

    out_dir = ""

    def _reduce(self, trainer: Trainer, raw: Any) -> dict[RawKey, float]:  # type: ignore[override]
        keys, vec = raw.flat()
        reduced = StabilityMonitor._reduce(trainer, raw)
        path = Path(self.out_dir) / f"rank{trainer.global_rank}_step{trainer.global_step}.pkl"
        local = dict(zip(keys, vec.tolist(), strict=True))
        path.write_bytes(pickle.dumps({"local": local, "reduced": reduced}))
        return reduced


@pytest.mark.distributed
def test_ddp_two_processes_reduce_across_ranks(tmp_path: Path) -> None:
    monitor = RecordingMonitor(every_n_steps=2, sample_size=4, probe=ProbeOptions(batch_reduction="mean"))
    monitor.out_dir = str(tmp_path)  # an instance attribute travels to the spawned ranks
    trainer = Trainer(
        **{
            **trainer_kwargs(tmp_path, max_steps=2, logger=CSVLogger(str(tmp_path), name="ddp")),
            "devices": 2,
            "strategy": "ddp_spawn",
        },
        callbacks=[monitor],
    )
    trainer.fit(TinyTransformer(), make_loader(n=32, batch_size=4))
    ranks = [pickle.loads((tmp_path / f"rank{r}_step2.pkl").read_bytes()) for r in (0, 1)]
    local = [r["local"] for r in ranks]
    ksm_max = RawKey("kappa_softmax_max")
    assert local[0][ksm_max] != local[1][ksm_max]  # different samples per rank
    for rank in ranks:  # every rank ends with the same reduced numbers
        assert rank["reduced"] == ranks[0]["reduced"]
    reduced = ranks[0]["reduced"]
    assert reduced[ksm_max] == max(v[ksm_max] for v in local)
    token_sum = RawKey("token_sum", 1, metric="r_block_mean_token")
    token_count = RawKey("token_count", 1, metric="r_block_mean_token")
    for key in (RawKey("err_sq", 0, metric="r_block"), RawKey("err_sq", 1, metric="r_local"), token_sum):
        assert reduced[key] == pytest.approx(sum(v[key] for v in local))
    assert reduced[token_count] == 2 * local[0][token_count]
    norm = RawKey("variance", module="blocks.0.norm1")
    assert reduced[norm] == min(v[norm] for v in local)
    with open(next((tmp_path / "ddp").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("stability/kappa_softmax_max")]
    assert len(logged) == 1 and float(logged[0]["step"]) == 1  # global_step 2, logged at Lightning's step 1
    assert float(logged[0]["stability/kappa_softmax_max"]) == pytest.approx(
        reduced[ksm_max], rel=1e-6
    )
    err_sq, ref_sq = (reduced[RawKey(part, 1, metric="r_block")] for part in ("err_sq", "ref_sq"))
    assert float(logged[0]["stability/block1/r_block"]) == pytest.approx(math.sqrt(err_sq / ref_sq))
    # batch_reduction="mean" is exact under DDP: the mean over both ranks' 8 examples
    for name in ("kappa_score", "kappa_softmax", "kappa_v"):
        key = RawKey("example_sum", 1, call=0, metric=name)
        assert reduced[RawKey("example_count", 1, call=0)] == 8
        mean = sum(v[key] for v in local) / 8
        assert float(logged[0][f"stability/block1/{name}"]) == pytest.approx(mean, rel=1e-6)
        # the mean over tokens is exact under DDP: pooled token sums over pooled counts
    pooled = reduced[token_sum] / reduced[token_count]
    assert float(logged[0]["stability/r_block_mean_token"]) == pytest.approx(pooled, rel=1e-6)
    err_sq, ref_sq = (reduced[RawKey(part, 1, metric="r_local")] for part in ("err_sq", "ref_sq"))
    assert float(logged[0]["stability/block1/r_local"]) == pytest.approx(math.sqrt(err_sq / ref_sq), rel=1e-6)


class FailsOnRankOne(TinyTransformer):
    """Raises inside the monitor's passes (eval mode) on rank 1 only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.global_rank == 1:
            raise RuntimeError("rank 1 cannot measure")
        return super().forward(x)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_one_rank_failing_skips_the_step_on_all_ranks_without_hanging(tmp_path: Path) -> None:
    monitor = StabilityMonitor(every_n_steps=1, sample_size=2)
    trainer = Trainer(
        **{
            **trainer_kwargs(tmp_path, max_steps=2, logger=CSVLogger(str(tmp_path), name="fail")),
            "devices": 2,
            "strategy": "ddp_spawn",
        },
        callbacks=[monitor],
    )
    trainer.fit(FailsOnRankOne(), make_loader(n=16, batch_size=4))  # returns: no rank waits forever
    # every rank skipped both steps together: nothing of the monitor's was logged
    assert all("stability/" not in p.read_text() for p in (tmp_path / "fail").rglob("metrics.csv"))

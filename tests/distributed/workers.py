"""Training runs on 2 real processes, launched by ``torch.distributed.run`` from the distributed tests.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/workers.py \
        SCENARIO[,SCENARIO...] OUT_DIR

Each scenario fits a tiny model under Lightning's ``ModelParallelStrategy`` (FSDP2 and/or tensor
parallel, gloo on CPU) with a :class:`Recorder` monitor that writes, at every sampled step, the
full FP32 parameters it measured (``params_<scenario>_step<s>.pt``), each rank's sampled inputs
(``inputs_<scenario>_rank<r>_step<s>.pt``) and each rank's local and reduced raw values and logged
metrics (``<scenario>_rank<r>.json``). The tests rebuild the same model unsharded in one
process and compare. Importing this module does nothing (pytest collects it for doctests).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
#: Examples per rank and step; each rank trains on its own fixed slice of the data.
BATCH = 4
SAMPLE = 3


# --------------------------------------------------------------------------- models
def tiny_transformer(**kw: Any) -> Any:
    from tests.conftest import TinyTransformer

    torch.manual_seed(0)
    return TinyTransformer(**kw)


class Attention(nn.Module):
    """Separate Q/K/V projections (a tensor-parallel plan shards them column-wise)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            p(x).reshape(b, n, -1, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(d, eps=1e-5)
        self.attention = Attention(d, heads)
        self.ffn_norm = nn.RMSNorm(d, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.ffn_norm(x))


def lightning_base() -> type:
    from lightning.pytorch import LightningModule

    return LightningModule


def tp_hand_written(parallel: bool = True) -> Any:
    """A pre-RMSNorm Transformer whose attention and MLP a tensor-parallel plan shards."""
    from tests.conftest import make_loader

    class TPModel(lightning_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(8, 32)
            self.layers = nn.ModuleList(Layer(32, 4) for _ in range(2))
            self.norm = nn.RMSNorm(32)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            for layer in self.layers:
                x = layer(x)
            return self.head(self.norm(x).mean(1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

        def configure_model(self) -> None:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            if not parallel:
                return
            plan = {f"attention.{p}_proj": ColwiseParallel() for p in "qkv"}
            plan |= {
                "attention.o_proj": RowwiseParallel(),
                "mlp.0": ColwiseParallel(),
                "mlp.2": RowwiseParallel(),
            }
            for layer in self.layers:
                parallelize_module(layer, self.device_mesh["tensor_parallel"], plan)

        def loader(self, rank: int) -> Any:
            return make_loader(n=4 * BATCH, batch_size=BATCH)  # tensor parallel: every rank the same data

    return TPModel()


# --------------------------------------------------------------------------- recording
def full_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value (a collective under sharding: every rank calls it)."""
    from lightning_stability.capture.sharding import is_dtensor

    return {
        name: (p.detach().full_tensor() if is_dtensor(p) else p.detach()).clone()
        for name, p in module.named_parameters()
    }


def recorder(scenario: str, out: Path, **kw: Any) -> Any:
    from lightning_stability import StabilityMonitor

    class Recorder(StabilityMonitor):
        """Writes what it measured: parameters, inputs, local and reduced values, logged metrics."""

        rows: list[dict[str, Any]]

        def _measure_locally(self, trainer: Any, pl_module: Any, args: Any, kwargs: Any) -> Any:
            step, rank = trainer.global_step, trainer.global_rank
            params = full_parameters(pl_module)
            if rank == 0:
                torch.save(params, out / f"params_{scenario}_step{step}.pt")
            torch.save((args, kwargs), out / f"inputs_{scenario}_rank{rank}_step{step}.pt")
            return super()._measure_locally(trainer, pl_module, args, kwargs)

        @staticmethod
        def _reduce(trainer: Any, raw: Any) -> Any:
            keys, vec = raw.flat()
            reduced = StabilityMonitor._reduce(trainer, raw)
            Recorder.rows.append(
                {
                    "step": trainer.global_step,
                    "local": {repr(k): v for k, v in zip(keys, vec.tolist(), strict=True)},
                    "reduced": {repr(k): v for k, v in reduced.items()},
                }
            )
            return reduced

    Recorder.rows = []
    return Recorder(**kw)


def fit(
    model: Any, scenario: str, out: Path, monitor: Any, strategy: Any, **trainer_kw: Any
) -> dict[str, Any]:
    """Fit on this rank's fixed slice of the data; return what the monitor recorded."""
    from lightning.pytorch import Trainer
    from tests.conftest import MemoryLogger

    rank = int(os.environ["RANK"])  # set by torch.distributed.run
    logger = MemoryLogger()
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(out),
        callbacks=[monitor] if monitor is not None else [],
    )
    kw.update(trainer_kw)
    loader = model.loader(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(**kw).fit(model, loader)
    texts = [str(w.message) for w in caught if "StabilityMonitor" in str(w.message)]
    rows = type(monitor).rows if monitor is not None else []
    metrics = [
        {"step": s, "metrics": m} for s, m in logger.records if any(k.startswith("stability/") for k in m)
    ]
    names = (
        [b.name for b in monitor.last_report.blocks] if monitor is not None and monitor.last_report else []
    )
    return {
        "rows": rows,
        "metrics": metrics,
        "warnings": texts,
        "block_names": names,
        "final": full_parameters(model),
    }


def model_parallel(dp: int, tp: int) -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)


# --------------------------------------------------------------------------- scenarios
def _hand_written(mp_policy: Any = None, checkpoint: bool = False) -> Any:
    from tests.conftest import TinyTransformer, make_loader
    from torch.distributed.fsdp import fully_shard

    class Sharded(TinyTransformer):
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            extra = {} if mp_policy is None else {"mp_policy": mp_policy}
            if checkpoint:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                for i, block in enumerate(self.blocks):
                    self.blocks[i] = checkpoint_wrapper(block)
            for block in self.blocks:
                fully_shard(block, mesh=mesh, **extra)
            fully_shard(self, mesh=mesh, **extra)

        def loader(self, rank: int) -> Any:
            full = make_loader(n=4 * BATCH, batch_size=BATCH)
            x, y = full.dataset.tensors
            part = torch.utils.data.TensorDataset(x[rank::2], y[rank::2])
            return torch.utils.data.DataLoader(part, batch_size=BATCH)

    torch.manual_seed(0)
    return Sharded(d=32, heads=4, depth=2)


def scenario_fsdp2(out: Path) -> dict[str, Any]:
    """Hand-written model, FSDP2 on both ranks, bf16-mixed, residual gains; and the same fit unmonitored."""
    from lightning_stability.callbacks.options import ProbeOptions

    kw = dict(every_n_steps=1, sample_size=SAMPLE, probe=ProbeOptions(residual_gain_iters=2))
    with_monitor = fit(
        _hand_written(),
        "fsdp2",
        out,
        recorder("fsdp2", out, **kw),
        model_parallel(2, 1),
        precision="bf16-mixed",
    )
    without = fit(_hand_written(), "fsdp2", out, None, model_parallel(2, 1), precision="bf16-mixed")
    same = all(torch.equal(with_monitor["final"][k], without["final"][k]) for k in without["final"])
    return {**with_monitor, "same_training": same}


def scenario_fsdp2_mp(out: Path) -> dict[str, Any]:
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16), 32-true; r_block also with the BF16 reference."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import lightning_stability.capture.side_forward as side
    from lightning_stability.metrics import RawKey

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    monitor = recorder("fsdp2_mp", out, every_n_steps=1, sample_size=SAMPLE)
    wrong: list[float] = []
    measure_locally = type(monitor)._measure_locally

    def both(self: Any, trainer: Any, pl_module: Any, args: Any, kwargs: Any) -> Any:
        raw = measure_locally(self, trainer, pl_module, args, kwargs)
        kept, side.fp32_all_gather = side.fp32_all_gather, lambda model: nullcontext()
        try:  # the same measurement with FSDP2 all-gathering BF16 in the "exact" pass
            bad = self._probe.measure(args, kwargs, lambda: self._low_precision(trainer, pl_module))
        finally:
            side.fp32_all_gather = kept
        err, ref = (bad.values[RawKey(name, 1, metric="r_block")] for name in ("err_sq", "ref_sq"))
        wrong.append(float(err) / float(ref))
        return raw

    type(monitor)._measure_locally = both
    result = fit(
        _hand_written(policy),
        "fsdp2_mp",
        out,
        monitor,
        model_parallel(2, 1),
        precision="32-true",
        max_steps=1,
    )
    return {**result, "wrong_r_block_sq": wrong}


def scenario_fsdp2_checkpoint(out: Path) -> dict[str, Any]:
    """FSDP2 over checkpoint_wrapper'd blocks (activation checkpointing), bf16-mixed."""
    monitor = recorder("fsdp2_checkpoint", out, every_n_steps=1, sample_size=SAMPLE)
    return fit(
        _hand_written(checkpoint=True),
        "fsdp2_checkpoint",
        out,
        monitor,
        model_parallel(2, 1),
        precision="bf16-mixed",
        max_steps=1,
    )


def llama_config() -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


def llama_module() -> Any:
    """The unsharded Llama of the scenarios (for the one-process reference)."""
    return _llama("none")


def _llama(plan: str) -> Any:
    import transformers
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    class Llama(lightning_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lm = transformers.LlamaForCausalLM._from_config(llama_config(), attn_implementation="sdpa")

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids).logits

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.lm(**batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def configure_model(self) -> None:
            layers = self.lm.model.layers
            if plan == "none":
                return
            if plan == "fsdp2":
                mesh = self.device_mesh["data_parallel"]
                for layer in layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.lm, mesh=mesh)  # the root training_step calls
                return
            mesh = self.device_mesh["tensor_parallel"]
            for layer in layers:
                parallelize_module(
                    layer,
                    mesh,
                    {
                        "self_attn.q_proj": ColwiseParallel(),
                        "self_attn.k_proj": ColwiseParallel(),
                        "self_attn.v_proj": ColwiseParallel(),
                        "self_attn.o_proj": RowwiseParallel(),
                        "mlp.gate_proj": ColwiseParallel(),
                        "mlp.up_proj": ColwiseParallel(),
                        "mlp.down_proj": RowwiseParallel(),
                    },
                )

        def loader(self, rank: int) -> Any:
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 64, (4 * BATCH, 12), generator=gen)
            if plan == "fsdp2":
                ids = ids[rank::2]
            items = [{"input_ids": i, "labels": i} for i in ids]
            return torch.utils.data.DataLoader(items, batch_size=BATCH)

    return Llama()


def scenario_fsdp2_llama(out: Path) -> dict[str, Any]:
    """transformers Llama (GQA, RMSNorm, SwiGLU) from a config, each decoder layer and the root sharded."""
    monitor = recorder("fsdp2_llama", out, every_n_steps=1, sample_size=SAMPLE)
    return fit(_llama("fsdp2"), "fsdp2_llama", out, monitor, model_parallel(2, 1), precision="bf16-mixed")


def scenario_tp_llama(out: Path) -> dict[str, Any]:
    """transformers Llama with attention and MLP projections column/row-wise parallel over 2 ranks."""
    monitor = recorder("tp_llama", out, every_n_steps=1, sample_size=SAMPLE)
    return fit(_llama("tp"), "tp_llama", out, monitor, model_parallel(1, 2), precision="bf16-mixed")


def scenario_tp_hand_written(out: Path) -> dict[str, Any]:
    """Hand-written model, attention and MLP column/row-wise parallel over 2 ranks, per-head values."""
    from lightning_stability.callbacks.options import ProbeOptions

    kw = dict(
        every_n_steps=1, sample_size=SAMPLE, log_per_head=True, probe=ProbeOptions(batch_reduction="mean")
    )
    monitor = recorder("tp_hand_written", out, **kw)
    return fit(
        tp_hand_written(), "tp_hand_written", out, monitor, model_parallel(1, 2), precision="bf16-mixed"
    )


SCENARIOS = {
    "fsdp2": scenario_fsdp2,
    "fsdp2_mp": scenario_fsdp2_mp,
    "fsdp2_checkpoint": scenario_fsdp2_checkpoint,
    "fsdp2_llama": scenario_fsdp2_llama,
    "tp_llama": scenario_tp_llama,
    "tp_hand_written": scenario_tp_hand_written,
}


def main(names: str, out_dir: str) -> None:
    from lightning_stability.capture.sharding import GATHERED

    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    for name in names.split(","):
        GATHERED.reset()
        try:
            result = SCENARIOS[name](out)
            result.pop("final", None)
            result["gathered_peak_bytes"] = GATHERED.peak
        except Exception:
            result = {"error": traceback.format_exc()}
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(result, default=str))
    if torch.distributed.is_initialized():  # an open gloo group can abort the interpreter's exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1], sys.argv[2])

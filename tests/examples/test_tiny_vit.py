"""Tests of the Tiny-ViT example: model structure, CIFAR-10 loading, synthetic data, the CLI entry."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import tiny_vit
from tiny_vit import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    TinyViT,
    load_cifar10,
    make_synthetic_cifar,
)

CONFIG_DIR = Path(tiny_vit.__file__).resolve().parent / "configs"


# --------------------------------------------------------------------------- model


def test_forward_shapes_and_tokens():
    model = TinyViT(d_model=32, depth=2, n_heads=4, mlp_ratio=2)
    assert model.num_tokens == 65  # 8x8 patches of 4x4 + CLS
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert logits.dtype == torch.float32


def test_module_names_match_the_instrumented_layout():
    d, depth = 32, 2
    model = TinyViT(d_model=d, depth=depth, n_heads=4, mlp_ratio=4)
    names = dict(model.named_modules())
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == depth
    for i in range(depth):
        p = f"blocks.{i}"
        assert isinstance(names[f"{p}.norm1"], torch.nn.LayerNorm)
        assert isinstance(names[f"{p}.norm2"], torch.nn.LayerNorm)
        qkv, proj = names[f"{p}.attn.qkv"], names[f"{p}.attn.proj"]
        assert (qkv.in_features, qkv.out_features) == (d, 3 * d)
        assert (proj.in_features, proj.out_features) == (d, d)
        assert (names[f"{p}.mlp.fc1"].in_features, names[f"{p}.mlp.fc1"].out_features) == (d, 4 * d)
        assert (names[f"{p}.mlp.fc2"].in_features, names[f"{p}.mlp.fc2"].out_features) == (4 * d, d)
    assert isinstance(names["norm"], torch.nn.LayerNorm)
    assert names["head"].out_features == 10


def test_attention_calls_sdpa_with_bhnd_layout(monkeypatch):
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape, k.shape, v.shape))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = TinyViT(d_model=32, depth=2, n_heads=4)
    model(torch.randn(2, 3, 32, 32))
    assert seen == [(torch.Size([2, 4, 65, 8]),) * 3] * 2


def test_block_is_pre_ln_residual():
    torch.manual_seed(0)
    block = TinyViT(d_model=32, depth=1, n_heads=4).blocks[0]
    x = torch.randn(2, 65, 32)
    h = x + block.attn(block.norm1(x))
    expected = h + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x), expected)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        TinyViT(d_model=30, n_heads=4)


def test_bf16_autocast_forward_on_cpu():
    model = TinyViT(d_model=32, depth=1, n_heads=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits.float()).all()


# --------------------------------------------------------------------------- CIFAR-10 files


def _write_fake_cifar(root: Path, rng: np.random.Generator) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 10)]:
        entry = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        batches[name] = entry
    return batches


@pytest.mark.parametrize("subfolder", [False, True])
def test_load_cifar10_reads_python_batches(tmp_path, subfolder):
    batches = _write_fake_cifar(tmp_path, np.random.default_rng(0))
    data_dir = tmp_path / "cifar-10-batches-py" if subfolder else tmp_path
    (train_x, train_y), (test_x, test_y) = load_cifar10(data_dir)
    assert train_x.shape == (40, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (10, 3, 32, 32) and test_x.dtype == torch.uint8
    assert train_y.dtype == torch.long and train_y.shape == (40,)
    expected_y = batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
    assert train_y.tolist() == expected_y
    assert test_y.tolist() == batches["test_batch"][b"labels"]
    # CIFAR row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major.
    row = batches["data_batch_2"][b"data"][3]
    c, i, j = 2, 5, 17
    assert int(train_x[20 + 3, c, i, j]) == int(row[c * 1024 + i * 32 + j])


def test_datamodule_normalizes_real_data(tmp_path):
    batches = _write_fake_cifar(tmp_path, np.random.default_rng(1))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8)
    dm.setup("fit")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10
    image, label = dm.train_set[0]
    raw = torch.as_tensor(batches["data_batch_1"][b"data"][0]).float().view(3, 32, 32) / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (raw - mean) / std)
    assert int(label) == batches["data_batch_1"][b"labels"][0]
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long
    assert labels.tolist() == batches["test_batch"][b"labels"][:8]


def test_missing_cifar_files_error_names_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")
    _write_fake_cifar(tmp_path, np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_cifar10(tmp_path)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_data_is_deterministic():
    x1, y1 = make_synthetic_cifar(96, seed=3)
    x2, y2 = make_synthetic_cifar(96, seed=3)
    assert x1.shape == (96, 3, 32, 32) and x1.dtype == torch.float32
    assert y1.dtype == torch.long and int(y1.min()) >= 0 and int(y1.max()) < 10
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = make_synthetic_cifar(96, seed=4)
    assert not torch.equal(x1, x3)
    assert 0.5 < float(x1.std()) < 2.0  # roughly normalized like CIFAR after mean/std


def test_synthetic_datamodule_split_is_deterministic():
    a, b = CIFAR10DataModule(synthetic_size=256, seed=5), CIFAR10DataModule(synthetic_size=256, seed=5)
    a.setup("fit")
    b.setup("fit")
    assert len(a.train_set) == 224 and len(a.val_set) == 32
    for sa, sb in [(a.train_set, b.train_set), (a.val_set, b.val_set)]:
        for ta, tb in zip(sa.tensors, sb.tensors, strict=True):
            assert torch.equal(ta, tb)
    # the shuffle order is seeded too
    ya = torch.cat([y for _, y in a.train_dataloader()])
    yb = torch.cat([y for _, y in b.train_dataloader()])
    assert torch.equal(ya, yb)


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_synthetic_data_is_learnable(tmp_path):
    L.seed_everything(0)
    recorder = _LossRecorder()
    model = TinyViT(d_model=32, depth=2, n_heads=4, lr=3e-3, warmup_steps=3)
    dm = CIFAR10DataModule(batch_size=32, synthetic_size=512, seed=0)
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    losses = recorder.losses
    assert len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 2.0  # chance level is ln(10) = 2.30
    assert last < 0.75 * first, losses


# --------------------------------------------------------------------------- CLI entry


def small_config(tmp_path: Path, name: str) -> Path:
    """The shipped config (callbacks included), with a tiny model, logging under tmp_path."""
    config = yaml.safe_load((CONFIG_DIR / name).read_text())
    callbacks = config["trainer"]["callbacks"]
    assert {c["class_path"] for c in callbacks} <= {
        "lightning_stability.StabilityMonitor",
        "lightning_stability.LNEpsilonBump",
    }
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["model"].update(d_model=32, depth=1)
    config["data"].update(synthetic_size=128, batch_size=16)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def clean_argv(monkeypatch):
    """LightningCLI warns when ``args`` is given while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["tiny_vit.py"])


@pytest.mark.usefixtures("clean_argv")
@pytest.mark.parametrize("name", ["tiny_vit.yaml", "tiny_vit_bf16.yaml", "tiny_vit_fp16_whatif.yaml"])
def test_cli_fit_with_shipped_config(tmp_path, capsys, name):
    config_path = small_config(tmp_path, name)
    cli = tiny_vit.main(
        [
            "fit",
            f"--config={config_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    assert cli.trainer.global_step == 2
    expected_precision = "bf16-mixed" if "bf16" in name else "32-true"
    assert cli.trainer.precision == expected_precision
    run_name = name.removesuffix(".yaml")
    log_root = tmp_path / "runs" / run_name
    log_dir = log_root / "version_0"
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {log_root}" in out
    assert str(log_dir) in out
    # the run ends with the next command: the report, runnable as printed
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().endswith(f"report {log_root}"))
    assert line.split(" report ")[0] in {tiny_vit.report_command(), "lightning-stability"}


@pytest.mark.usefixtures("clean_argv")
def test_cli_callbacks_override_on_command_line(tmp_path, capsys):
    cli = tiny_vit.main(
        [
            "fit",
            "--model.d_model=32",
            "--model.depth=1",
            "--data.synthetic_size=64",
            "--data.batch_size=16",
            "--trainer.callbacks=[]",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.d_model == 32
    assert "tensorboard" not in capsys.readouterr().out  # no TensorBoard logger, no hint

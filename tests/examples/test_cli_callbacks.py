"""Both callbacks through LightningCLI (YAML and command line), and their TensorBoard curves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_tiny_vit import small_config

import tiny_vit
from lightning_stability import LNEpsilonBump, StabilityMonitor

SMALL = [
    "--model.d_model=32",
    "--model.depth=2",
    "--data.synthetic_size=64",
    "--data.batch_size=8",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["tiny_vit.py"])


def test_tensorboard_curves_of_the_main_config(tmp_path: Path) -> None:
    config = small_config(tmp_path, "tiny_vit_bf16.yaml")
    cli = tiny_vit.main(
        [
            "fit",
            f"--config={config}",
            "--trainer.max_steps=10",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
        ]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, StabilityMonitor))
    bump = next(c for c in cli.trainer.callbacks if isinstance(c, LNEpsilonBump))
    assert (monitor.every_n_steps, monitor.sample_size, bump.target_rho, bump.eps_max) == (5, 16, 0.6, 1e-2)
    events = EventAccumulator(str(cli.trainer.logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "stability/r_block",
        "stability/kappa_softmax_max",
        "stability/predictor_scaled",
        "stability/eps_mach",
        "stability/alarm",
        "ln_eps/bumped_layers",
    }
    expected |= {f"stability/block{i}/{n}" for i in (0,) for n in ("kappa_softmax", "r_block", "rho_ln")}
    assert expected <= tags
    for tag in expected:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [5, 10], tag
        assert all(math.isfinite(s.value) for s in scalars), tag
    assert events.Scalars("stability/eps_mach")[0].value == 2.0**-7
    # the custom-scalars layout: one multi-line chart per diagnostic across blocks
    assert "custom_scalars__config__" in events.Tags()["tensors"]


def test_command_line_short_names_and_values(tmp_path: Path) -> None:
    cli = tiny_vit.main(
        [
            "fit",
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.callbacks+=StabilityMonitor",
            "--trainer.callbacks.every_n_steps=1",
            "--trainer.callbacks.head_reduction=sum",
            "--trainer.callbacks.blocks=[blocks.1]",
            "--trainer.callbacks+=LNEpsilonBump",
            "--trainer.callbacks.target_rho=0.5",
            "--trainer.callbacks.exclude=[norm]",
        ]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, StabilityMonitor))
    bump = next(c for c in cli.trainer.callbacks if isinstance(c, LNEpsilonBump))
    assert (monitor.every_n_steps, monitor.head_reduction, monitor.blocks) == (1, "sum", ["blocks.1"])
    assert bump.target_rho == 0.5 and bump.exclude == ["norm"]
    assert monitor.last_report is not None and [b.name for b in monitor.last_report.blocks] == ["blocks.1"]


def test_bad_literal_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny_vit.main(
            [
                "fit",
                *SMALL,
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.callbacks+=StabilityMonitor",
                "--trainer.callbacks.head_reduction=median",
            ]
        )
    assert exit_info.value.code == 2
    assert "head_reduction" in capsys.readouterr().err


def test_bad_number_in_yaml_fails_before_training(tmp_path: Path) -> None:
    config = yaml.safe_load(small_config(tmp_path, "tiny_vit_bf16.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"]["target_rho"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    # jsonargparse reports the callback's MisconfigurationException while parsing
    with pytest.raises(
        (MisconfigurationException, ValueError), match=r"`target_rho` must be a number in \(0.0, 1.0\), got 2"
    ):
        tiny_vit.main(["fit", f"--config={path}"])
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # nothing trained, nothing logged

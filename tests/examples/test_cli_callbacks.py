"""Both callbacks through LightningCLI (YAML and command line), and their TensorBoard curves."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
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
    config = small_config(tmp_path, "tiny_vit.yaml")
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
    assert (cli.trainer.precision, monitor.precision, bump.eps_mach) == ("32-true", "bf16", 2.0**-7)
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
        # measured after optimizer steps 5 and 10: the monitor logs at Lightning's steps for those
        # batches (4, 9, where train/loss is); an ε set after step N applies from step N on
        assert [s.step for s in scalars] == ([5, 10] if tag.startswith("ln_eps/") else [4, 9]), tag
        assert all(math.isfinite(s.value) for s in scalars), tag
    assert [s.step for s in events.Scalars("train/loss")] == [4, 9]
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
            "--trainer.callbacks.probe.head_reduction=sum",
            "--trainer.callbacks.blocks=[blocks.1]",
            "--trainer.callbacks+=LNEpsilonBump",
            "--trainer.callbacks.target_rho=0.5",
            "--trainer.callbacks.exclude=[norm]",
        ]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, StabilityMonitor))
    bump = next(c for c in cli.trainer.callbacks if isinstance(c, LNEpsilonBump))
    assert (monitor.every_n_steps, monitor.probe.head_reduction, monitor.blocks) == (1, "sum", ["blocks.1"])
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
                "--trainer.callbacks.probe.head_reduction=median",
            ]
        )
    assert exit_info.value.code == 2
    assert "head_reduction" in capsys.readouterr().err


def _one_line_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run the example's CLI expecting exit 2; returns its ``error:`` line (and checks there is one)."""
    with pytest.raises(SystemExit) as exit_info:
        tiny_vit.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert len(err.splitlines()) <= 6, err  # usage, tip, the error: no chained traceback
    return errors[0]


def test_bad_number_in_yaml_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(small_config(tmp_path, "tiny_vit.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"]["target_rho"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    # __init__ rejects it while the classes are instantiated; the example's CLI makes that one line
    line = _one_line_error(capsys, ["fit", f"--config={path}"])
    assert "`target_rho` must be a number in (0.0, 1.0), got 2" in line
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # nothing trained, nothing logged


@pytest.mark.parametrize(
    ("arg", "value"),
    [("every_n_steps", "0"), ("sample_size", "-3"), ("alarm.window", "1"), ("alarm.threshold", "-1")],
)
def test_bad_monitor_value_is_one_line_at_parse_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arg: str, value: str
) -> None:
    line = _one_line_error(
        capsys,
        [
            "fit",
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=StabilityMonitor",
            f"--trainer.callbacks.{arg}={value}",
        ],
    )
    assert arg in line and value in line, line


def test_callback_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    for name, args in (
        ("StabilityMonitor", ("every_n_steps", "alarm.window", "probe.head_reduction", "precision")),
        ("LNEpsilonBump", ("target_rho", "eps_mach", "include")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            tiny_vit.main(["fit", "--trainer.callbacks.help", name])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"--trainer.callbacks.help=lightning_stability.{name}" in out
        for arg in args:
            assert f"--trainer.callbacks.{arg}" in out
        assert "``" not in out, out  # jsonargparse prints docstrings as written
    assert "(type: PositiveInt, default: 50)" in " ".join(
        _help_of("StabilityMonitor", capsys).split()
    )  # the restricted types are what --help shows


def _help_of(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        tiny_vit.main(["fit", "--trainer.callbacks.help", name])
    return capsys.readouterr().out


SCRIPT = textwrap.dedent(
    """
    import sys
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    def cli(name):
        args = ["--trainer.logger=false", f"--trainer.callbacks+={name}"]
        args.append("--trainer.callbacks.every_n_steps=3")
        try:
            c = LightningCLI(BoringModel, BoringDataModule, run=False, args=args)
        except SystemExit as exc:
            return f"exit {exc.code}"
        return [type(cb).__name__ for cb in c.trainer.callbacks if hasattr(cb, "every_n_steps")]

    assert "lightning_stability" not in sys.modules
    print("short-before:", cli("StabilityMonitor"))
    print("full:", cli("lightning_stability.StabilityMonitor"))
    print("short-after:", cli("StabilityMonitor"))
    """
)


def test_short_name_needs_the_package_imported_full_path_does_not(tmp_path: Path) -> None:
    # jsonargparse resolves a short class name among the subclasses of Callback that are already
    # imported (Callback.__subclasses__()); a dotted class path is imported on demand
    script = tmp_path / "plain_cli.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines["short-before"] == "exit 2"
    assert lines["full"] == "['StabilityMonitor']"
    assert lines["short-after"] == "['StabilityMonitor']"  # once imported, the short name resolves

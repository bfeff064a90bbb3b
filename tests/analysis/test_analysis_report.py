"""`lightning-stability report` end to end on event files written here with SummaryWriter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_stability.analysis.cli import main
from lightning_stability.analysis.logs import find_runs, load_run
from lightning_stability.analysis.report import MATPLOTLIB_MISSING, build_report

FP16, BF16 = 2.0**-10, 2.0**-7


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batched ops are much faster single-threaded on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_run(
    path: Path,
    lag: int,
    seed: int,
    eps: float,
    T: int = 195,
    stride: int = 1,
    blocks: int = 2,
    ln_eps: bool = True,
) -> None:
    """κ_softmax_max leads r_block by `lag` steps; predictor_scaled = r_block / 0.8 exactly."""
    rng = np.random.default_rng(seed)
    n_lag = lag // stride
    base = np.convolve(rng.standard_normal(T + n_lag + 2), np.ones(3) / 3, mode="valid")
    kappa = 5.0 + base[n_lag : n_lag + T]
    r_block = 1e-3 * np.exp(0.5 * (base[:T] + 0.2 * rng.standard_normal(T)))
    w = SummaryWriter(str(path))
    for i in range(T):
        step = i * stride
        w.add_scalar("stability/kappa_softmax_max", kappa[i], step)
        w.add_scalar("stability/r_block", r_block[i], step)
        w.add_scalar("stability/eps_mach", eps, step)
        w.add_scalar("stability/predictor_scaled", r_block[i] / 0.8, step)
        w.add_scalar("stability/predictor", r_block[i] / 0.8 / eps, step)
        for b in range(blocks):
            w.add_scalar(f"stability/block{b}/kappa_softmax", kappa[i] - b, step)
            w.add_scalar(f"stability/block{b}/kappa_score", 2.0 + b + rng.random(), step)
            w.add_scalar(f"stability/block{b}/kappa_v", 10.0 + rng.random(), step)
        w.add_scalar("train_loss", 2.0 - i / T + 0.05 * rng.standard_normal(), step)
        if ln_eps and i % 40 == 0:
            w.add_scalar("ln_eps/blocks.0.norm1", 1e-5 * (1 + i), step)
            w.add_scalar("ln_eps/bumped_layers", 1.0, step)
    w.close()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    _write_run(root / "fp16" / "version_0", lag=17, seed=0, eps=FP16)
    _write_run(root / "bf16" / "version_0", lag=20, seed=1, eps=BF16, ln_eps=False)
    _write_run(root / "strided", lag=15, seed=2, eps=FP16, stride=5, T=150)
    _write_run(root / "short", lag=3, seed=3, eps=FP16, T=30)
    return root


def _row(md: str, run: str, target: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == run and cells[1] == target:
            return cells
    raise AssertionError(f"no row {run!r}/{target!r} in\n{md}")


def test_find_and_load_runs(logdir: Path, tmp_path: Path) -> None:
    names = [p.relative_to(logdir).as_posix() for p in find_runs(logdir)]
    assert names == ["bf16/version_0", "fp16/version_0", "short", "strided"]
    run = load_run(logdir / "strided")
    s = run.get("stability/r_block")
    assert s is not None and len(s) == 150 and s.steps[:3].tolist() == [0, 5, 10]
    # a step logged twice (resume): the last value wins
    w = SummaryWriter(str(tmp_path / "dup"))
    w.add_scalar("x", 1.0, 3)
    w.add_scalar("x", 2.0, 3)
    w.close()
    dup = load_run(tmp_path / "dup").get("x")
    assert dup is not None and dup.steps.tolist() == [3] and dup.values.tolist() == [2.0]


def test_report_via_main(logdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(logdir), "--out", str(out), "--no-progress", "--permutations", "300"]) == 0
    md = (out / "report.md").read_text()
    # planted lags, in steps (the strided run logs every 5 steps: 3 samples = 15 steps)
    for run, lag in [("fp16/version_0", "17"), ("bf16/version_0", "20"), ("strided", "15")]:
        cells = _row(md, run, "fwd error")
        assert cells[3] == lag, cells
        assert float(cells[4]) > 0.8
        assert float(cells[5]) == pytest.approx(1 / 301, abs=5e-4)
        assert 0.0 <= float(cells[6]) <= 1.0
    assert _row(md, "fp16/version_0", "loss")  # the loss control row (train_loss auto-detected)
    short = _row(md, "short", "fwd error")
    assert short[3] == "—" and "too short" in short[7]
    # Table-2 rows: predictor_scaled = r_block / 0.8 exactly → slope 0.8, R² 1
    scaled = next(line for line in md.splitlines() if line.startswith("| combined·ε_mach"))
    cells = [c.strip() for c in scaled.strip("|").split("|")]
    assert cells[1] == str(195 + 195 + 150 + 30)
    assert cells[2:6] == ["1.000", "1.000", "1.000", "0.800"]
    for proxy in ("| combined |", "| κ_softmax |", "| κ_score |", "| κ(V) |"):
        assert proxy in md
    assert "## How to read this" in md
    curves = sorted(p.name for p in out.glob("curves_*.png"))
    assert "curves_fp16_version_0.png" in curves  # per-block curves where block tags exist
    assert all((out / name).stat().st_size > 5000 for name in curves)
    pngs = sorted(p.name for p in out.glob("*.png") if not p.name.startswith("curves_"))
    assert pngs == [
        "leadlag_bf16_version_0.png",
        "leadlag_fp16_version_0.png",
        "leadlag_short.png",
        "leadlag_strided.png",
        "ln_eps_fp16_version_0.png",
        "ln_eps_short.png",
        "ln_eps_strided.png",
        "predictor_vs_mismatch.png",
    ]
    for p in out.glob("*.png"):
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p.name})" in md


def test_missing_matplotlib(
    logdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rep = build_report(logdir, tmp_path / "nomp", n_permutations=50, progress=False)
    err = capsys.readouterr().err
    assert err.count(MATPLOTLIB_MISSING) == 1
    assert 'pip install "lightning-stability[plot]"' in err
    assert rep.figures == [] and not list((tmp_path / "nomp").glob("*.png"))
    md = rep.markdown.read_text()
    assert MATPLOTLIB_MISSING in md and re.search(r"\| fp16/version_0 \| fwd error \| 195 \| 17 \|", md)


def test_no_event_files_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert main(["report"]) == 2  # usage error
    assert main([]) == 2
    assert main(["report", "--help"]) == 0
    assert main(["report", str(tmp_path), "--permutations", "0"]) == 2
    assert "--permutations must be >= 1" in capsys.readouterr().err


def test_console_script(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _write_run(logs, lag=17, seed=4, eps=BF16, T=120, blocks=1, ln_eps=False)
    exe = Path(sys.executable).parent / "lightning-stability"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run(
        [str(exe), "report", str(logs), "--permutations", "200", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    md = (logs / "stability_report" / "report.md").read_text()  # default --out
    assert _row(md, "logs", "fwd error")[3] == "17"

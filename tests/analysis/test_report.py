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
from lightning_stability.analysis.report import MATPLOTLIB_MISSING, LeadLagRow, build_report, lead_reading

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


# --------------------------------------------------------------------------- verdict and readings


def test_tables_read_in_steps_and_words(logdir: Path, tmp_path: Path) -> None:
    rep = build_report(logdir, tmp_path / "words", n_permutations=200, plots=False, progress=False)
    md = rep.markdown.read_text()
    # planted 17-step lead, p at its floor: the only case that may say "leads by"
    assert _row(md, "fp16/version_0", "fwd error")[8] == "κ_softmax leads fwd error by 17 steps (p 0.005)"
    # train_loss is logged on the same steps as stability/*: joined without a shift, all 195 points
    assert _row(md, "fp16/version_0", "loss")[2] == "195"
    short = _row(md, "short", "fwd error")
    assert "30 logged points (one every 1 step(s)); a ±60-step scan needs at least 70" in short[7]
    assert "--max-lag 20" in short[7] and short[8] == "not computed"
    # predictor_scaled = r_block / 0.8: a tenth of a decade above the mismatch, nothing above y = x
    assert "sits a median 0.1 decade(s) below the predictor (0% of 570 points above y = x)" in md
    assert "Here `Pearson_log` = 1.00: the predictor tracks the mismatch." in md


def _lead_row(lag: int, p: float, edge: int = 60) -> LeadLagRow:
    lags = tuple(range(-edge, edge + 1))
    return LeadLagRow("r", "fwd error", "stability/r_block", 100, 1, lag, 0.4, p, lags=lags)


@pytest.mark.parametrize(
    ("lag", "p", "reading"),
    [
        (20, 0.003, "κ_softmax leads fwd error by 20 steps (p 0.003)"),
        (20, 0.05, "no significant lead (best lag 20 steps, corr 0.400, p 0.050 ≥ 0.05)"),
        (60, 0.001, "no lead: the best lag (60 steps) sits at the edge of the ±60-step scan (p 0.001)"),
        (-60, 0.001, "no lead: the best lag (-60 steps) sits at the edge of the ±60-step scan (p 0.001)"),
        (-12, 0.001, "κ_softmax does not lead: best lag -12 steps (p 0.001)"),
    ],
)
def test_lead_reading_says_leads_only_for_significant_inner_positive_lags(
    lag: int, p: float, reading: str
) -> None:
    assert lead_reading(_lead_row(lag, p)) == reading


def _write_blocks(
    path: Path, eps: float, r_local: list[float], alarms: tuple[int, ...] = (35, 40), **per_block: list[float]
) -> None:
    """A run with per-block tags, every 5 steps: each value peaks (given value) at step 30 and is
    half of it elsewhere (r_local: a quarter); ``stability/alarm`` 1 at ``alarms``."""
    w = SummaryWriter(str(path))
    for step in range(0, 60, 5):
        w.add_scalar("stability/eps_mach", eps, step)
        for b, peak in enumerate(r_local):
            w.add_scalar(f"stability/block{b}/r_local", peak if step == 30 else peak / 4, step)
        for tag, values in per_block.items():
            for b, peak in enumerate(values):
                w.add_scalar(f"stability/block{b}/{tag}", peak if step == 30 else peak / 2, step)
        w.add_scalar("stability/alarm", 1.0 if step in alarms else 0.0, step)
        w.add_scalar("stability/worst_block", float(np.argmax(r_local)) if step else 0.0, step)
    w.close()


def test_verdict_names_the_fragile_block_and_what_to_try(tmp_path: Path) -> None:
    # block 2: r_local 0.2 = 25.6 × ε_mach(BF16) and logits of 150; blocks 0, 1 at the floor
    _write_blocks(
        tmp_path / "risky", BF16, [1e-3, 2e-3, 0.2], attn_logit_max=[8.0, 9.0, 150.0], rho_ln=[50.0, 3.0, 0.4]
    )
    _write_blocks(tmp_path / "calm", BF16, [1e-3, 3e-3, 2e-3], (), attn_logit_max=[8.0, 9.0, 7.0])
    rep = build_report(tmp_path, tmp_path / "out", n_permutations=50, plots=False, progress=False)
    by_run = {v.run: v.judgement for v in rep.verdicts}
    risky, calm = by_run["risky"], by_run["calm"]
    assert risky.status == "at risk"
    assert [(f.rule, f.level, f.block, f.step) for f in risky.findings] == [
        ("attn_logit_max", "watch", 2, 30),
        ("rho_ln", "watch", 2, 0),  # half the peak elsewhere: the smallest ρ_LN, first at step 0
        ("r_local", "at risk", 2, 30),
    ]
    assert risky.findings[2].value == pytest.approx(0.2 / BF16)
    assert risky.findings[1].value == pytest.approx(0.2)  # float32 in the log
    assert [(a.kind, a.block, a.part) for a in risky.advice] == [
        ("qk_norm_or_clip", 2, "attention"),
        ("eps_bump", 2, "norms"),
        ("fp32_region", 2, "block"),  # 25.6 ε_mach, 100× the others; no sub-layer errors logged
    ]
    assert risky.worst_block_steps == {0: 1, 2: 11}
    # the logged alarm (steps 35, 40) is no replay of the rule book's alarms: kept, said so
    assert (risky.alarm.steps, risky.alarm.identified) == ([35, 40], False)
    assert (calm.status, calm.extremes["r_local"].block, calm.findings) == ("healthy", 1, [])
    assert calm.extremes["r_local"].value == pytest.approx(3e-3 / BF16)
    md = rep.markdown.read_text()
    assert md.index("## Verdict") < md.index("## Predictor vs observed")
    assert "**At risk: 1 of 2 run(s)** — risky (block 2)." in md
    assert "r_local = 0.2 = 26 × ε_mach at step 30" in md
    assert "at risk: r_local 25.6 × ε_mach > 10 × ε_mach" in md
    assert "watch: attn_logit_max 150 > 100" in md
    assert "keep all of block 2 in FP32" in md and "QK-clip at τ = 100, for the attention of block 2" in md
    assert "raise the ε of the normalization layers of block 2" in md
    assert "**calm — healthy** (12 logged steps, BF16, ε_mach = 0.0078). No rule reached its watch" in md
    assert "fired at steps 35, 40; no alarm of this version's rule book replays it" in md
    assert "κ_softmax" not in md.split("## Predictor")[0]  # no κ_softmax series: nothing said about it
    # a logged alarm is never healthy, even when no rule of the book replays it
    _write_blocks(tmp_path / "more" / "calm_alarm", BF16, [1e-3, 3e-3, 2e-3], attn_logit_max=[8.0, 9.0, 7.0])
    (alarmed,) = build_report(tmp_path / "more", plots=False, progress=False, n_permutations=50).verdicts
    assert (alarmed.status, alarmed.judgement.findings) == ("watch", [])


def test_verdict_falls_back_to_r_block_and_says_so(tmp_path: Path) -> None:
    w = SummaryWriter(str(tmp_path / "old"))
    for step in range(0, 40, 5):
        w.add_scalar("stability/eps_mach", FP16, step)
        w.add_scalar("stability/block0/r_block", 2e-4, step)
        w.add_scalar("stability/block1/r_block", 3e-2 if step == 20 else 3e-4, step)
        w.add_scalar("stability/nonfinite", 0.0, step)
    w.close()
    v = build_report(tmp_path, tmp_path / "out", n_permutations=50, plots=False, progress=False).verdicts[0]
    j = v.judgement
    (f,) = j.findings
    assert (j.status, f.rule, f.block, f.step) == ("at risk", "r_local", 1, 20)
    assert j.extremes["r_local"].signal == "r_block" and f.value == pytest.approx(3e-2 / FP16, rel=1e-6)
    assert j.advice == []  # the propagated error cannot say which block to move to FP32
    md = (tmp_path / "out" / "report.md").read_text()
    assert "largest per-block mismatch: r_block = 0.03 in block 1 at step 20, 31 × ε_mach" in md
    assert "not necessarily where it is made" in md

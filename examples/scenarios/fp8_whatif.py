"""FP8 vs BF16 error per block of the scenario models, and the layers the rule book keeps in BF16.

Each configuration of ``configs/`` (the scenarios and their stable controls) trains its
:class:`~gpt.ScenarioGPT` in FP32 for its ``max_steps`` (no monitor); the trained model is
then measured once by the probe on 8 fixed training sequences under BF16 autocast and under
the FP8 what-if with per-tensor current scaling and with MXFP8 block scaling. Per block: the
propagated error ``r_block`` and the block's own error ``r_local`` (docs/SPEC.md). Per
precision: the rule book's judgement of that one step (status, layers to keep in BF16).
Delayed scaling is left out: one measurement is its first step, which quantizes with the
initial scale 1.

    python examples/scenarios/fp8_whatif.py --out examples/scenarios/results/fp8_whatif.json \
        [--configs NAME ...] [--steps N] [--jobs N]
    python examples/scenarios/fp8_whatif.py --render examples/scenarios/results/fp8_whatif.json

The second command prints the Markdown table of docs/FP8.md from the committed JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))  # → ``import gpt``
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # → machine_line

from bench_overhead import machine_line
from gpt import MarkovDataModule, ScenarioGPT

from lightning_stability.capture import StabilityProbe, compose_report
from lightning_stability.capture.probe import FP8Precision
from lightning_stability.rules import Evidence, Judge, rule_book

CONFIGS = Path(__file__).resolve().parent / "configs"
PRECISIONS = ("bf16", "fp8_current", "fp8_mxfp8")
SAMPLE = 8


def train(config: Path, steps: int | None) -> tuple[ScenarioGPT, torch.Tensor, int]:
    """The configuration's model after its FP32 training, and 8 fixed training sequences."""
    cfg = yaml.safe_load(config.read_text())
    seed_everything(int(cfg.get("seed_everything", 0)))
    model = ScenarioGPT(**cfg.get("model", {}))
    data = MarkovDataModule(**cfg.get("data", {}))
    max_steps = int(steps if steps is not None else cfg["trainer"]["max_steps"])
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg["trainer"].get("gradient_clip_val"),
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    data.setup()
    assert data.train_set is not None
    return model.eval(), data.train_set.tensors[0][:SAMPLE], max_steps


def measure(model: ScenarioGPT, x: torch.Tensor, precision: str) -> dict[str, Any]:
    """One probe measurement: per block ``r_block``/``r_local``, per layer ``fp8_error_token``,
    the rule book's verdict of the step."""
    probe = StabilityProbe(model)
    if precision == "bf16":
        low: Any = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        low = FP8Precision(model, precision.removeprefix("fp8_"))  # type: ignore[arg-type]
    raw = probe.measure((x,), {}, low, seed=0)
    keys, vec = raw.flat()
    report = compose_report(probe, raw, dict(zip(keys, vec.tolist(), strict=True)), step=0)
    metrics = report.metrics()
    judge = Judge(rule_book())
    judge.observe(Evidence.from_tags(metrics, 0, [b.name for b in report.blocks]))
    judgement = judge.judgement()
    return {
        "eps_mach": report.eps_mach,
        "r_block": [b.r_block for b in report.blocks],
        "r_local": [b.r_local for b in report.blocks],
        "layers": {layer.name: layer.fp8_error_token for layer in report.layers},
        "status": judgement.status,
        "findings": [f"{f.rule} ({f.level})" for f in judgement.findings],
        "keep_bf16": [a.layer for a in judgement.advice if a.kind == "keep_bf16"],
    }


def one(name: str, steps: int | None) -> dict[str, Any]:
    """Train configuration ``name`` and measure it under every precision (one process, one thread)."""
    torch.set_num_threads(1)
    model, x, max_steps = train(CONFIGS / f"{name}.yaml", steps)
    row: dict[str, Any] = {"steps": max_steps}
    for precision in PRECISIONS:
        row[precision] = measure(model, x, precision)
    print(name, {p: row[p]["r_block"] for p in PRECISIONS}, file=sys.stderr)
    return row


def run(names: list[str], steps: int | None, jobs: int) -> dict[str, Any]:
    """Every configuration in ``names``, ``jobs`` of them at a time in separate processes."""
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(one, names, [steps] * len(names)))
    machine = machine_line(torch.device("cpu"))  # the load at the end
    return {"machine": machine, "sample": SAMPLE, "configs": dict(zip(names, rows, strict=True))}


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2g}"


def render(result: dict[str, Any]) -> str:
    """Markdown: per configuration and block, r_block and r_local under each precision."""
    head = "| configuration (steps) | block | " + " | ".join(f"{p} r_block | {p} r_local" for p in PRECISIONS)
    lines = [head + " |", "|" + "---|" * (2 + 2 * len(PRECISIONS))]
    verdicts = []
    for name, row in result["configs"].items():
        for i in range(len(row["bf16"]["r_block"])):
            cells = [f"{name} ({row['steps']})" if i == 0 else "", f"{i}"]
            for p in PRECISIONS:
                cells += [_num(row[p]["r_block"][i]), _num(row[p]["r_local"][i])]
            lines.append("| " + " | ".join(cells) + " |")
        for p in PRECISIONS:
            if row[p]["keep_bf16"] or row[p]["status"] != "healthy":
                keep = ", ".join(row[p]["keep_bf16"]) or "none"
                found = ", ".join(row[p]["findings"])
                verdicts.append(f"- {name}, {p}: {row[p]['status']} ({found}); keep in BF16: {keep}")
    lines += ["", "Verdicts other than healthy with nothing to keep in BF16:", *(verdicts or ["- none"])]
    lines += ["", f"Sample: {result['sample']} training sequences. {result['machine']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--render", type=Path, help="print the Markdown table of this JSON and exit")
    parser.add_argument("--steps", type=int, help="train every configuration this many steps instead")
    parser.add_argument("--jobs", type=int, default=1, help="configurations trained at once (processes)")
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    parser.add_argument("--configs", nargs="+", default=names, help="names in configs/ (default: all)")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return
    result = run(args.configs, args.steps, args.jobs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()

"""Cost of the FP8 what-if (``FP8WhatIf``) next to a BF16 autocast forward of the same model.

Every figure is the median of interleaved repetitions in one process (each repetition runs
every variant once, so contention on a shared machine hits all variants alike); ratios are
over the BF16 autocast forward (``torch.no_grad``) of the same model and batch, and over the
FP32 forward (on a CPU without fast BF16 matmuls BF16 autocast can be the slower of the two,
and the emulation computes in FP32). Variants:

- ``fp32`` — the plain FP32 forward;
- ``fp8_<recipe>`` — the what-if with its measurements (per linear layer: the FP8 GEMM, the
  FP32 reference and the BF16 baseline of the same call, and the statistics);
- ``fp8_current_no_error`` — the FP8 pass alone (``measure_error=False``): quantization and GEMM;
- ``fp8_mxfp8_attention`` — MXFP8 with the attention matmuls in FP8 too.

Models: the Tiny-ViT of ``examples/tiny_vit.py`` and the scenario GPT of
``examples/scenarios/gpt.py`` at their defaults, and a transformers Llama built from a config.

    python examples/benchmarks/bench_fp8.py [--quick] [--reps N] [--out FILE.json]

The committed ``examples/benchmarks/results/bench_fp8.json`` comes from
``python examples/benchmarks/bench_fp8.py --out examples/benchmarks/results/bench_fp8.json``;
``--render examples/benchmarks/results/bench_fp8.json`` prints the table of docs/FP8.md from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ → ``import tiny_vit``
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scenarios"))  # → ``import gpt``
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timing helpers

from bench_overhead import interleaved, machine_line

from lightning_stability.capture.fp8 import FP8WhatIf
from lightning_stability.diagnostics.fp8_recipe import FP8Recipe

CPU = torch.device("cpu")


def tiny_vit(quick: bool) -> tuple[nn.Module, Tensor]:
    from tiny_vit import TinyViT

    torch.manual_seed(0)
    model = TinyViT(depth=2 if quick else 6).eval()
    return model, torch.randn(4 if quick else 32, 3, 32, 32)


def scenario_gpt(quick: bool) -> tuple[nn.Module, Tensor]:
    from gpt import ScenarioGPT

    model = ScenarioGPT(n_layers=1 if quick else 4).eval()
    return model, torch.randint(0, 64, (2 if quick else 16, 64), generator=torch.Generator().manual_seed(0))


def llama(quick: bool) -> tuple[nn.Module, Tensor]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64 if quick else 256,
        intermediate_size=128 if quick else 688,
        num_hidden_layers=1 if quick else 4,
        num_attention_heads=4 if quick else 8,
        num_key_value_heads=2 if quick else 4,
        vocab_size=256,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    return model, torch.randint(0, 256, (2 if quick else 4, 32 if quick else 128))


MODELS: dict[str, Callable[[bool], tuple[nn.Module, Tensor]]] = {
    "tiny_vit": tiny_vit,
    "scenario_gpt": scenario_gpt,
    "llama": llama,
}


def variants(model: nn.Module, x: Tensor) -> dict[str, Callable[[], Any]]:
    """Every timed variant of one forward of ``model`` on ``x``."""
    history = FP8Recipe("delayed").new_history()

    def bf16() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)

    def fp32() -> None:
        with torch.no_grad():
            model(x)

    def fp8(recipe: str, **kw: Any) -> Callable[[], None]:
        def run() -> None:
            with FP8WhatIf(model, recipe, history=history if recipe == "delayed" else None, **kw):  # type: ignore[arg-type]
                model(x)

        return run

    return {
        "bf16": bf16,
        "fp32": fp32,
        "fp8_current": fp8("current"),
        "fp8_delayed": fp8("delayed"),
        "fp8_mxfp8": fp8("mxfp8"),
        "fp8_current_no_error": fp8("current", measure_error=False),
        "fp8_mxfp8_attention": fp8("mxfp8", attention=True),
    }


def describe(model: nn.Module, x: Tensor) -> dict[str, Any]:
    with FP8WhatIf(model, "current") as fp8:
        model(x)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": list(x.shape),
        "linear_layers": len(fp8.records),
    }


def render(result: dict[str, Any]) -> str:
    """Markdown: per model, seconds per forward and the ratio over BF16 autocast of every variant."""
    names = list(next(iter(result["models"].values()))["seconds"])
    lines = [
        "| model (parameters, input, linear layers) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for model, row in result["models"].items():
        shape = "×".join(str(n) for n in row["input_shape"])
        cells = [f"{model} ({row['parameters'] / 1e6:.2f} M, {shape}, {row['linear_layers']})"]
        for k in names:
            ratio = row["ratio_over_bf16"].get(k, 1.0)
            cells.append(f"{row['seconds'][k]:.3g} s ({ratio:.1f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{result['reps']} interleaved repetitions. {result['machine']}"]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, few repetitions (smoke test)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 9, quick 2)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--render", type=Path, default=None, help="print the Markdown table of this JSON and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        print(render(result))
        return dict(result)
    reps = args.reps or (2 if args.quick else 9)
    warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")
    result: dict[str, Any] = {"machine": machine_line(CPU), "reps": reps, "models": {}}
    print(result["machine"])
    for name, make in MODELS.items():
        model, x = make(args.quick)
        seconds = interleaved(variants(model, x), CPU, reps=reps)
        ratios = {k: v / seconds["bf16"] for k, v in seconds.items() if k != "bf16"}
        over_fp32 = {k: v / seconds["fp32"] for k, v in seconds.items() if k.startswith("fp8")}
        result["models"][name] = describe(model, x) | {
            "seconds": seconds,
            "ratio_over_bf16": ratios,
            "ratio_over_fp32": over_fp32,
        }
        cells = "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        print(f"{name:13s} bf16 {seconds['bf16'] * 1e3:7.2f} ms  {cells}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

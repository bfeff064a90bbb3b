"""The monitor's TensorBoard dashboard: charts a person reads at a glance.

What TensorBoard itself cannot be told, and how the dashboard gets around it:

* **Colours.** A CUSTOM SCALARS chart colours its lines by *run*; every tag of one run has the
  run's colour. So each block gets its own writer, a sub-run ``<log_dir>/block{i}/``, and the
  block charts draw one colour per block (legend ``…/version_0/block3``). The block index →
  module name map is written once to the main run as text (``stability/blocks``, TEXT tab).
* **Log axes.** A layout cannot switch a chart to a log axis (each card has a toggle, off by
  default). Values that span decades (``Metric.log_scale``) are therefore also written as their
  base-10 logarithm (``stability_block/log10_<name>`` in the block sub-runs,
  ``stability_model/log10_<name>`` in the main run): ``-2.6`` reads as ``2.5e-3``. The chart
  of the last block's ``r_block`` carries ``log10 ε_mach`` as the floor line.
* **Smoothing.** Multi-line charts follow the global smoothing slider; margin charts are never
  smoothed. The 0/1 alarm, the worst-block index and the non-finite count are margin charts
  (value = lower = upper), so a single alarm step stays a 1, never a smoothed 0.2.
* **Charts of metrics that are off.** The layout is built from the first logged step's tags: a
  metric that was not measured (the bound without residual gains, ``residual_gain`` at 0
  iterations, ``r_*_local`` with ``local_errors=False``) gets no chart.

The main run's ``stability/*`` tags are untouched (the same for every logger: CSV, W&B, the
``lightning-stability report`` reader); the dashboard tags are written to TensorBoard only.

* **Cost.** A step's ~130 main-run tags and each block's tags are written as *one* event per
  writer (one ``Summary`` holding every value, as TensorFlow's merged summaries are), not one
  event per tag: ``add_scalar`` pushes each tag through the writer's 10-slot queue and thread,
  6.2 ms a step against 0.2 ms (``examples/benchmarks/bench_overhead.py``, *logging*). The
  values and tags read back identically. Sub-runs are flushed like the main run (every
  ``flush_secs`` and at the end of the fit), not after every step.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_stability.metrics import BY_NAME, METRICS, Metric, parse_tag
from lightning_stability.rules.thresholds import FP8_EPS_MACH, FP8_LAYER_WATCH_EPS

#: Tag prefix of the per-block values in the block sub-runs.
BLOCK_PREFIX = "stability_block"
#: Tag prefix of the main run's log10 copies of model-level values.
MODEL_PREFIX = "stability_model"
#: Name of block ``i``'s sub-run directory under the logger's ``log_dir``.
SUB_RUN = "block{}"
#: Text tag of the block index → module name map.
BLOCK_MAP_TAG = "stability/blocks"

#: Short phrases for chart titles (the full doc line is in the metric table, docs/metrics.md).
_PHRASE = {
    "r_local": "the block's own error (its exact input, run in low precision)",
    "r_block": "propagated error at the block output",
    "r_attention_local": "attention sub-layer's own error",
    "r_ffn_local": "FFN sub-layer's own error",
    "r_block_mean_token": "mean per-token error at the block output",
    "r_block_median": "median per-token error at the block output",
    "attn_logit_max": "largest |attention logit| (Megatron QK-clips at 100)",
    "amax": "max |output| inside the block (FP16 overflows at 65504)",
    "kappa_softmax": "softmax conditioning",
    "kappa_score": "score conditioning",
    "kappa_v": "κ(V)",
    "kappa_wkwq": "κ(W_Kᵀ W_Q)",
    "kappa_eff": "FFN conditioning",
    "predictor": "combined predictor",
    "attention_entropy": "attention entropy (low: collapse)",
    "wo_norm": "‖W_O‖₂",
    "c_ln": "LayerNorm constant C_LN",
    "rho_ln": "ρ_LN (< 1: ε-dominated norm)",
    "residual_gain": "residual-branch gain ρ",
}
#: The "where" section, in this order; the other block metrics follow in the conditioning section.
_WHERE = (
    "r_local",
    "r_attention_local",
    "r_ffn_local",
    "r_block",
    "attn_logit_max",
    "amax",
    "r_block_mean_token",
    "r_block_median",
)


def write_scalars(writer: Any, values: dict[str, float], step: int) -> None:
    """Write ``values`` at ``step`` as one event of ``writer`` (a TensorBoard ``SummaryWriter``).

    One ``Summary`` with a value per tag (what ``add_scalar`` writes, ``simple_value``), so the
    writer's queue and thread see one event instead of one per tag. A writer that is not
    PyTorch's ``SummaryWriter`` (e.g. ``tensorboardX``'s) gets ``add_scalar`` per tag.
    """
    if not values:
        return
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        one_event = isinstance(writer, SummaryWriter)
    except ImportError:  # e.g. only tensorboardX installed
        one_event = False
    if not one_event:
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        return

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
    writer._get_file_writer().add_summary(summary, step)


def _plain_tensorboard(logger: Any) -> bool:
    """Whether ``logger.log_metrics`` is Lightning's own TensorBoard one (not overridden)."""
    return isinstance(logger, TensorBoardLogger) and type(logger).log_metrics is TensorBoardLogger.log_metrics


def log10_or_none(value: float) -> float | None:
    """``log10(value)`` for a finite positive value, else ``None`` (TensorBoard cannot draw ±inf)."""
    return math.log10(value) if math.isfinite(value) and value > 0 else None


def _title(metric: Metric) -> str:
    scale = "log10" if metric.log_scale else metric.unit
    phrase = _PHRASE.get(metric.name)
    return f"{metric.name}{' — ' + phrase if phrase else ''}" + (f" [{scale}]" if scale else "")


def _block_tag(metric: Metric) -> str:
    return f"{BLOCK_PREFIX}/{'log10_' if metric.log_scale else ''}{metric.name}"


def _model_log10_tag(name: str) -> str:
    return f"{MODEL_PREFIX}/log10_{name}"


def split_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The dashboard's extra scalars of one step, from the monitor's flat ``{tag: value}``.

    Returns:
        ``(main, per_block)``: the main run's ``stability_model/log10_<name>`` values of the
        log-scale model metrics, and for block ``i`` the ``stability_block/<name>`` (or
        ``log10_<name>``) values its sub-run gets. Per-head tags stay in the main run only;
        a log-scale value that is not finite and positive is left out.

    Example:
        >>> main, blocks = split_metrics({"stability/eps_mach": 0.01, "stability/block1/r_local": 1e-3})
        >>> main, blocks
        ({'stability_model/log10_eps_mach': -2.0}, [{}, {'stability_block/log10_r_local': -3.0}])
    """
    main: dict[str, float] = {}
    per_block: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        parsed = parse_tag(key)
        if parsed is None or parsed.head is not None or parsed.layer is not None:  # main run only
            continue
        metric = parsed.metric
        if parsed.block is not None:
            v = log10_or_none(value) if metric.log_scale else value
            if v is not None:
                per_block.setdefault(parsed.block, {})[_block_tag(metric)] = v
        elif metric.log_scale:
            v = log10_or_none(value)
            if v is not None:
                main[_model_log10_tag(metric.name)] = v
    n = max(per_block, default=-1) + 1
    return main, [per_block.get(i, {}) for i in range(n)]


def _on(metrics: dict[str, float]) -> tuple[set[str], set[str]]:
    """Names of the block metrics and the model metrics present among ``metrics``' tags."""
    parsed = [t for t in map(parse_tag, metrics) if t is not None and t.head is None and t.layer is None]
    block = {t.metric.name for t in parsed if t.block is not None}
    return block, {t.metric.name for t in parsed if t.block is None}


def custom_scalars_layout(metrics: dict[str, float]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard CUSTOM SCALARS layout for the tags of one logged step (``metrics``).

    Four sections: the early warning (the largest attention logit, κ_softmax_max and the 0/1
    alarm), the verdict (model
    level: r_block against the ε_mach floor, the predictor, the bound, FP16 headroom, worst
    block, non-finite count), *where* (per block, one colour per block: the local and
    propagated errors, attention logits, activation maxima), and the per-block conditioning
    diagnostics; FP8 passes add a fifth, the linear layers' FP8 errors and input underflow
    (one line per layer). Only metrics present in ``metrics`` get a chart.
    """
    block_on, model_on = _on(metrics)
    layout = {
        "stability · early warning": _warning_charts(model_on),
        "stability · verdict": _verdict_charts(model_on),
        "stability · where (one colour per block)": _block_charts(block_on, where=True),
        "stability · conditioning per block": _block_charts(block_on, where=False),
        "stability · FP8 per linear layer (one line per layer)": _layer_charts(metrics),
    }
    return {section: charts for section, charts in layout.items() if charts}


def _warning_charts(model_on: set[str]) -> dict[str, list[Any]]:
    """The early warning's inputs and the 0/1 alarm (multi-line charts first: TensorBoard draws
    them before margin charts)."""
    warning: dict[str, list[Any]] = {}
    if "attn_logit_max" in model_on:  # the default alarm's main input (its level: 100)
        warning["attn_logit_max — largest attention logit, default alarm at 100 [log10]"] = _lines(
            _model_log10_tag("attn_logit_max")
        )
    if "kappa_softmax_max" in model_on:
        warning["kappa_softmax_max — the paper rule's input [log10]"] = _lines(
            _model_log10_tag("kappa_softmax_max")
        )
    if "alarm" in model_on:
        warning["alarm — early warning fired (reason: the run's warning) [0/1, unsmoothed]"] = _margin(
            "stability/alarm"
        )
    return warning


def _verdict_charts(model_on: set[str]) -> dict[str, list[Any]]:
    """Model-level charts: r_block against the ε_mach floor, the predictor, the bound, FP16
    headroom, the worst block, the non-finite count."""
    eps = [f"^{_model_log10_tag('eps_mach')}$"] if "eps_mach" in model_on else []
    verdict: dict[str, list[Any]] = {}
    if "r_block" in model_on:
        verdict["r_block — error at the last block's output [log10] — flat line: ε_mach"] = [
            "Multiline",
            [f"^{_model_log10_tag('r_block')}$", *eps],
        ]
    if "predictor_scaled" in model_on:
        verdict["predictor_scaled — predictor·ε_mach, an upper-bound-style estimate of r_block [log10]"] = (
            _lines(_model_log10_tag("predictor_scaled"))
        )
    if "bound" in model_on:
        names = [n for n in ("bound", "bound_rigorous") if n in model_on]
        verdict["bound, bound_rigorous — unified bound on r_block [log10]"] = [
            "Multiline",
            [f"^{_model_log10_tag(n)}$" for n in names],
        ]
    if "fp16_headroom" in model_on:
        verdict["fp16_headroom — bits before FP16 overflows [bits]"] = _lines("stability/fp16_headroom")
    if "worst_block" in model_on:
        verdict["worst_block — sub-run index of the largest r_local [unsmoothed]"] = _margin(
            "stability/worst_block"
        )
    if "nonfinite" in model_on:
        verdict["nonfinite — non-finite values in block outputs [count, unsmoothed]"] = _margin(
            "stability/nonfinite"
        )
    return verdict


def _block_charts(block_on: set[str], where: bool) -> dict[str, list[Any]]:
    """One chart per block metric present, one line per block sub-run: the "where" section
    (:data:`_WHERE`, in its order) or the conditioning diagnostics (the others, in table order)."""
    block_metrics = [BY_NAME[n] for n in _WHERE] + [m for m in METRICS if m.name not in _WHERE]
    # no ε_mach line here: it would squeeze the blocks' lines together (it is in the r_block chart)
    return {
        _title(metric): _lines(_block_tag(metric))
        for metric in block_metrics
        if metric.level in ("block", "head") and metric.name in block_on and (metric.name in _WHERE) == where
    }


#: The per-layer charts: (metric, operand or None, title).
_LAYER_CHARTS = (
    (
        "fp8_error_token",
        None,
        "fp8_error_token — each linear layer's FP8 error per token "
        f"(keep_bf16 from {FP8_LAYER_WATCH_EPS * FP8_EPS_MACH:g})",
    ),
    ("bf16_error_token", None, "bf16_error_token — the same layers under BF16 autocast"),
    ("fp8_underflow", "input", "input fp8_underflow — fraction of each layer's input lost to 0"),
    ("fp8_saturation", "input", "input fp8_saturation — fraction of each layer's input clipped at ±448"),
)


def _layer_charts(metrics: dict[str, float]) -> dict[str, list[Any]]:
    """One multi-line chart per per-layer statistic present (a regular expression over the layers)."""
    tags = [t for t in map(parse_tag, metrics) if t is not None and t.layer is not None]
    present = {(t.metric.name, t.operand) for t in tags}
    charts: dict[str, list[Any]] = {}
    for name, operand, title in _LAYER_CHARTS:
        if (name, operand) in present:
            middle = ".*" if operand is None else f".*/{operand}"
            charts[title] = ["Multiline", [f"^stability/layer/{middle}/{name}$"]]
    return charts


def _lines(tag: str) -> list[Any]:
    return ["Multiline", [f"^{re.escape(tag)}$"]]


def _margin(tag: str) -> list[Any]:
    return ["Margin", [tag, tag, tag]]


def block_map_markdown(names: Sequence[str]) -> str:
    """The block index → module name map as a markdown table (the TEXT tab renders it).

    Example:
        >>> print(block_map_markdown(["blocks.0", "blocks.1"]))
        | sub-run | module |
        |---|---|
        | block0 | `blocks.0` |
        | block1 | `blocks.1` |
    """
    rows = ["| sub-run | module |", "|---|---|"]
    rows += [f"| {SUB_RUN.format(i)} | `{name}` |" for i, name in enumerate(names)]
    return "\n".join(rows)


class TensorBoardDashboard:
    """Writes the dashboard for one monitor: the layout and block map once per log directory,
    then each logged step's extra scalars (main run and one sub-run per block). Rank zero only."""

    def __init__(self) -> None:
        self._writers: dict[str, list[Any]] = {}
        self._failed = False
        self._one_event = True  # off for the rest of the fit if a one-event write ever fails

    def log_metrics(self, logger: TensorBoardLogger, metrics: dict[str, float], step: int) -> None:
        """``logger.log_metrics(metrics, step)``, as one event when the logger is Lightning's own.

        Same tags (with the logger's prefix), values and step as ``log_metrics`` writes one by
        one. Should the one-event path fail, ``log_metrics`` itself takes over for the rest of
        the fit.
        """
        if not (self._one_event and _plain_tensorboard(logger)):
            logger.log_metrics(metrics, step=step)
            return
        try:
            # the logger's prefix, joined as its log_metrics joins it
            prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else ""
            write_scalars(logger.experiment, {prefix + k: v for k, v in metrics.items()}, step)
        except Exception:
            self._one_event = False
            logger.log_metrics(metrics, step=step)

    def write(
        self, logger: TensorBoardLogger, metrics: dict[str, float], block_names: Sequence[str], step: int
    ) -> None:
        """Write one logged step's dashboard values (``metrics``: the monitor's flat tags).

        A failure (a sub-run directory that cannot be created, a writer that breaks) is warned
        once and turns the dashboard off: the monitor never stops training.
        """
        if self._failed:
            return
        try:
            self._write(logger, metrics, block_names, step)
        except Exception as err:
            self._failed = True
            rank_zero_warn(
                f"StabilityMonitor: the TensorBoard dashboard is off ({type(err).__name__}: {err}); "
                "the stability/* tags are still logged."
            )

    def _write(
        self, logger: TensorBoardLogger, metrics: dict[str, float], block_names: Sequence[str], step: int
    ) -> None:
        main, per_block = split_metrics(metrics)
        log_dir = logger.log_dir
        experiment = logger.experiment
        if log_dir not in self._writers:
            experiment.add_custom_scalars(custom_scalars_layout(metrics))
            experiment.add_text(BLOCK_MAP_TAG, block_map_markdown(block_names), global_step=step)
            self._writers[log_dir] = []
        if main:
            self.log_metrics(logger, main, step)
        writers = self._writers[log_dir]
        while len(writers) < len(per_block):  # same writer class as the logger's (torch or tensorboardX)
            writers.append(type(experiment)(os.path.join(log_dir, SUB_RUN.format(len(writers)))))
        for writer, values in zip(writers, per_block, strict=False):
            write_scalars(writer, values, step)

    def close(self) -> None:
        """Close (and so flush) the block sub-run writers."""
        for writers in self._writers.values():
            for writer in writers:
                writer.close()
        self._writers.clear()

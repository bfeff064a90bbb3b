"""Command line: ``lightning-stability report LOGDIR [--out DIR]``.

Exit codes: 0 success, 2 usage error or no event files under ``LOGDIR``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_stability.rules.thresholds import PAPER_WINDOW, PAPER_Z

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-stability`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-stability",
        description="Numerical-stability diagnostics for Transformers trained in FP16/BF16.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "report",
        help="tables (report.md) and plots from TensorBoard logs",
        description=(
            "Read every run (directory holding events.out.tfevents.*) under LOGDIR and write "
            "report.md and PNG plots: predictor-vs-mismatch regression (paper Table 2) and "
            "kappa_softmax lead-lag (paper Table 3)."
        ),
    )
    rep.add_argument("logdir", metavar="LOGDIR", help="TensorBoard log root")
    rep.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: LOGDIR/stability_report)"
    )
    rep.add_argument("--max-lag", type=int, default=60, help="lead-lag scan range in steps (default: 60)")
    rep.add_argument(
        "--permutations", type=int, default=1000, help="permutations of the lead-lag test (default: 1000)"
    )
    rep.add_argument("--seed", type=int, default=0, help="seed of the permutation test (default: 0)")
    rep.add_argument("--horizon", type=int, default=40, help="Prec@K horizon in steps (default: 40)")
    rep.add_argument(
        "--window",
        type=int,
        default=PAPER_WINDOW,
        help=f"rolling z-score window in steps (default: {PAPER_WINDOW})",
    )
    rep.add_argument(
        "--z",
        type=float,
        default=PAPER_Z,
        help=f"target spike threshold on the rolling z (default: {PAPER_Z})",
    )
    rep.add_argument("--k", type=int, default=None, help="Prec@K's K (default: ceil(0.1*T))")
    rep.add_argument(
        "--loss-tag",
        action="append",
        default=None,
        metavar="TAG",
        help="loss tag to add as a lead-lag target (repeatable; default: auto-detect train_loss/loss)",
    )
    rep.add_argument("--no-plots", action="store_true", help="write report.md only")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also the console script's entry point).

    Args:
        argv: Arguments without the program name; ``None`` → ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on a usage error or when LOGDIR has no event files.

    Example:
        >>> main(["report", "/nonexistent/logdir", "--no-progress"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help → 0, bad usage → 2
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.command != "report":
        parser.print_help(sys.stderr)
        return 2
    bad = [
        f"--{name.replace('_', '-')} must be >= {lo}"
        for name, lo in (("max_lag", 0), ("permutations", 1), ("horizon", 1), ("window", 2))
        if getattr(args, name) < lo
    ]
    if args.k is not None and args.k < 1:
        bad.append("--k must be >= 1")
    if bad:
        print(f"lightning-stability report: {'; '.join(bad)}", file=sys.stderr)
        return 2

    from .report import NoEventFilesError, build_report

    try:
        rep = build_report(
            args.logdir,
            args.out,
            max_lag=args.max_lag,
            n_permutations=args.permutations,
            seed=args.seed,
            horizon=args.horizon,
            window=args.window,
            z=args.z,
            k=args.k,
            loss_tags=args.loss_tag,
            plots=not args.no_plots,
            progress=not args.no_progress,
        )
    except NoEventFilesError as exc:
        print(f"lightning-stability report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {rep.markdown} ({len(rep.runs)} run(s), {len(rep.figures)} figure(s))")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

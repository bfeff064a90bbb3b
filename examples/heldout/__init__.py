"""Held-out evaluation of the default alarm: families, data and mechanisms it was not tuned on.

Run from the repository root: ``python examples/heldout/run.py --help`` (see docs/HELDOUT.md).
"""

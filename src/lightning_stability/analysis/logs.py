"""Reading TensorBoard event files back (TensorBoard's own reader).

A **run** is a directory that directly contains at least one
``events.out.tfevents.*`` file; :func:`find_runs` lists every such directory
under a log root (the root included), except the ``block{i}`` sub-runs that
``StabilityMonitor`` writes inside a run for TensorBoard's per-block colours
(they hold copies of the run's own ``stability/block{i}/*`` values). All event files of a run directory are
read together by ``EventAccumulator`` (a resumed run appends a new file), and
when a step was logged more than once the **last** value wins.

``tensorboard`` is imported lazily, inside :func:`load_run`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_stability.metrics import parse_tag

__all__ = ["Run", "Series", "align", "find_runs", "load_run", "load_runs", "step_stride"]

EVENT_GLOB = "events.out.tfevents.*"
#: Directory names of the monitor's TensorBoard dashboard sub-runs (``<run>/block3``).
DASHBOARD_SUB_RUN = re.compile(r"block\d+")


@dataclass(frozen=True, eq=False)
class Series:
    """One scalar tag of one run: strictly increasing ``steps`` and their ``values``."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.size)


@dataclass(eq=False)
class Run:
    """The scalars of one run directory.

    Attributes:
        name: Path of the run directory relative to the log root (``"."`` for the root).
        path: The run directory.
        scalars: Tag → :class:`Series`.
    """

    name: str
    path: Path
    scalars: dict[str, Series] = field(default_factory=dict)

    def get(self, tag: str) -> Series | None:
        """The series of ``tag``, or ``None`` when it was not logged (or is empty)."""
        s = self.scalars.get(tag)
        return s if s is not None and len(s) > 0 else None

    def block_tags(self, name: str) -> list[tuple[int, str]]:
        """``(block, tag)`` of every logged ``stability/block{i}/<name>`` (block level, not per head),
        in block order; tags are read with :func:`~lightning_stability.metrics.parse_tag`."""
        found = []
        for t in self.scalars:
            parsed = parse_tag(t)
            if parsed is None or parsed.metric.name != name or parsed.head is not None:
                continue
            if parsed.block is not None:
                found.append((parsed.block, t))
        return sorted(found)

    def tags_matching(self, pattern: str) -> list[str]:
        """Tags fully matching the regular expression ``pattern``, sorted."""
        rx = re.compile(pattern)
        return sorted(t for t in self.scalars if rx.fullmatch(t))


def find_runs(logdir: str | Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) holding an event file, sorted;
    a ``block{i}`` directory inside a run (the monitor's dashboard sub-run) is not a run.

    Args:
        logdir: Log root.

    Returns:
        Run directories (empty when there is none or ``logdir`` does not exist).

    Example:
        >>> find_runs("/nonexistent/path")
        []
    """
    root = Path(logdir)
    if not root.is_dir():
        return []
    runs = {p.parent for p in root.rglob(EVENT_GLOB) if p.is_file()}
    return sorted(r for r in runs if not (DASHBOARD_SUB_RUN.fullmatch(r.name) and r.parent in runs))


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read all scalar tags of one run directory with TensorBoard's ``EventAccumulator``.

    Args:
        path: Run directory (contains ``events.out.tfevents.*`` files).
        name: Display name; defaults to the directory name.

    Returns:
        A :class:`Run`; for each tag, steps sorted ascending, duplicates resolved to
        the last logged value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    scalars: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        latest: dict[int, float] = {}
        for ev in acc.Scalars(tag):  # in file order: a later write of a step overrides
            latest[int(ev.step)] = float(ev.value)
        steps = np.array(sorted(latest), dtype=np.int64)
        values = np.array([latest[int(s)] for s in steps], dtype=np.float64)
        scalars[tag] = Series(steps=steps, values=values)
    return Run(name=name or path.name, path=path, scalars=scalars)


def load_runs(logdir: str | Path, progress: bool = True) -> list[Run]:
    """Find and read every run under ``logdir`` (a progress bar on stderr when ``progress``).

    Args:
        logdir: Log root.
        progress: Show a ``tqdm`` progress bar over the runs (when tqdm is installed).

    Returns:
        The runs, in :func:`find_runs` order, named by their path relative to ``logdir``.
    """
    root = Path(logdir)
    paths = find_runs(root)
    it: Iterable[Path] = paths
    if progress and paths:
        try:
            from tqdm.auto import tqdm

            it = tqdm(paths, desc="reading event files", unit="run", leave=False)
        except ImportError:  # pragma: no cover - tqdm ships with lightning
            pass
    runs = []
    for p in it:
        rel = p.relative_to(root).as_posix()
        runs.append(load_run(p, name=rel if rel != "." else (root.name or ".")))
    return runs


def align(*series: Series) -> tuple[np.ndarray, list[np.ndarray]]:
    """Restrict several series to the steps they all have.

    Args:
        *series: Series to align.

    Returns:
        ``(steps, [values of each series at those steps])``.

    Example:
        >>> a = Series(np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0]))
        >>> b = Series(np.array([1, 2, 3]), np.array([5.0, 6.0, 7.0]))
        >>> steps, (va, vb) = align(a, b)
        >>> steps.tolist(), va.tolist(), vb.tolist()
        ([1, 2], [2.0, 3.0], [5.0, 6.0])
    """
    if not series:
        return np.array([], dtype=np.int64), []
    common = series[0].steps
    for s in series[1:]:
        common = np.intersect1d(common, s.steps)
    out = [s.values[np.searchsorted(s.steps, common)] for s in series]
    return common, out


def step_stride(steps: np.ndarray) -> int:
    """Median spacing of ``steps`` (1 for fewer than two steps).

    Example:
        >>> step_stride(np.array([0, 10, 20, 30]))
        10
    """
    if steps.size < 2:
        return 1
    d = np.diff(steps)
    return max(1, math.floor(float(np.median(d)) + 0.5))

"""Number and name formatting for the report: table cells, p-values, file-name slugs."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")
    return s or "run"


def _unique_slugs(names: Sequence[str]) -> dict[str, str]:
    """File-name-safe, collision-free slug of each run name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = slug = _slug(name)
        i = 2
        while slug in used:
            slug, i = f"{base}_{i}", i + 1
        used.add(slug)
        out[name] = slug
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if v != 0 and abs(v) < 0.5 * 10**-digits:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")

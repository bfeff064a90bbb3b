"""Data flows one way: diagnostics → capture → (rules, mitigations) → callbacks → analysis.

Checked on the source (every import statement, not only top-level ones), so a lazy
import cannot sneak a dependency in the wrong direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "lightning_stability"

_ABOVE_CAPTURE = {
    "lightning_stability.mitigations",
    "lightning_stability.callbacks",
    "lightning_stability.analysis",
}

#: layer → modules it must never import
FORBIDDEN = {
    "diagnostics": {
        "lightning",
        "pytorch_lightning",
        "lightning_stability.capture",
        *_ABOVE_CAPTURE,
        "matplotlib",
        "tensorboard",
    },
    "capture": {"lightning", "pytorch_lightning", *_ABOVE_CAPTURE},
    # the rule book: plain Python, importable by every layer (the metric table is its only dependency)
    "rules": {
        "torch",
        "numpy",
        "lightning",
        "pytorch_lightning",
        "lightning_stability.diagnostics",
        "lightning_stability.capture",
        *_ABOVE_CAPTURE,
    },
    "mitigations": {
        "lightning",
        "pytorch_lightning",
        "lightning_stability.callbacks",
        "lightning_stability.analysis",
    },
    "callbacks": {"lightning_stability.analysis", "matplotlib"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer: str) -> None:
    for path in sorted((PKG / layer).rglob("*.py")):  # subpackages too
        for name in _imports(path):
            bad = [f for f in FORBIDDEN[layer] if name == f or name.startswith(f + ".")]
            assert not bad, f"{path.relative_to(PKG)} imports {name}"


def test_analysis_package_import_is_light() -> None:
    # the report and its matplotlib/tensorboard imports load only when used
    for name in ("__init__.py", "leadlag.py", "spikes.py", "regression.py"):
        top = {n.split(".")[0] for n in _imports(PKG / "analysis" / name)}
        assert not top & {"matplotlib", "tensorboard", "lightning"}, name


def test_rules_import_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, lightning_stability.rules as r; print(sorted(m for m in sys.modules if 'torch' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"

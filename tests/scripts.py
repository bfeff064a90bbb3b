"""Import a script of the repository (an example, a benchmark, a tool) by its path, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Execute the script at ``path`` as module ``name`` (default: its file name) and return it.

    The module is registered in ``sys.modules`` unless one of that name is there already (a script's
    dataclasses look their module up by name while they are created).
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module

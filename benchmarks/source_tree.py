"""Make ``import kvforge`` work from a plain source checkout (``PYTHONPATH=.``), as on the lent GPU
machine where the project is not pip-installed: the ``kvforge`` package is then the repository root
itself, so ``kvforge.kernels`` is ``kernels/``, ``kvforge.arch`` is ``arch/`` - exactly the mapping of
pyproject.toml's ``package-dir``. An installed kvforge always wins."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_kvforge_importable() -> None:
    if "kvforge" in sys.modules or importlib.util.find_spec("kvforge") is not None:
        return
    package = types.ModuleType("kvforge")
    package.__path__ = [str(REPO)]
    sys.modules["kvforge"] = package

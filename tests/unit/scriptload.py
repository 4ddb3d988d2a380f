"""The repository's extensionless Python scripts (scripts/bench, ...) as modules, so that their
pure helpers can be tested."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load(name: str) -> ModuleType:
    """scripts/<name>, executed as a module named tcpwatch_<name>."""
    loader = importlib.machinery.SourceFileLoader(f"tcpwatch_{name}", str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module

"""Golden files: expected output kept in tests/unit/golden/, one helper for every test module.

    TCPWATCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_top.py

rewrites the files from this run's output; review `git diff tests/unit/golden/` before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TCPWATCH_REGEN_GOLDEN") == "1"


def check_golden(name: str, actual: str | bytes, test_file: str) -> None:
    """actual must equal GOLDEN/name (text or bytes, as given); a missing file is empty.
    With TCPWATCH_REGEN_GOLDEN=1 the file is written from actual first."""
    path = GOLDEN / name
    binary = isinstance(actual, bytes)
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        if binary:
            path.write_bytes(actual)
        else:
            path.write_text(actual)
    if not path.exists():
        expected: str | bytes = b"" if binary else ""
    else:
        expected = path.read_bytes() if binary else path.read_text()
    assert actual == expected, (
        f"{path} differs from this run's output. If the change is intended, regenerate with\n"
        f"  TCPWATCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest {Path(test_file).name}\n"
        "and review `git diff tests/unit/golden/` before committing."
    )

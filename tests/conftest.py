"""Shared pytest set-up for tcpwatch.

* Under CI (``CI`` is ``true``/``1``/``yes``) a test that would be SKIPPED is reported as a
  FAILURE carrying the skip reason: CI must never pass by silently skipping the real-BPF tests.
  Expected failures (``xfail``) are left alone.
* ``needs_root_bpf``: a fixture that skips the test (a failure under CI) unless it runs as root,
  ``import bcc`` works and tracefs has ``events/sock/inet_sock_set_state``. Tests marked
  ``@pytest.mark.kernel`` and every test under ``tests/kernel/`` get the same check automatically.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

KERNEL_MARKER = "kernel: needs root, bcc and a BPF-capable kernel"
KERNEL_TESTS_DIR = Path(__file__).parent / "kernel"
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEPOINT = "events/sock/inet_sock_set_state"


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------- skip -> failure in CI


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (path, lineno, reason); keep a string as it is.
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, reason = longrepr
        reason = str(reason).removeprefix("Skipped: ")
        return f"{reason} ({path}:{lineno})"
    return str(longrepr)


def _fail_skip(report) -> None:
    reason = _skip_reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"SKIPPED under CI={os.environ.get('CI')}, which counts as a failure: {reason}\n"
        "CI must not skip tests silently: fix the environment (scripts/install.sh) or the test."
    )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # xfail results are reported as skipped too, but carry `wasxfail`: leave them alone.
    if ci_enabled() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    # Module-level skips (pytest.skip(allow_module_level=True), importorskip) happen at collection.
    outcome = yield
    report = outcome.get_result()
    if ci_enabled() and report.skipped:
        _fail_skip(report)


# ---------------------------------------------------------------------------- kernel marker, BPF


def pytest_configure(config):
    registered = [line.split(":", 1)[0].strip() for line in config.getini("markers")]
    if "kernel" not in registered:
        config.addinivalue_line("markers", KERNEL_MARKER)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if KERNEL_TESTS_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.kernel)


@functools.cache
def root_bpf_problem() -> str | None:
    """Why real-BPF tests cannot run here, or None when they can."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()}): run the suite as root (scripts/test.sh)")
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # ImportError, or bcc failing to load libbcc
        problems.append(
            f"`import bcc` failed with {sys.executable} ({type(exc).__name__}: {exc}); use the "
            "venv made by scripts/install.sh (from /usr/bin/python3 --system-site-packages, with "
            "python3-bpfcc installed; PyPI's 'bcc' is an unrelated project)"
        )
    if not any(os.path.exists(os.path.join(d, TRACEPOINT)) for d in TRACEFS_DIRS):
        problems.append(
            f"no {TRACEPOINT} under {' or '.join(TRACEFS_DIRS)}: tracefs is not mounted "
            "(mount -t tracefs tracefs /sys/kernel/tracing, or run scripts/install.sh) "
            "or the kernel is older than 4.16"
        )
    return "; ".join(problems) or None


@pytest.fixture
def needs_root_bpf() -> None:
    """Skip (fail under CI) unless root, bcc and tracepoint sock:inet_sock_set_state are here."""
    problem = root_bpf_problem()
    if problem:
        pytest.skip(f"needs root + bcc + tracefs: {problem}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("kernel") is not None:
        problem = root_bpf_problem()
        if problem:
            pytest.skip(f"kernel test needs root + bcc + tracefs: {problem}")

"""tests/conftest.py turns skips into failures when CI=true, and leaves them alone otherwise."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()

TESTS = """
import pytest

def test_passes():
    pass

def test_skips_in_body():
    pytest.skip("no BPF here")

@pytest.mark.skipif(True, reason="marker says no")
def test_skipif_marker():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False

def test_uses_fixture(needs_root_bpf, monkeypatch):
    pass
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=TESTS)
    # Make needs_root_bpf skip whatever machine this runs on.
    monkeypatch.setattr("os.geteuid", lambda: 4242)
    return pytester


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE"])
def test_skip_becomes_failure_under_ci(suite, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = suite.runpytest("-rA")
    # setup-phase skips (marker, fixture) become errors, a skip in the body a failure
    result.assert_outcomes(passed=1, failed=1, errors=2, xfailed=1, skipped=0)
    result.stdout.fnmatch_lines(["*SKIPPED under CI=*which counts as a failure: no BPF here*"])
    result.stdout.fnmatch_lines(["*SKIPPED under CI=*marker says no*"])
    result.stdout.fnmatch_lines(["*SKIPPED under CI=*not root (euid 4242)*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_skip_stays_skip_without_ci(suite, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = suite.runpytest("-rA")
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_module_level_skip_fails_under_ci(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_mod="""
        import pytest
        pytest.skip("whole module needs BPF", allow_module_level=True)

        def test_never():
            pass
        """
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*SKIPPED under CI=true*whole module needs BPF*"])
    assert result.ret != pytest.ExitCode.OK


def test_kernel_marker_gets_root_bpf_check(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_k="""
        import pytest

        @pytest.mark.kernel
        def test_bpf():
            pass
        """
    )
    monkeypatch.setattr("os.geteuid", lambda: 4242)
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest("-rs", "--strict-markers")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*kernel test needs root + bcc + tracefs: not root*"])

"""CLI behaviour that needs no kernel: help, version, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tcpwatch import __version__, cli, loader


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and __version__ in out


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_trace_help_lists_every_option(flag, capsys):
    code, out, _ = run(["trace", flag], capsys)
    assert code == 0
    for opt in ("--format", "--output", "--leak-after", "--duration", "--pid", "--port",
                "--state", "--stacks", "--buffer-mb", "--nice"):
        assert opt in out
    assert "sudo tcpwatch trace" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["trace", "--port", "0"], "--port"),
        (["trace", "--port", "70000"], "--port"),
        (["trace", "--pid", "abc"], "--pid"),
        (["trace", "--pid", "-3"], "--pid"),
        (["trace", "--state", "WAITING"], "not a TCP state"),
        (["trace", "--leak-after", "0"], "--leak-after"),
        (["trace", "--leak-after", "-5"], "--leak-after"),
        (["trace", "--duration", "soon"], "--duration"),
        (["trace", "--format", "xml"], "--format"),
        (["trace", "--nope"], "--nope"),
        (["trace", "--buffer-mb", "3"], "--buffer-mb"),
        (["trace", "--buffer-mb", "0"], "--buffer-mb"),
        (["trace", "--buffer-mb", "2048"], "--buffer-mb"),
        (["trace", "--nice", "-21"], "--nice"),
        (["trace", "--nice", "high"], "--nice"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args, needle, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tcpwatch: error:") and needle in lines[0]


def test_state_names_accept_any_case(monkeypatch, capsys):
    seen = {}

    def fake_preflight():
        seen["called"] = True
        raise loader.LoaderError("stop here")

    monkeypatch.setattr(loader, "preflight", fake_preflight)
    code, _, err = run(["trace", "--state", "close-wait", "--state", "last_ack"], capsys)
    assert seen and code == 1 and "stop here" in err


def test_not_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, out, err = run(["trace"], capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        "tcpwatch: error: tracing needs root: run it with sudo (e.g. sudo tcpwatch trace)"
    ]


def test_missing_bcc(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
    code, _, err = run(["trace"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "python3-bpfcc" in err and "--system-site-packages" in err


def test_tracefs_not_mounted(monkeypatch, capsys):
    pytest.importorskip("bcc")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(loader, "tracefs", lambda: None)
    code, _, err = run(["trace"], capsys)
    assert code == 1 and "mount -t tracefs" in err and len(err.strip().splitlines()) == 1


def test_no_usable_hook(monkeypatch, capsys):
    pytest.importorskip("bcc")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(loader, "tracefs", lambda: "/nonexistent")
    monkeypatch.setattr(loader, "tracepoint_exists", lambda cat, name: False)
    monkeypatch.setattr(loader, "_kprobes_possible", lambda: False)
    code, _, err = run(["trace"], capsys)
    assert code == 1 and "inet_sock_set_state" in err and len(err.strip().splitlines()) == 1


def test_headers_missing(monkeypatch, capsys):
    pytest.importorskip("bcc")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(loader, "tracefs", lambda: "/sys/kernel/tracing")
    monkeypatch.setattr(loader, "tracepoint_exists", lambda cat, name: True)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/nonexistent/headers")
    code, _, err = run(["trace"], capsys)
    assert code == 1 and "kernel headers not found" in err and "install" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_real_unprivileged_user_gets_no_traceback():
    """As a real unprivileged process (not a monkeypatch): one line, exit 1."""
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "tcpwatch", "trace"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "tcpwatch: error: tracing needs root: run it with sudo (e.g. sudo tcpwatch trace)"
    ]


@pytest.mark.parametrize("mb,pages", [(1, 256), (8, 2048), (32, 8192), (None, 4096)])
def test_buffer_mb_sizes_the_kernel_ring(monkeypatch, capsys, mb, pages):
    seen = []

    class Source:
        def __init__(self, opts):
            seen.append(opts)

        def open(self):
            raise loader.LoaderError("stop here")

        def close(self):
            pass

    monkeypatch.delenv("TCPWATCH_RING_PAGES", raising=False)
    monkeypatch.setattr(loader, "preflight", lambda: [])
    monkeypatch.setattr(loader, "KernelSource", Source)
    code, _, err = run(["trace"] + ([] if mb is None else ["--buffer-mb", str(mb)]), capsys)
    assert code == 1 and "stop here" in err
    assert seen[0].ring_pages == pages  # default: 16 MB


def test_every_thread_allocates_from_one_malloc_arena():
    """glibc (as on every supported distro) accepts M_ARENA_MAX=1 (see cli.one_malloc_arena)."""
    import platform

    from tcpwatch.cli import one_malloc_arena

    assert one_malloc_arena() == (platform.libc_ver()[0] == "glibc")


def test_top_has_every_large_block_mapped_and_given_back():
    """With large_blocks_mapped() a 1 MiB block is its own mapping even after a larger one
    was freed (glibc's default then raises its threshold to 8 MiB and takes the block from
    the heap), and it is unmapped when freed. In a fresh interpreter: a heap that already
    has a free chunk big enough serves the block from there either way."""
    import platform

    from tcpwatch.cli import large_blocks_mapped

    if platform.libc_ver()[0] != "glibc":
        assert not large_blocks_mapped()
        return
    script = """
import ctypes, sys
from tcpwatch.cli import large_blocks_mapped

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "mapped":
    assert large_blocks_mapped()
big = bytearray(8 << 20)
del big
before = mallinfo2().hblkhd
block = bytearray(1 << 20)
during = mallinfo2().hblkhd
del block
print(during - before >= 1 << 20, mallinfo2().hblkhd == before)
"""
    def run(how: str) -> str:
        return subprocess.run([sys.executable, "-c", script, how], capture_output=True,
                              text=True, check=True).stdout.split()

    assert run("mapped") == ["True", "True"]
    assert run("default") == ["False", "True"]  # glibc's own way: from the heap


@pytest.mark.parametrize("now,wanted,set_to", [(0, -5, -5), (-10, -5, None), (-5, -5, None),
                                               (5, 0, 0)])
def test_nice_only_ever_raises_the_priority(now, wanted, set_to, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "getpriority", lambda which, who: now)
    monkeypatch.setattr(cli.os, "setpriority", lambda which, who, n: calls.append(n))
    assert cli._set_nice(wanted) == []
    assert calls == ([] if set_to is None else [set_to])


def test_nice_refused_is_a_warning_not_an_error(monkeypatch):
    def refuse(which, who, n):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli.os, "getpriority", lambda which, who: 0)
    monkeypatch.setattr(cli.os, "setpriority", refuse)
    (warning,) = cli._set_nice(-5)
    assert "-5" in warning and "Operation not permitted" in warning


def test_realtime_is_sched_rr_1_for_the_calling_thread_and_back(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "sched_setscheduler",
                        lambda pid, policy, param: calls.append((pid, policy,
                                                                 param.sched_priority)))
    assert cli._set_realtime(True) == [] and cli._set_realtime(False) == []
    assert calls == [(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, 1), (0, os.SCHED_OTHER, 0)]


def test_realtime_refused_is_a_warning_not_an_error(monkeypatch):
    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli.os, "sched_setscheduler", refuse)
    (warning,) = cli._set_realtime(True)
    assert "real-time" in warning and "Operation not permitted" in warning

"""The syscall-number outcome source: numbers per machine, the start-up check, the flags, and
the tracepoint format parsing its fallback needs (tcpwatch/sysnr.py, loader)."""

from __future__ import annotations

import platform

import pytest

from tcpwatch import loader, sysnr

SHUTDOWN_FORMAT = """name: sys_enter_shutdown
ID: 2216
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int how;\toffset:24;\tsize:8;\tsigned:0;

print fmt: "fd: 0x%08lx, how: 0x%08lx", ((unsigned long)(REC->fd)), ((unsigned long)(REC->how))
"""


def test_format_field_offset():
    assert loader.format_field_offset(SHUTDOWN_FORMAT, "how") == 24
    assert loader.format_field_offset(SHUTDOWN_FORMAT, "fd") == 16
    # Not 8 bytes wide, or absent: None (the program reads 8 bytes there).
    assert loader.format_field_offset(SHUTDOWN_FORMAT, "__syscall_nr") is None
    assert loader.format_field_offset(SHUTDOWN_FORMAT, "common_pid") is None
    assert loader.format_field_offset(SHUTDOWN_FORMAT, "flags") is None
    assert loader.format_field_offset("", "how") is None


@pytest.fixture
def x86(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("TCPWATCH_SYSCALL_TP", raising=False)


def test_numbers_per_machine(x86, monkeypatch):
    assert sysnr.numbers()["close"] == 3
    monkeypatch.setenv("TCPWATCH_SYSCALL_TP", "1")
    assert sysnr.numbers() is None
    monkeypatch.delenv("TCPWATCH_SYSCALL_TP")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert sysnr.numbers() is None


def test_flags_only_where_the_helpers_load(x86, monkeypatch):
    monkeypatch.setattr(sysnr, "helpers_load", lambda: False)
    assert sysnr.build_flags() == []
    monkeypatch.setattr(sysnr, "helpers_load", lambda: True)
    assert sysnr.build_flags() == ["-DTW_HAVE_TASK_REGS", "-DTW_REGS_NR_OFF=120",
                                   "-DTW_NR_CLOSE=3", "-DTW_NR_CLOSE_RANGE=436",
                                   "-DTW_NR_SHUTDOWN=48"]
    monkeypatch.setenv("TCPWATCH_SYSCALL_TP", "1")
    assert sysnr.build_flags() == []


def test_check_needs_listen_and_close_read_right(x86):
    assert sysnr.check({"sysnr": 50}, {"sysnr": 3}) is None
    assert "listen() read as 0" in sysnr.check({"sysnr": 0}, {"sysnr": 3})
    assert "close() as 42" in sysnr.check({"sysnr": 50}, {"sysnr": 42})
    assert "read as None" in sysnr.check(None, None)  # the calibration saw nothing


def test_check_refuses_unknown_machines(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert sysnr.check({"sysnr": 50}, {"sysnr": 3}) == "no syscall numbers for riscv64"
    assert sysnr.check(None, None) == "no syscall numbers for riscv64"

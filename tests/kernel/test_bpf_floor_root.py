"""What scripts/bench's floor and norescue modes rest on. scripts/bpf_floor's empty programs must
really be attached to the state tracepoint and run for every transition, or the floor measures
nothing; TCPWATCH_RESCUE=0 must leave tcpwatch one program there instead of two."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcpwatch import bpfsys

REPO = Path(__file__).resolve().parents[2]
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")

pytestmark = pytest.mark.kernel


def prog_stats(pid: int) -> dict[int, tuple[int, int]]:
    """prog_id -> (run_cnt, recursion_misses) of the BPF programs the process holds."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":\t", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines() if ":\t" in line)
            out[int(info["prog_id"])] = (int(info["run_cnt"]), int(info["recursion_misses"]))
    return out


def prog_exists(prog_id: int) -> bool:
    """BPF_PROG_GET_FD_BY_ID: does the kernel still have the program?"""
    try:
        fd = bpfsys.call(13, bpfsys.attr_buffer(struct.pack("<I", prog_id)))
    except OSError as exc:
        assert exc.errno == errno.ENOENT, exc
        return False
    os.close(fd)
    return True


def churn(n: int) -> None:
    """n loopback connections, the client closing first: ten transitions each."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        for _ in range(n):
            c = socket.create_connection(srv.getsockname())
            s, _ = srv.accept()
            c.close()
            s.recv(1)  # the FIN: s is in CLOSE_WAIT
            s.close()


@pytest.fixture
def bpf_stats():
    old = STATS.read_text().strip()
    STATS.write_text("1")
    yield
    STATS.write_text(old)


@contextlib.contextmanager
def floor(*args: str):
    """scripts/bpf_floor with these arguments, attached (two programs in all): (its pid, the
    programs' stats then); stopped with SIGINT after, which it must take as a clean exit."""
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "bpf_floor"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready 2", proc.stderr.read()
        before = prog_stats(proc.pid)
        assert len(before) == 2
        yield proc.pid, before
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_floor_programs_run_on_every_transition(bpf_stats) -> None:
    with floor("--programs", "2") as (pid, before):
        churn(20)
        time.sleep(0.3)  # the last transitions (LAST_ACK -> CLOSE) come with the final ACK
        after = prog_stats(pid)
        runs = {p: after[p][0] - before[p][0] for p in before}
        misses = {p: after[p][1] - before[p][1] for p in before}
        # 20 connections: 200 transitions of ours, plus the listener's and any other socket's.
        for p, n in runs.items():
            assert n + misses[p] >= 200, (runs, misses)
        # Both see the same firings: the floor is two programs per transition.
        a, b = runs.values()
        assert abs(a - b) <= sum(misses.values()), (runs, misses)
    # Detached and freed with the process (after an RCU grace period or so).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(prog_exists(p) for p in before):
        time.sleep(0.1)
    assert not any(prog_exists(p) for p in before)


def test_floor_on_the_send_recv_hooks_runs_for_every_call(bpf_stats) -> None:
    """scripts/bench_data's floor: one empty program on each of the hooks tcpwatch has on the
    data path, run once per send and once per recv."""
    with floor("--programs", "1", "--tracepoint", "sock_recv_length,sock_send_length") as (
            pid, before):
        with socket.create_server(("127.0.0.1", 0)) as srv:
            c = socket.create_connection(srv.getsockname())
            s, _ = srv.accept()
            with c, s:
                for _ in range(300):
                    c.sendall(b"x")
                    assert s.recv(1) == b"x"
        after = prog_stats(pid)
        for p in before:
            runs = after[p][0] - before[p][0]
            misses = after[p][1] - before[p][1]
            assert runs + misses >= 300, (p, runs, misses)


def test_floor_refuses_a_bad_count() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bpf_floor"), "--programs",
                          "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def state_links(pid: int) -> int:
    """The process's BPF links on the state tracepoint."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf_link":
                n += "tp_name:\tinet_sock_set_state" in Path(
                    f"/proc/{pid}/fdinfo/{fd}").read_text()
    return n


@pytest.mark.parametrize("rescue", ["1", "0"])
def test_norescue_leaves_one_program_on_the_state_tracepoint(monkeypatch, rescue):
    """scripts/bench's top-norescue compares top against itself with one program on the
    tracepoint instead of two (TCPWATCH_RESCUE=0): that must be what it gets, and said."""
    from conftest import Tracer

    monkeypatch.setenv("TCPWATCH_RESCUE", rescue)
    monkeypatch.delenv("TCPWATCH_PERF_BUFFER", raising=False)  # no rescue with the perf buffer
    tr = Tracer(["--duration", "60"])
    try:
        start = tr.wait_for(lambda r: r.get("event") == "start", 20, "start record")
        hooks = start["hooks"]
        assert hooks["state"].startswith("raw_tracepoint:inet_sock_set_state"), hooks
        if rescue == "0":
            assert state_links(tr.proc.pid) == 1
            assert hooks["rescue"].startswith("off (TCPWATCH_RESCUE=0)"), hooks
        else:
            assert state_links(tr.proc.pid) == 2
            assert hooks["rescue"].startswith("raw_tracepoint:inet_sock_set_state"), hooks
    finally:
        tr.kill()

"""Why a socket left CLOSE_WAIT, told two ways: from the number of the syscall the closer is in
(read from its saved registers, checked at start-up; the default where the kernel offers it)
and from the syscall tracepoints (TCPWATCH_SYSCALL_TP=1, the fallback). Both must give the same
outcomes for real closes, and the first must leave no syscall tracepoint attached: attached,
they put every syscall on the host on the kernel's slow path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import socket

import pytest
from scenarios import match

from tcpwatch import sysnr

SYS_CLOSE_RANGE = sysnr.NUMBERS.get(platform.machine(), {}).get("close_range")
ACTIONS = {  # what the holder does with its socket in CLOSE_WAIT -> the outcome tcpwatch names
    "close": "closed",
    "close_range": "closed",
    "shutdown": "shutdown",
    "exit": "exit",
}


def hold(sock: socket.socket, action: str) -> tuple[int, int]:
    """Fork a holder of `sock` that does `action` on a byte from the returned pipe, then exits
    once the pipe closes ("exit": at once). Returns (pid, write end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: only os calls, then _exit
        try:
            os.close(w)
            os.read(r, 1)
            fd = sock.fileno()
            if action == "close":
                os.close(fd)
            elif action == "close_range":
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.syscall(SYS_CLOSE_RANGE, fd, fd, 0) != 0:
                    os._exit(3)
            elif action == "shutdown":
                sock.shutdown(socket.SHUT_WR)
            if action != "exit":
                os.read(r, 1)  # EOF: the test is done with this one
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


def perf_fds(pid: int) -> int:
    """Open perf events of a process: a classic tracepoint attachment is one."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
    return n


def run_actions(tracer, source: str) -> tuple[dict, int]:
    """Every action once under one tracer; returns its start record and perf event count."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        addr = ls.getsockname()
        tr = tracer(leak_after=30, port=addr[1])
        start = next(r for r in tr.records if r["event"] == "start")
        events = perf_fds(tr.proc.pid)
        for action, want in ACTIONS.items():
            with socket.create_connection(addr) as c:
                s, _ = ls.accept()
                rport = c.getsockname()[1]
                pid, w = hold(s, action)
                s.close()  # the holder's is the last reference
                try:
                    c.shutdown(socket.SHUT_WR)  # FIN: the holder's socket goes CLOSE_WAIT
                    tr.wait_for(match("state", rport=rport, new="CLOSE_WAIT"), 10,
                                f"{action}: ->CLOSE_WAIT")
                    os.write(w, b"g")
                    rec = tr.wait_for(match("close_wait", rport=rport), 10, f"{action}: close_wait")
                finally:
                    os.close(w)
                    _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0, (source, action)
                assert rec["outcome"] == want, (source, action, rec)
                assert rec["closer_pid"] == pid, (source, action, rec)
                assert rec["new"] == "LAST_ACK", (source, action, rec)
        tr.stop()
    return start, events


def test_outcomes_from_the_syscall_number_and_from_the_tracepoints(tracer, monkeypatch):
    monkeypatch.delenv("TCPWATCH_SYSCALL_TP", raising=False)
    start, events = run_actions(tracer, "syscall number")
    outcome = start["hooks"]["outcome"]
    assert outcome.startswith("syscall number (pt_regs, checked)"), outcome
    assert "syscalls:" not in outcome, outcome

    monkeypatch.setenv("TCPWATCH_SYSCALL_TP", "1")
    start_tp, events_tp = run_actions(tracer, "tracepoints")
    outcome_tp = start_tp["hooks"]["outcome"]
    syscall_tps = [k for k in outcome_tp.split(",") if k.startswith("syscalls:")]
    assert syscall_tps == ["syscalls:sys_enter_close", "syscalls:sys_enter_close_range",
                           "syscalls:sys_enter_shutdown"], outcome_tp
    # The same tracer but for those: one perf event each, none without them.
    assert events_tp - events == len(syscall_tps), (events, events_tp)


@pytest.mark.parametrize("how", [socket.SHUT_RD])
def test_shutdown_for_reading_leaves_close_wait_alone(tracer, how):
    """shutdown(SHUT_RD) sends nothing: the socket stays in CLOSE_WAIT, no exit is made up."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        tr = tracer(leak_after=30, port=ls.getsockname()[1])
        with socket.create_connection(ls.getsockname()) as c:
            s, _ = ls.accept()
            with s:
                rport = c.getsockname()[1]
                c.shutdown(socket.SHUT_WR)
                tr.wait_for(match("state", rport=rport, new="CLOSE_WAIT"), 10, "->CLOSE_WAIT")
                s.shutdown(how)
                s.close()  # the exit that does happen: close()
                rec = tr.wait_for(match("close_wait", rport=rport), 10, "close_wait")
        assert rec["outcome"] == "closed" and rec["closer_pid"] == os.getpid(), rec
        tr.stop()

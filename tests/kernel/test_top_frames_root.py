"""top's frames against the real kernel: a collector that keeps each tracked socket's CwSock
from frame to frame (while its `cw` map entry, accepted /proc entry and holders are
unchanged) shows
what a new collector makes from scratch, as one real socket goes through CLOSE_WAIT: in the
accept queue, accepted, written to (the map entry changes alone: the owner is now seen on
the socket), read to EOF, handed to a child that holds it while the parent closes its copy,
and closed.

Needs root (the kernel programs)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest

from tcpwatch import loader, procnet, schema
from tcpwatch.top import collect
from tcpwatch.top.hostinfo import read_port_range

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

REQUEST = b"GET / HTTP/1.1\r\n\r\n"


def _in_close_wait(port: int) -> list[procnet.TcpEntry]:
    return [e for e in procnet.snapshot({schema.CLOSE_WAIT}) if e.lport == port]


def _wait(predicate, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def test_kept_sockets_are_those_made_afresh_as_a_real_socket_changes():
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    src = loader.KernelSource(loader.Options(
        states=(schema.CLOSE_WAIT,), ports=(port,), cw_map=True, exit_detail_s=1.0,
        ephemeral=read_port_range()))
    child = 0
    now = [time.monotonic_ns()]
    try:
        opened = src.open()

        def collector() -> collect.KernelCollector:
            return collect.KernelCollector(src, opened.hooks, ports=(port,), cw_map=True,
                                           clock=lambda: now[0])

        kept = collector()
        kept.sample()

        def frame(step: str) -> list:
            """The kept collector's sockets, checked against a new collector's."""
            now[0] = time.monotonic_ns()
            fresh = collector().sample().sockets
            got = kept.sample().sockets
            assert got == fresh, step
            return got

        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(REQUEST)
        c.shutdown(socket.SHUT_WR)
        _wait(lambda: _in_close_wait(port), "CLOSE_WAIT")
        (s,) = frame("in the accept queue")
        assert (s.cause, s.pid, s.unread) == ("not_accepted", os.getpid(), len(REQUEST))
        (sk,) = kept._known

        a, _ = lsock.accept()
        _wait(lambda: _in_close_wait(port)[0].inode, "an inode")
        (s,) = frame("accepted")
        assert (s.cause, s.pid, s.unread) == ("not_reading", os.getpid(), len(REQUEST))
        # no owner yet: the listener was made before the programs loaded, nobody used the
        # socket since
        assert kept._known[sk].owner is None
        assert frame("nothing changed")[0] is s  # kept, not made again (once accepted)

        a.sendall(b"x")  # the map entry changes alone: the owner is seen on the socket
        assert frame("written to")[0].cause == "not_reading"
        assert kept._known[sk].owner.how == "socket"

        assert a.recv(100) == REQUEST and a.recv(100) == b""  # EOF read
        (s,) = frame("read to EOF")
        assert (s.cause, s.unread) == ("eof_ignored", 0)

        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # holds its copy until told, then closes it by exiting
            try:
                os.read(r, 1)
            finally:
                os._exit(0)
        a.close()
        (s,) = frame("held by a child")
        assert (s.cause, s.pid) == ("held_elsewhere", child)

        os.write(w, b"x")
        os.waitpid(child, 0)
        child = 0
        _wait(lambda: not _in_close_wait(port), "the close")
        src.poll(0.1)
        assert frame("closed") == [] and sk not in kept._known
        c.close()
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        src.close()
        lsock.close()

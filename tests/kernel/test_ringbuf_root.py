"""The ring buffer read through mmap (ringbuf.MmapRing) against the real kernel program.

Two KernelSources are loaded at once, one reading its ring through mmap and one through
bcc's callback (TCPWATCH_RINGBUF=bcc); both programs see the same transitions, so both
readers must deliver the same events in the same order. A one-page ring (forced losses,
the positions lapping the data area hundreds of times) must still account for every
transition: delivered + lost + missed == made.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest
from scenarios import PER_CONNECTION, Burst

from tcpwatch import loader, ringbuf, schema

pytestmark = pytest.mark.kernel

CLIENT_CHAIN = ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
SERVER_CHAIN = ["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
TIMING = ("ts_ns", "prev_ns", "cw_ns", "fin_read_ns")  # differ between two programs
RECORD = (8 + schema.layout().size + 7) & ~7  # ring bytes per event: header, payload, padding


@contextlib.contextmanager
def kernel_source(reader: str, monkeypatch, **opts):
    """A KernelSource opened with TCPWATCH_RINGBUF=reader, closed afterwards."""
    with monkeypatch.context() as env:
        env.delenv("TCPWATCH_PERF_BUFFER", raising=False)
        env.setenv("TCPWATCH_RINGBUF", reader)
        src = loader.KernelSource(loader.Options(**opts))
        try:
            opened = src.open()
        except BaseException:
            src.close()
            raise
    try:
        assert opened.hooks["buffer"] == "ring", opened.hooks
        assert src.ring_reader == reader, (src.ring_reader, opened.warnings)
        yield src
    finally:
        src.close()


def collect(src, got: list[bytes], want: int, timeout_s: float = 10.0) -> None:
    """Poll until `want` events (minus those the kernel skipped) arrived or time is up."""
    deadline = time.monotonic() + timeout_s
    while len(got) + src.counters()["missed"] < want and time.monotonic() < deadline:
        got += src.poll(0.05)
    got += src.poll(0)


def chains(events: list[dict]) -> list[list[str]]:
    """Each socket's states in the order the events came: [old of the first, new, new...].
    A socket ends in CLOSE; a later event with the same sk is a new socket at that address."""
    open_: dict[int, list[str]] = {}
    done: list[list[str]] = []
    for ev in events:
        old, new = schema.state_name(ev["old"]), schema.state_name(ev["new"])
        chain = open_.setdefault(ev["sk"], [old])
        assert chain[-1] == old, (ev, chain)  # delivered in order
        chain.append(new)
        if new == "CLOSE":
            done.append(open_.pop(ev["sk"]))
    return done + list(open_.values())


@pytest.fixture
def one_cpu():
    """Keep this thread (and so the loopback softirq work it triggers) on one CPU: then
    both programs see every transition in the same order and ts_ns is the ring's order."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


def test_mmap_reader_delivers_what_bcc_delivers(monkeypatch, one_cpu):
    n = 300
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    port = listener.getsockname()[1]
    with kernel_source("mmap", monkeypatch, ports=(port,)) as fast, \
            kernel_source("bcc", monkeypatch, ports=(port,)) as slow:
        # Nothing but our MmapRing consumes this ring: bcc's reader was never set up.
        assert fast.bpf._ringbuf_manager is None
        got_fast: list[bytes] = []
        got_slow: list[bytes] = []
        client_ports = set()
        for i in range(n):
            c = socket.create_connection(("127.0.0.1", port))
            client_ports.add(c.getsockname()[1])
            a, _ = listener.accept()
            c.close()
            a.close()
            if i % 50 == 49:  # several drains, each handing room back to the kernel
                got_fast += fast.poll(0)
                got_slow += slow.poll(0)
        listener.close()  # LISTEN>CLOSE: it listened before the tracers started
        made = n * PER_CONNECTION + 1
        collect(fast, got_fast, made)
        collect(slow, got_slow, made)
        counts_fast, counts_slow = fast.counters(), slow.counters()

    assert counts_fast["lost"] == counts_slow["lost"] == 0
    assert len(got_fast) == counts_fast["events"], counts_fast
    assert len(got_fast) + counts_fast["missed"] == made, counts_fast
    assert len(got_slow) == len(got_fast), (counts_slow, counts_fast)
    assert all(type(raw) is bytes for raw in got_fast)

    fast_ev = [schema.decode(raw) for raw in got_fast]
    slow_ev = [schema.decode(raw) for raw in got_slow]
    # Same events, same order, same fields but for the times each program took itself.
    strip = lambda ev: {k: v for k, v in ev.items() if k not in TIMING}  # noqa: E731
    for i, (f, s) in enumerate(zip(fast_ev, slow_ev)):
        assert strip(f) == strip(s), (i, f, s)
    stamps = [ev["ts_ns"] for ev in fast_ev]
    assert stamps == sorted(stamps), "not in ring order"

    # The known connections, each socket's transitions complete and in order.
    lifetimes = chains(fast_ev)
    if counts_fast["missed"] == 0:
        assert sorted(map(tuple, lifetimes)) == sorted(
            [("LISTEN", "CLOSE")] + [tuple(CLIENT_CHAIN)] * n + [tuple(SERVER_CHAIN)] * n)
    server_side = {ev["rport"] for ev in fast_ev if ev["lport"] == port and ev["rport"]}
    assert server_side == client_ports
    assert {(ev["family"], ev["laddr"], ev["raddr"]) for ev in fast_ev} == {
        (4, "127.0.0.1", "127.0.0.1"), (4, "127.0.0.1", "0.0.0.0")}  # the latter: listener




@pytest.mark.parametrize("pages", [1, 4])
def test_small_ring_accounts_for_every_transition(monkeypatch, pages):
    # One page: the mapping holds the data area twice. Four: the second copy is cut short
    # (ringbuf.EXTRA), so drains that pass the end of the data area go on from its start.
    connections = 2000
    made = connections * PER_CONNECTION + 1
    burst = Burst(connections)
    port = burst.port
    try:
        with kernel_source("mmap", monkeypatch, ports=(port,), ring_pages=pages) as src:
            assert src._ring.data_size == 4096 * pages
            assert len(src._ring._mm) == 4096 + 4096 * pages + ringbuf.EXTRA
            got: list[bytes] = []
            burst.go()
            while burst.running():  # drain as trace does, on a short timer
                got += src.poll(0.002)
            assert burst.done()
            deadline = time.monotonic() + 10
            while True:
                got += src.poll(0.05)
                counts = src.counters()
                if len(got) + counts["lost"] + counts["missed"] >= made:
                    break
                assert time.monotonic() < deadline, (len(got), counts)
            got += src.poll(0)
            counts = src.counters()
    finally:
        burst.close()
    assert counts["lost"] > 0, "a small ring should overflow under this burst"
    assert len(got) == counts["events"], counts
    assert len(got) + counts["lost"] + counts["missed"] == made, (len(got), counts)
    assert 0 < counts["buffer_peak_pct"] <= 100, counts
    # Each record lapped the data area many times over: none may come out torn.
    assert len(got) * RECORD > 20 * 4096 * pages
    for raw in got:
        ev = schema.decode(raw)
        assert ev["kind"] == 1 and ev["family"] == 4, ev
        assert port in (ev["lport"], ev["rport"]), ev
        assert ev["laddr"] == "127.0.0.1" and ev["raddr"] in ("127.0.0.1", "0.0.0.0"), ev
        assert ev["ts_ns"] > 0, ev
        assert schema.state_name(ev["old"]) in CLIENT_CHAIN + SERVER_CHAIN, ev
        assert schema.state_name(ev["new"]) in CLIENT_CHAIN + SERVER_CHAIN, ev


def test_wait_and_drain(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    with kernel_source("mmap", monkeypatch, ports=(port,)) as src:
        ring = src._ring
        assert ring.pending() == 0 and ring.wait(0.1) is False
        assert src.poll(0) == []
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = listener.accept()
        c.close()
        a.close()
        # No wakeup comes for these (BPF_RB_NO_WAKEUP): wait() sees them in the ring itself.
        deadline = time.monotonic() + 10
        while ring.pending() < PER_CONNECTION * RECORD and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ring.wait(5) is True
        waiting = ring.pending()
        first = ring.drain(limit=3)
        rest = src.poll(0)
        assert len(first) == 3 and len(first) + len(rest) == PER_CONNECTION
        assert ring.pending() == 0 and ring.wait(0) is False
        # The fullest it was at a drain: all of that connection's records, waiting.
        assert ring.peak == waiting == PER_CONNECTION * RECORD
        assert src.counters()["buffer_peak_pct"] == round(100 * waiting / ring.data_size, 1)
        lifetimes = chains([schema.decode(raw) for raw in first + rest])
        assert sorted(map(tuple, lifetimes)) == [tuple(CLIENT_CHAIN), tuple(SERVER_CHAIN)]
    listener.close()


def test_bad_reader_name_is_refused(monkeypatch):
    monkeypatch.setenv("TCPWATCH_RINGBUF", "fast")
    src = loader.KernelSource(loader.Options(ports=(9,)))
    try:
        with pytest.raises(loader.LoaderError, match="TCPWATCH_RINGBUF"):
            src.open()
    finally:
        src.close()

"""Perf buffers are per CPU: a socket's events can reach the aggregator out of order."""

from __future__ import annotations

from streams import WALL_OFFSET_NS, FakeResolver, Proc, at, life, step

from tcpwatch.aggregate import Aggregator

CLIENT = Proc(900, "client")


def test_a_late_older_event_does_not_drop_a_socket_in_close_wait():
    evs = life(0xB2, [
        step(0.0, "CLOSE", "SYN_SENT", owner=CLIENT, actor=CLIENT),
        step(0.001, "SYN_SENT", "ESTABLISHED", owner=CLIENT),
        step(0.002, "ESTABLISHED", "CLOSE_WAIT", owner=CLIENT),
    ])
    agg = Aggregator(1.0, WALL_OFFSET_NS, FakeResolver().resolve)
    for ev in (evs[2], evs[0], evs[1]):  # CLOSE_WAIT first, as one CPU's buffer was read first
        agg.feed(ev)
    (leak,) = agg.tick(at(5))
    assert leak["sk"] == "0xb2" and leak["pid"] == 900


def test_a_newer_event_still_ends_stale_tracking():
    """sk reused by a new connection after a lost CLOSE_WAIT exit: the old socket is gone."""
    old = life(0xC3, [step(0.0, "ESTABLISHED", "CLOSE_WAIT", owner=CLIENT)])
    new = life(0xC3, [step(2.0, "CLOSE", "SYN_SENT", owner=CLIENT, actor=CLIENT)])
    agg = Aggregator(1.0, WALL_OFFSET_NS, FakeResolver().resolve)
    for ev in old + new:
        agg.feed(ev)
    assert agg.tick(at(5)) == []

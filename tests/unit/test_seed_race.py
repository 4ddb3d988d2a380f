"""Start-up race: a socket seen in /proc *and* reported entering CLOSE_WAIT by the kernel."""

from __future__ import annotations

from streams import NETNS, T0, WALL_OFFSET_NS, Entry, FakeResolver, Proc, at, life, step

from tcpwatch.aggregate import Aggregator

SERVER = Proc(812, "server")
TUPLE = ("10.0.0.1", 8080, "10.0.0.2", 51234)


def test_kernel_entry_replaces_the_seeded_socket_and_it_leaks_once():
    agg = Aggregator(30.0, WALL_OFFSET_NS, FakeResolver().resolve)
    (existing,) = agg.seed_existing([Entry(NETNS, 4, *TUPLE, rx_queue=1, inode=9100)], {}, T0)
    assert existing["event"] == "existing"
    # The kernel's ESTABLISHED -> CLOSE_WAIT of the same socket, drained after the snapshot.
    for ev in life(0xA1, [step(0.2, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)]):
        agg.feed(ev)
    assert len(agg.in_close_wait()) == 1
    leaks = agg.tick(at(60))
    assert len(leaks) == 1
    (leak,) = leaks
    assert leak["preexisting"] is False and leak["since"] is not None
    assert leak["sk"] == "0xa1" and leak["pid"] == 812

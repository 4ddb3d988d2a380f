"""The kernel's socket map is bounded (LRU): when it has to forget sockets, tcpwatch says so.

A map of 64 entries and 150 loopback connections held open: 301 sockets enter it (the
listener, each client and each accepted child), none leaves, so at least 237 were evicted.
"""

from __future__ import annotations

import socket
import time

import pytest

from tcpwatch import loader

pytestmark = pytest.mark.kernel

MAP = 64
CONNECTIONS = 150


def test_evictions_from_the_socket_map_are_counted():
    src = loader.KernelSource(loader.Options(max_socks=MAP))
    try:
        src.open()
        before = src.counters()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(CONNECTIONS)
        held = []
        for _ in range(CONNECTIONS):
            client = socket.create_connection(listener.getsockname())
            child, _ = listener.accept()
            held += [client, child]
        time.sleep(0.2)
        after = src.counters()
        inserted = after["sock_insert"] - before["sock_insert"]
        deleted = after["sock_delete"] - before["sock_delete"]
        # Other sockets on the host may come and go meanwhile: ours are at least these.
        assert inserted >= 2 * CONNECTIONS + 1, after
        assert after["sock_evicted_min"] == max(
            0, after["sock_insert"] - after["sock_delete"] - MAP)
        assert after["sock_evicted_min"] >= 2 * CONNECTIONS + 1 - MAP - deleted, after
        for s in held:
            s.close()
        listener.close()
    finally:
        src.close()

"""sock_diag against /proc/net/tcp{,6} on real sockets: the same entries, field for field.

Needs root (fchown of a socket to another uid, ip netns, entering namespaces). Other tests
and programs may hold sockets at the same time, so every comparison is restricted to the
ports this test made, and repeated until two /proc reads around the sock_diag read agree.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tcpwatch import procnet, sockdiag
from tcpwatch.procnet import Namespace, TcpEntry, list_netns, read_tcp, snapshot

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

SYN_RECV, ESTABLISHED, FIN_WAIT2, TIME_WAIT, CLOSE_WAIT, LISTEN = 3, 1, 5, 6, 8, 10
NOBODY = 65534


def own_ns() -> Namespace:
    return list_netns()[0]


def via_proc(ns: Namespace, states=None) -> list[TcpEntry]:
    old = os.environ.get(procnet.PROCNET_ENV)
    os.environ[procnet.PROCNET_ENV] = "proc"
    try:
        return read_tcp(ns, states=states)
    finally:
        if old is None:
            del os.environ[procnet.PROCNET_ENV]
        else:
            os.environ[procnet.PROCNET_ENV] = old


def via_diag(ns: Namespace, states=None) -> list[TcpEntry]:
    """procnet.read_tcp, checked to have gone through sock_diag (not the /proc fallback)."""
    calls = []
    real = sockdiag.read_tcp

    def spy(sock, netns, states=None, each=None):
        calls.append(netns)
        return real(sock, netns, states, each)

    sockdiag.read_tcp = spy
    try:
        got = read_tcp(ns, states=states)
    finally:
        sockdiag.read_tcp = real
    assert calls == [ns.inode], "read_tcp fell back to /proc"
    return got


def mine(entries, ports) -> set[TcpEntry]:
    return {e for e in entries if e.lport in ports or e.rport in ports}


def settled(ns: Namespace, ports: set[int], states=None, tries: int = 20):
    """(sock_diag entries, /proc entries) of our ports, from a moment when /proc read the
    same before and after sock_diag did (sockets change state and queues on their own)."""
    for _ in range(tries):
        before = mine(via_proc(ns, states), ports)
        diag = mine(via_diag(ns, states), ports)
        after = mine(via_proc(ns, states), ports)
        if before == after:
            return diag, before
        time.sleep(0.05)
    raise AssertionError("our sockets kept changing")


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@pytest.fixture
def zoo():
    """One of each: listeners (one with a connection still in its accept queue), ESTABLISHED
    pairs with data unread and unsent both ways, a CLOSE_WAIT with unread bytes and one never
    accepted, IPv6 and v4-mapped pairs, a TIME_WAIT, and a request socket (SYN_RECV: a
    TCP_DEFER_ACCEPT listener owned by uid 65534 holds the handshake)."""
    keep: list[socket.socket] = []
    info: dict = {}

    def listener(family=socket.AF_INET, addr="127.0.0.1", dual=False) -> socket.socket:
        s = socket.socket(family)
        if dual:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr, 0))
        s.listen(8)
        keep.append(s)
        return s

    def connect(lst: socket.socket, addr: str, rcvbuf: int = 0) -> tuple[socket.socket, ...]:
        c = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        if rcvbuf:  # fixed: no autotuning that would open the window again later
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        c.connect((addr, lst.getsockname()[1]))
        s, _ = lst.accept()
        keep.extend((c, s))
        return c, s

    l4 = listener()
    info["v4"] = l4.getsockname()[1]
    client, server = connect(l4, "127.0.0.1", rcvbuf=65536)
    client.sendall(b"x" * 3)  # server: 3 unread
    # The server fills the client's receive buffer and then some: unsent and unacked bytes
    # (write_seq - snd_una) stay on its side, unread ones on the client's.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    server.setblocking(False)
    try:
        while True:
            server.send(b"y" * 65536)
    except BlockingIOError:
        pass
    cw_client, _cw = connect(l4, "127.0.0.1")
    cw_client.sendall(b"hello")
    cw_client.close()  # _cw: CLOSE_WAIT with 5 bytes + FIN unread
    queued = socket.create_connection(("127.0.0.1", info["v4"]))
    queued.close()  # its server side: CLOSE_WAIT in the accept queue, inode 0

    l6 = listener(socket.AF_INET6, "::1")
    info["v6"] = l6.getsockname()[1]
    c6, _s6 = connect(l6, "::1")
    c6.sendall(b"z" * 7)

    dual = listener(socket.AF_INET6, "::", dual=True)
    info["dual"] = dual.getsockname()[1]
    cm, _sm = connect(dual, "127.0.0.1")  # the server side is ::ffff:127.0.0.1 in tcp6
    cm.sendall(b"m" * 2)
    cm.close()

    tw_lst = listener()
    info["tw"] = tw_lst.getsockname()[1]
    tw_client, tw_server = connect(tw_lst, "127.0.0.1")
    tw_client.close()
    time.sleep(0.05)
    tw_server.close()  # the client, which closed first, is left in TIME_WAIT

    deferred = listener()
    os.fchown(deferred.fileno(), NOBODY, -1)  # a socket's uid follows its inode's owner
    deferred.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
    info["syn"] = deferred.getsockname()[1]
    keep.append(socket.create_connection(("127.0.0.1", info["syn"])))

    info["ports"] = {info[k] for k in ("v4", "v6", "dual", "tw", "syn")}
    try:
        yield info
    finally:
        for s in keep:
            s.close()


def test_sock_diag_equals_proc(zoo):
    ns = own_ns()

    def ready():
        diag, proc = settled(ns, zoo["ports"])
        states = {e.state for e in proc}
        wanted = {SYN_RECV, ESTABLISHED, FIN_WAIT2, TIME_WAIT, CLOSE_WAIT, LISTEN}
        return (diag, proc) if wanted <= states else None

    got = wait_for(ready)
    assert got, "some of our sockets never reached their state"
    diag, proc = got
    assert diag == proc
    assert len(proc) >= 17
    by = {(e.state, e.lport, e.family): e for e in proc}

    lst = by[(LISTEN, zoo["v4"], 4)]
    assert (lst.laddr, lst.raddr, lst.tx_queue, lst.rx_queue) == ("127.0.0.1", "0.0.0.0", 0, 1)
    cw = [e for e in proc if e.state == CLOSE_WAIT and e.lport == zoo["v4"]]
    assert sorted((e.rx_queue, e.inode != 0) for e in cw) == [(1, False), (6, True)]
    est = [e for e in proc if e.state == ESTABLISHED and e.lport == zoo["v4"]]
    assert any(e.tx_queue > 0 for e in est) and any(e.rx_queue == 3 for e in est)
    assert any(e.rx_queue > 0 for e in proc if e.state == ESTABLISHED and e.rport == zoo["v4"])

    v6 = [e for e in proc if e.lport == zoo["v6"] and e.state == ESTABLISHED]
    assert [(e.family, e.laddr, e.raddr, e.rx_queue) for e in v6] == [(6, "::1", "::1", 7)]
    mapped = by[(CLOSE_WAIT, zoo["dual"], 6)]
    assert (mapped.laddr, mapped.raddr, mapped.rx_queue) == ("::ffff:127.0.0.1",) * 2 + (3,)
    assert by[(LISTEN, zoo["dual"], 6)].laddr == "::"

    tw = [e for e in proc if e.state == TIME_WAIT and e.rport == zoo["tw"]]
    assert [(e.inode, e.uid, e.rx_queue, e.tx_queue) for e in tw] == [(0, 0, 0, 0)]
    req = [e for e in proc if e.state == SYN_RECV and e.lport == zoo["syn"]]
    assert [(e.inode, e.uid) for e in req] == [(0, NOBODY)]  # the listener's uid
    assert by[(LISTEN, zoo["syn"], 4)].uid == NOBODY


def test_states_filter(zoo):
    ns = own_ns()
    wait_for(lambda: any(e.state == SYN_RECV for e in mine(via_proc(ns), zoo["ports"])))
    everything, _ = settled(ns, zoo["ports"])

    def sockets(entries) -> set[tuple]:  # queues left out: they may move between reads
        return {(e.family, e.laddr, e.lport, e.raddr, e.rport, e.state, e.inode) for e in entries}

    for states in ({CLOSE_WAIT}, {TIME_WAIT}, {SYN_RECV}, {LISTEN, ESTABLISHED}):
        diag, proc = settled(ns, zoo["ports"], states)
        assert diag == proc, states
        assert sockets(diag) == sockets(e for e in everything if e.state in states), states
        assert diag, states
    # The kernel filters: a CLOSE_WAIT-only dump holds nothing else, from anyone.
    assert {e.state for e in via_diag(ns, {CLOSE_WAIT})} == {CLOSE_WAIT}
    assert via_diag(ns, set()) == []
    assert {e.state for e in snapshot({CLOSE_WAIT})} == {CLOSE_WAIT}


# Run with `ip netns exec`: a listener, an ESTABLISHED pair and a CLOSE_WAIT with 4 unread
# bytes; prints the ports, then holds the sockets.
HOLDER = textwrap.dedent(
    """
    import json, socket, time
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(8)
    port = l.getsockname()[1]
    est = socket.create_connection(("127.0.0.1", port)); a, _ = l.accept()
    gone = socket.create_connection(("127.0.0.1", port)); cw, _ = l.accept()
    gone.sendall(b"four"); gone.close()
    time.sleep(0.2)
    print(json.dumps({"port": port, "cw_inode": __import__("os").fstat(cw.fileno()).st_ino}),
          flush=True)
    time.sleep(120)
    """
)


def test_other_namespace(netns):
    path = f"/run/netns/{netns}"
    ino = os.stat(path).st_ino
    child = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", HOLDER],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = child.stdout.readline()
        assert line, "the holder died before reporting its sockets"
        held = json.loads(line)
        before = os.readlink("/proc/thread-self/ns/net")
        ports = {held["port"]}
        for ns in (Namespace(ino, child.pid, None), Namespace(ino, None, path)):
            diag, proc = settled(ns, ports)
            assert diag == proc
            # listener, an ESTABLISHED pair, the CLOSE_WAIT and its closed (FIN_WAIT2) client
            states = sorted(e.state for e in diag)
            assert states == [ESTABLISHED, ESTABLISHED, FIN_WAIT2, CLOSE_WAIT, LISTEN]
            assert {e.netns for e in diag} == {ino}
            (cw,) = settled(ns, ports, {CLOSE_WAIT})[0]
            assert (cw.inode, cw.rx_queue, cw.netns) == (held["cw_inode"], 5, ino)
        # Everything there is ours: the whole table, unfiltered, agrees too.
        whole = Namespace(ino, None, path)
        assert set(via_diag(whole)) == set(via_proc(whole))
        # A pid that lives elsewhere is not trusted, through either route.
        assert read_tcp(Namespace(ino, os.getpid(), None)) == []
        assert os.readlink("/proc/thread-self/ns/net") == before  # never moved us
        assert not [t for t in threading.enumerate() if t.name == "tcpwatch-setns"]
        tagged = [e for e in snapshot({CLOSE_WAIT}) if e.lport in ports and e.netns == ino]
        assert [e.inode for e in tagged] == [held["cw_inode"]]
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


@pytest.mark.parametrize("code, latched", [(errno.EPROTONOSUPPORT, True), (errno.EPERM, False)])
def test_falls_back_to_proc(zoo, monkeypatch, code, latched):
    monkeypatch.setattr(procnet, "_sock_diag_missing", False)

    def refuse():
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(sockdiag, "open_socket", refuse)
    ns = own_ns()
    for _ in range(20):
        before = mine(via_proc(ns), zoo["ports"])
        got = mine(read_tcp(ns), zoo["ports"])
        if got == before == mine(via_proc(ns), zoo["ports"]):
            break
    assert got == before and got
    assert procnet._sock_diag_missing is latched
    assert procnet.use_sock_diag() is not latched


# Run with `ip netns exec`: N connections whose clients shut down their side (FIN_WAIT2) while
# the servers never read nor close (CLOSE_WAIT), from several source addresses.
MANY = textwrap.dedent(
    """
    import socket, sys, time
    n = int(sys.argv[1])
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4096)
    port = l.getsockname()[1]
    keep = []
    for i in range(n):
        c = socket.socket(); c.bind((f"127.0.0.{2 + i % 3}", 0)); c.connect(("127.0.0.1", port))
        s, _ = l.accept(); c.shutdown(socket.SHUT_WR); keep += [c, s]
    time.sleep(0.3)
    print(port, flush=True)
    time.sleep(120)
    """
)


def test_a_tally_fed_datagram_by_datagram_equals_one_over_the_whole_table(netns):
    """top counts each netlink datagram's sockets and keeps only CLOSE_WAIT and LISTEN ones
    (the others counted from their records, never made TcpEntry): on a real dump of many
    datagrams, the figures and the kept sockets are those of one tally over the whole
    table."""
    from tcpwatch.top.hostinfo import HostTally

    class Fed(HostTally):
        """Counts the batches it is given, whole and as ids."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.batches: list[int] = []
            self.id_batches: list[int] = []

        def take(self, entries):
            self.batches.append(len(entries))
            return super().take(entries)

        def take_ids(self, netns, family, states, lports, ids):
            self.id_batches.append(len(states))
            super().take_ids(netns, family, states, lports, ids)

    path = f"/run/netns/{netns}"
    ns = Namespace(os.stat(path).st_ino, None, path)
    child = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", MANY, "1500"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline(), "the holder died before making its sockets"
        port_range = (32768, 60999)
        for _ in range(20):  # until two reads agree (handshakes settle on their own)
            whole = read_tcp(ns)
            fed = Fed(port_range, {}, 1.0)
            kept = read_tcp(ns, each=fed)
            if {e[:7] for e in read_tcp(ns)} == {e[:7] for e in whole}:
                break
        one = HostTally(port_range, {}, 1.0)
        assert sorted(one.take(whole)) == sorted(kept)
        # 3,000 sockets do not fit one datagram; the FIN_WAIT2 ones came as ids only
        assert len(fed.batches) > 4 and len(fed.id_batches) > 2, (fed.batches, fed.id_batches)
        assert sum(fed.batches) == 1501 and sum(fed.id_batches) == 1500
        assert {e.state for e in kept} == {CLOSE_WAIT, LISTEN} and len(kept) == 1501
        assert fed.state_names() == one.state_names() == {
            "FIN_WAIT2": 1500, "CLOSE_WAIT": 1500, "LISTEN": 1}
        assert fed.port_risk(set()) == one.port_risk(set())
        assert [r.held for r in one.port_risk(set())[:3]] == [500, 500, 500]
        assert fed.fin_wait2() == one.fin_wait2() and one.fin_wait2()[0].count == 1500
        assert fed.ephemeral_used() == one.ephemeral_used() >= 500  # ports reused per address
        # first sightings of the FIN_WAIT2 sockets (keyed by record: the same number)
        assert len(fed.first_seen) == len(one.first_seen) == 1500
        assert set(fed.first_seen.values()) == {1.0}
        # The next frame moves each sighting it sees again out of the last frame's dict.
        before = dict(fed.first_seen)
        later = Fed(port_range, fed.first_seen, 5.0)
        read_tcp(ns, each=later)
        assert later.fin_wait2()[0].oldest_s == 4.0 and later.first_seen == before
        assert fed.first_seen == {}
    finally:
        child.kill()
        child.wait()
        child.stdout.close()

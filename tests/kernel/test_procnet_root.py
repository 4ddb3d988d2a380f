"""procnet against the real kernel: real CLOSE_WAIT sockets, network namespaces, `ss`.

Needs root (ip netns, other processes' /proc). Other tests may run at the same time, so the
comparison with ss only assumes that sockets present in two ss runs around our read exist in it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tcpwatch.procnet import (
    Holder,
    Namespace,
    Resolver,
    holders_of,
    list_netns,
    read_tcp,
    snapshot,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

CLOSE_WAIT, TIME_WAIT = 8, 6


def own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def ss_close_wait() -> dict[tuple, int]:
    """`ss -tanH state close-wait` in our namespace: {(laddr, lport, raddr, rport): Recv-Q}."""
    out = subprocess.run(
        ["ss", "-tanH", "state", "close-wait"], capture_output=True, text=True, check=True
    ).stdout

    def split(hostport: str) -> tuple[str, int]:
        host, port = hostport.rsplit(":", 1)
        return host.strip("[]").split("%")[0], int(port)

    found = {}
    for line in out.splitlines():
        recvq, _sendq, local, peer = line.split()[:4]
        found[(*split(local), *split(peer))] = int(recvq)
    return found


@pytest.fixture
def loopback_close_wait():
    """An accepted server socket in CLOSE_WAIT with 5 unread bytes, and a never-accepted one."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    client.sendall(b"hello")
    cport = client.getsockname()[1]
    client.close()
    queued = socket.create_connection(("127.0.0.1", port))  # stays in the accept queue
    qport = queued.getsockname()[1]
    queued.sendall(b"abc")
    queued.close()
    try:
        yield port, cport, qport, conn
    finally:
        conn.close()
        listener.close()


def test_loopback_close_wait(loopback_close_wait):
    port, cport, qport, conn = loopback_close_wait
    ns = own_netns()

    def ours():
        found = {e.rport: e for e in snapshot({CLOSE_WAIT}) if e.lport == port}
        return found if len(found) == 2 else None

    found = wait_for(ours)
    assert found, "both server sockets should reach CLOSE_WAIT"
    accepted, queued = found[cport], found[qport]
    assert (accepted.netns, accepted.family, accepted.laddr, accepted.raddr) == (
        ns, 4, "127.0.0.1", "127.0.0.1"
    )
    assert accepted.state == CLOSE_WAIT
    assert accepted.rx_queue == 5 + 1  # unread bytes, plus the FIN no read consumed yet
    assert accepted.inode == os.fstat(conn.fileno()).st_ino
    assert accepted.uid == os.geteuid()
    assert (queued.inode, queued.rx_queue) == (0, 3 + 1)  # nobody accepted it

    comm = Path("/proc/self/comm").read_text().strip()
    me = [Holder(os.getpid(), comm, conn.fileno())]
    assert holders_of([accepted.inode, queued.inode]) == {accepted.inode: me}
    got = Resolver().resolve([accepted.key, (0, *accepted.key[1:]), queued.key])
    assert got == {
        accepted.key: (accepted, me),
        (0, *accepted.key[1:]): (accepted, me),
        queued.key: (queued, []),
    }

    # Cross-check with ss, which sees our namespace only.
    before = ss_close_wait()
    mine = {(e.laddr, e.lport, e.raddr, e.rport): e for e in snapshot({CLOSE_WAIT})
            if e.netns == ns}  # fmt: skip
    after = ss_close_wait()
    stable = before.keys() & after.keys()
    assert stable <= mine.keys() <= (before.keys() | after.keys())
    for tup in stable:
        if before[tup] == after[tup]:
            assert mine[tup].rx_queue == before[tup], tup
    assert ("127.0.0.1", port, "127.0.0.1", cport) in stable


# ---- network namespaces ----------------------------------------------------------------

# Run with `ip netns exec`: leaves a v4 CLOSE_WAIT and a dual-stack listener's child (a v4
# client, so tcp6 shows ::ffff:127.0.0.1) in CLOSE_WAIT, reports them, then holds them.
HOLDER = textwrap.dedent(
    """
    import json, socket, sys, time
    l4 = socket.socket(); l4.bind(("127.0.0.1", 0)); l4.listen(8)
    l6 = socket.socket(socket.AF_INET6)
    l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    l6.bind(("::", 0)); l6.listen(8)
    out = {}
    for name, lsock in (("v4", l4), ("mapped", l6)):
        port = lsock.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = lsock.accept()
        c.sendall(b"x" * 7)
        out[name] = [port, c.getsockname()[1], s.fileno()]
        c.close()
        globals()[name] = s
    time.sleep(0.2)
    print(json.dumps(out), flush=True)
    time.sleep(120)
    """
)

# Run in the second namespace: leaves a TIME_WAIT socket behind and exits, so that namespace
# has a socket but no process: only the /run/netns path can reach it.
TIME_WAITER = textwrap.dedent(
    """
    import socket, time
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    c = socket.create_connection(l.getsockname()); s, _ = l.accept()
    c.close(); time.sleep(0.1); s.close(); time.sleep(0.1)
    """
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns_pair():
    """Two fresh namespaces (lo up): one with a process holding CLOSE_WAITs, one without."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    names = [f"tw-test-{secrets.token_hex(4)}", f"tw-test-{secrets.token_hex(4)}"]
    child = None
    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "netns", "exec", names[1], sys.executable, "-c", TIME_WAITER],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        child = subprocess.Popen(
            ["ip", "netns", "exec", names[0], sys.executable, "-c", HOLDER],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = child.stdout.readline()
        assert line, "the holder process died before reporting its sockets"
        yield names, child, json.loads(line)
    finally:
        if child is not None:
            child.kill()
            child.wait()
            child.stdout.close()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_netns_close_wait(netns_pair):
    names, child, info = netns_pair
    ns_ino = os.stat(f"/run/netns/{names[0]}").st_ino
    empty_ino = os.stat(f"/run/netns/{names[1]}").st_ino
    path, empty_path = f"/run/netns/{names[0]}", f"/run/netns/{names[1]}"

    namespaces = {ns.inode: ns for ns in list_netns()}
    assert list_netns()[0].inode == own_netns()
    assert namespaces[ns_ino] == Namespace(ns_ino, child.pid, path)  # `ip netns exec` execs
    assert namespaces[empty_ino] == Namespace(empty_ino, None, empty_path)

    cw = {(e.family, e.lport, e.rport): e for e in snapshot({CLOSE_WAIT}) if e.netns == ns_ino}
    v4_port, v4_cport, v4_fd = info["v4"]
    m_port, m_cport, m_fd = info["mapped"]
    v4 = cw[(4, v4_port, v4_cport)]
    mapped = cw[(6, m_port, m_cport)]
    assert (v4.laddr, v4.raddr, v4.rx_queue) == ("127.0.0.1", "127.0.0.1", 7 + 1)
    assert (mapped.laddr, mapped.raddr, mapped.rx_queue) == ("::ffff:127.0.0.1",) * 2 + (8,)
    assert len(cw) == 2

    comm = Path(f"/proc/{child.pid}/comm").read_text().strip()
    keys = [
        (ns_ino, 4, "127.0.0.1", v4_port, "127.0.0.1", v4_cport),
        (0, 4, "127.0.0.1", v4_port, "127.0.0.1", v4_cport),
        # the kernel may report the dual-stack child as IPv4: it must still be found
        (ns_ino, 4, "127.0.0.1", m_port, "127.0.0.1", m_cport),
        (0, 6, "::ffff:127.0.0.1", m_port, "::ffff:127.0.0.1", m_cport),
        (own_netns(), 4, "127.0.0.1", v4_port, "127.0.0.1", v4_cport),  # wrong namespace
    ]
    got = Resolver().resolve(keys)
    assert got[keys[0]] == got[keys[1]] == (v4, [Holder(child.pid, comm, v4_fd)])
    assert got[keys[2]] == got[keys[3]] == (mapped, [Holder(child.pid, comm, m_fd)])
    if got[keys[4]][0] is not None:  # someone else may hold that tuple in our namespace
        assert got[keys[4]][0].netns == own_netns()


def test_read_tcp_routes_agree(netns_pair):
    names, child, _ = netns_pair
    path = f"/run/netns/{names[0]}"
    ns_ino = os.stat(path).st_ino
    before = os.readlink("/proc/thread-self/ns/net")

    via_pid = read_tcp(Namespace(ns_ino, child.pid, None))
    via_path = read_tcp(Namespace(ns_ino, None, path))
    assert via_pid and sorted(via_pid, key=repr) == sorted(via_path, key=repr)
    assert os.readlink("/proc/thread-self/ns/net") == before  # never moved us

    # A dead pid falls back to the path; a pid in another namespace is not trusted.
    assert sorted(read_tcp(Namespace(ns_ino, 2**22 + 1, path)), key=repr) == sorted(
        via_path, key=repr
    )
    assert read_tcp(Namespace(ns_ino, os.getpid(), None)) == []

    # A namespace with no process but a socket (TIME_WAIT outlives its owner): path only.
    empty_path = f"/run/netns/{names[1]}"
    empty_ino = os.stat(empty_path).st_ino
    left = read_tcp(Namespace(empty_ino, None, empty_path))
    assert [e.state for e in left] == [TIME_WAIT]
    assert left[0].netns == empty_ino and left[0].inode == 0
    assert left[0] in snapshot({TIME_WAIT})
    assert not [t for t in threading.enumerate() if t.name == "tcpwatch-setns"]

"""procnet without root: captured /proc/net/tcp{,6} text and fake /proc trees in tmp_path.

fixtures/procnet/tcp and tcp6 were captured in a fresh network namespace (Linux 6.18) holding:
a v4 listener on 127.0.0.1:8080 with one accepted CLOSE_WAIT (5 unread bytes) and one
never-accepted CLOSE_WAIT (3 bytes, inode 0); a dual-stack listener on [::]:8443 with a v4
client (its child in tcp6 as ::ffff:127.0.0.1, 10 unread bytes, CLOSE_WAIT) and a ::1 client
(ESTABLISHED, 7 unread bytes). `ss -tane` agreed on every line.
"""

from __future__ import annotations

import doctest
import os
import sys
from pathlib import Path

import pytest

from tcpwatch import procnet
from tcpwatch.procnet import (
    Holder,
    Namespace,
    Resolver,
    TcpEntry,
    canonical,
    holders_of,
    list_netns,
    parse_tcp_table,
    read_tcp,
    snapshot,
)

pytestmark = pytest.mark.skipif(
    sys.byteorder != "little", reason="fixtures were captured on a little-endian host"
)

FIXTURES = Path(__file__).parent / "fixtures" / "procnet"
TCP = (FIXTURES / "tcp").read_text()
TCP6 = (FIXTURES / "tcp6").read_text()
NS_A, NS_B, NS_C = 4026531833, 4026532177, 4026532300
LO = "127.0.0.1"
MAPPED = "::ffff:127.0.0.1"


def entry(netns, family, laddr, lport, raddr, rport, state, rx=0, inode=0, tx=0, uid=0):
    return TcpEntry(netns, family, laddr, lport, raddr, rport, state, tx, rx, uid, inode)


def test_doctests():
    assert doctest.testmod(procnet).failed == 0


def test_parse_tcp():
    assert list(parse_tcp_table(TCP, 4, NS_A)) == [
        entry(NS_A, 4, LO, 8080, "0.0.0.0", 0, 10, rx=1, inode=9202),  # LISTEN, backlog 1
        entry(NS_A, 4, LO, 8080, LO, 55236, 8, rx=6, inode=9204),  # 5 bytes + FIN unread
        entry(NS_A, 4, LO, 8080, LO, 55246, 8, rx=4, inode=0),  # never accepted
        entry(NS_A, 4, LO, 49540, LO, 8443, 5),  # the clients, orphaned in FIN_WAIT2
        entry(NS_A, 4, LO, 55236, LO, 8080, 5),
        entry(NS_A, 4, LO, 55246, LO, 8080, 5),
    ]


def test_parse_tcp6():
    assert list(parse_tcp_table(TCP6, 6, NS_A)) == [
        entry(NS_A, 6, "::", 8443, "::", 0, 10, inode=9206),
        entry(NS_A, 6, "::1", 8443, "::1", 46818, 1, rx=7, inode=9210),
        entry(NS_A, 6, MAPPED, 8443, MAPPED, 49540, 8, rx=11, inode=9208),
        entry(NS_A, 6, "::1", 46818, "::1", 8443, 1, inode=9209),
    ]


def test_parse_full_fields():
    line = (
        "  12: 0A00020F:01BB 08080808:D431 01 0000002A:00000000 01:00000014 00000000"
        "  1000        0 31337 1 0000000000000000 20 4 30 10 -1"
    )
    assert list(parse_tcp_table(line, 4, 7)) == [
        entry(7, 4, "15.2.0.10", 443, "8.8.8.8", 54321, 1, tx=42, uid=1000, inode=31337)
    ]


def test_malformed_lines_are_skipped():
    lines = TCP.splitlines()
    junk = [
        "",
        "garbage",
        "   9: 0100007F:1F90",  # truncated
        "   9: 0100007F:1F90 0100007F:ZZZZ 08 00000000:00000000 00:00000000 00000000 0 0 1",
        "   9: 7F:1F90 0100007F:0050 08 00000000:00000000 00:00000000 00000000 0 0 1",  # short addr
        "   9: 0100007F:1F90 0100007F:0050 08 00000000 00:00000000 00000000 0 0 1",  # no rx
        "   9: 0100007F:1F90 0100007F:0050 08 00000000:00000000 00:00000000 00000000 0 0 x",
    ]
    text = "\n".join([lines[0], *junk, *lines[1:3], *junk, lines[3]])
    assert list(parse_tcp_table(text, 4, 1)) == list(parse_tcp_table(TCP, 4, 1))[:3]
    assert list(parse_tcp_table("\n".join(junk), 6, 1)) == []


@pytest.mark.parametrize(
    "addr, want",
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("::", "::"),
        ("not an address", "not an address"),
    ],
)
def test_canonical(addr, want):
    assert canonical(addr) == want


# ---- fake /proc trees -------------------------------------------------------------------


def make_proc(root: Path, procs: dict, self_pid: int | None = None) -> str:
    """procs: {pid: {"comm", "netns", "fds": {fd: link}, "tcp", "tcp6"}}, any key optional."""
    root.mkdir(parents=True, exist_ok=True)
    for pid, p in procs.items():
        d = root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "fd").mkdir()
        (d / "net").mkdir()
        if "comm" in p:
            (d / "comm").write_text(p["comm"] + "\n")
        if "netns" in p:
            os.symlink(f"net:[{p['netns']}]", d / "ns" / "net")
        for fd, link in p.get("fds", {}).items():
            os.symlink(link, d / "fd" / str(fd))
        if "tcp" in p:
            (d / "net" / "tcp").write_text(p["tcp"])
        if "tcp6" in p:
            (d / "net" / "tcp6").write_text(p["tcp6"])
    (root / "sys").mkdir()  # non-numeric entries are not processes
    if self_pid is not None:
        os.symlink(str(self_pid), root / "self")
    return str(root)


HEADER = TCP.splitlines()[0] + "\n"
# Namespace B holds the same loopback 4-tuple as A (a second container), plus one of its own.
TCP_B = (
    HEADER
    + "   0: 0100007F:1F90 0100007F:D7C4 08 00000000:00000001 00:00000000 00000000     0        0 "
    "9999 1 0000000000000000 20 4 28 10 -1\n"
    + "   1: 0100007F:0050 0100007F:C000 08 00000000:00000001 00:00000000 00000000     0        0 "
    "8888 1 0000000000000000 20 4 28 10 -1\n"
)


@pytest.fixture
def two_ns(tmp_path):
    """pid 100 (us) and 101 in namespace A with the captured tables; 200 in namespace B."""
    tables_a = {"netns": NS_A, "tcp": TCP, "tcp6": TCP6}
    proc = make_proc(
        tmp_path / "proc",
        {
            100: {"comm": "server", **tables_a, "fds": {0: "/dev/null", 5: "socket:[9204]",
                                                        6: "socket:[9208]", 7: "pipe:[42]"}},
            101: {"comm": "worker", **tables_a, "fds": {5: "socket:[9204]"}},  # forked child
            200: {"comm": "other", "netns": NS_B, "tcp": TCP_B, "tcp6": HEADER,
                  "fds": {3: "socket:[9999]", 4: "socket:[8888]"}},
        },
        self_pid=100,
    )  # fmt: skip
    return proc, str(tmp_path / "run-netns-missing")


def test_list_netns_fake(tmp_path):
    run_netns = tmp_path / "netns"
    run_netns.mkdir()
    (run_netns / "stale").write_text("")  # `ip netns add` that never got its mount
    proc = make_proc(
        tmp_path / "proc",
        {
            1: {"netns": NS_A},
            7: {"netns": NS_C},
            100: {"netns": NS_B},  # self
            200: {"netns": NS_B},
            300: {},  # vanished, or not ours to read: no ns link
            400: {"netns": "garbage"},
        },
        self_pid=100,
    )
    assert list_netns(proc, str(run_netns)) == [
        Namespace(NS_B, 100, None),
        Namespace(NS_A, 1, None),
        Namespace(NS_C, 7, None),
    ]
    assert list_netns(str(tmp_path / "nothing"), str(tmp_path / "nothing")) == []


def test_holders_of(two_ns):
    proc, _ = two_ns
    assert holders_of([9204, 9208, 8888, 0, 12345], proc) == {
        9204: [Holder(100, "server", 5), Holder(101, "worker", 5)],
        9208: [Holder(100, "server", 6)],
        8888: [Holder(200, "other", 4)],
    }
    assert holders_of([], proc) == {}
    assert holders_of(iter([9999]), proc) == {9999: [Holder(200, "other", 3)]}


def test_holders_of_without_fds_shares_one_holder_per_process(two_ns):
    proc, _ = two_ns
    found = holders_of([9204, 9208, 8888, 9999], proc, fds=False)
    server, worker, other = Holder(100, "server", None), Holder(101, "worker", None), Holder(
        200, "other", None)
    assert found == {9204: (server, worker), 9208: (server,), 8888: (other,), 9999: (other,)}
    assert found[8888] is found[9999]  # the same tuple: no memory per socket but its key


def test_holders_of_never_looks_up_inode_0(tmp_path):
    proc = make_proc(tmp_path / "proc", {5: {"comm": "x", "fds": {3: "socket:[0]"}}})
    assert holders_of([0], proc) == {}


def test_holders_of_takes_a_set_of_inodes_as_given_or_without_0(two_ns):
    proc, _ = two_ns
    wanted = {9204, 8888}
    assert holders_of(wanted, proc, fds=False) == {
        9204: (Holder(100, "server", None), Holder(101, "worker", None)),
        8888: (Holder(200, "other", None),)}
    assert wanted == {9204, 8888}  # not changed
    assert holders_of({0, 9208}, proc) == {9208: [Holder(100, "server", 6)]}
    assert holders_of(frozenset({9999}), proc) == {9999: [Holder(200, "other", 3)]}


def test_holders_of_skips_vanished(tmp_path):
    proc = make_proc(
        tmp_path / "proc",
        {
            5: {"fds": {3: "socket:[77]"}},  # comm gone: exited between the two reads
            6: {"comm": "alive", "fds": {4: "socket:[77]"}},
        },
    )
    os.mkdir(Path(proc) / "7")  # no fd directory at all (exited)
    assert holders_of([77], proc) == {77: [Holder(6, "alive", 4)]}


def test_read_tcp_via_pid(two_ns):
    proc, _ = two_ns
    got = read_tcp(Namespace(NS_A, 101, None), proc)
    assert got == [*parse_tcp_table(TCP, 4, NS_A), *parse_tcp_table(TCP6, 6, NS_A)]
    assert {e.netns for e in got} == {NS_A}


def test_read_tcp_pid_in_another_namespace(two_ns):
    # pid 200 lives in B: its table must not be reported as A's (a reused pid, for example).
    proc, _ = two_ns
    assert read_tcp(Namespace(NS_A, 200, None), proc) == []
    assert read_tcp(Namespace(NS_A, 999, None), proc) == []  # vanished


def test_read_tcp_without_tcp6(tmp_path):
    proc = make_proc(tmp_path / "proc", {3: {"netns": NS_A, "tcp": TCP}})  # IPv6 disabled
    assert read_tcp(Namespace(NS_A, 3, None), proc) == list(parse_tcp_table(TCP, 4, NS_A))


def test_read_tcp_bad_path_keeps_our_namespace(tmp_path):
    not_a_ns = tmp_path / "blue"
    not_a_ns.write_text("")
    before = os.readlink("/proc/thread-self/ns/net")
    # setns() fails (EINVAL on a plain file, EPERM without root): [] and nothing raised.
    assert read_tcp(Namespace(NS_C, None, str(not_a_ns))) == []
    assert read_tcp(Namespace(NS_C, 999999999, str(tmp_path / "missing"))) == []
    assert read_tcp(Namespace(NS_C, None, None)) == []
    assert os.readlink("/proc/thread-self/ns/net") == before


def test_snapshot_fake(two_ns):
    proc, run_netns = two_ns
    assert snapshot({8}, proc, run_netns) == [
        entry(NS_A, 4, LO, 8080, LO, 55236, 8, rx=6, inode=9204),
        entry(NS_A, 4, LO, 8080, LO, 55246, 8, rx=4, inode=0),
        entry(NS_A, 6, MAPPED, 8443, MAPPED, 49540, 8, rx=11, inode=9208),
        entry(NS_B, 4, LO, 8080, LO, 55236, 8, rx=1, inode=9999),
        entry(NS_B, 4, LO, 80, LO, 49152, 8, rx=1, inode=8888),
    ]
    assert len(snapshot(None, proc, run_netns)) == 6 + 4 + 2


@pytest.fixture
def counted(monkeypatch):
    calls = {"read_tcp": [], "holders_of": 0}
    real_read, real_holders = procnet.read_tcp, procnet.holders_of

    def read_tcp(ns, proc_root="/proc"):
        calls["read_tcp"].append(ns.inode)
        return real_read(ns, proc_root)

    def holders(inodes, proc_root="/proc"):
        calls["holders_of"] += 1
        return real_holders(inodes, proc_root)

    monkeypatch.setattr(procnet, "read_tcp", read_tcp)
    monkeypatch.setattr(procnet, "holders_of", holders)
    return calls


def test_resolver(two_ns, counted):
    proc, run_netns = two_ns
    a_cw = entry(NS_A, 4, LO, 8080, LO, 55236, 8, rx=6, inode=9204)
    a_mapped = entry(NS_A, 6, MAPPED, 8443, MAPPED, 49540, 8, rx=11, inode=9208)
    b_cw = entry(NS_B, 4, LO, 8080, LO, 55236, 8, rx=1, inode=9999)
    b_only = entry(NS_B, 4, LO, 80, LO, 49152, 8, rx=1, inode=8888)
    both = [Holder(100, "server", 5), Holder(101, "worker", 5)]
    want = {
        (NS_A, 4, LO, 8080, LO, 55236): (a_cw, both),
        (NS_B, 4, LO, 8080, LO, 55236): (b_cw, [Holder(200, "other", 3)]),
        (0, 4, LO, 8080, LO, 55236): (a_cw, both),  # in both namespaces: ours wins
        (0, 4, LO, 80, LO, 49152): (b_only, [Holder(200, "other", 4)]),
        # the kernel says IPv4, /proc lists the dual-stack listener's child in tcp6
        (0, 4, LO, 8443, LO, 49540): (a_mapped, [Holder(100, "server", 6)]),
        (NS_A, 6, MAPPED, 8443, MAPPED, 49540): (a_mapped, [Holder(100, "server", 6)]),
        # ... and the other way round (a FIN_WAIT2 client: nobody holds it)
        (NS_A, 6, MAPPED, 49540, MAPPED, 8443): (entry(NS_A, 4, LO, 49540, LO, 8443, 5), []),
        # in the accept queue: found, inode 0, no holder
        (NS_A, 4, LO, 8080, LO, 55246): (entry(NS_A, 4, LO, 8080, LO, 55246, 8, rx=4), []),
        (NS_A, 4, LO, 80, LO, 49152): (None, []),  # that one is in B
        (NS_C, 4, LO, 8080, LO, 55236): (None, []),  # unreachable namespace
        (0, 4, "10.0.0.1", 1, "10.0.0.2", 2): (None, []),
    }
    assert Resolver(proc, run_netns).resolve(list(want)) == want
    assert sorted(counted["read_tcp"]) == [NS_A, NS_B]  # each namespace once
    assert counted["holders_of"] == 1


def test_resolver_reads_only_needed_namespaces(two_ns, counted):
    proc, run_netns = two_ns
    keys = [(NS_B, 4, LO, 80, LO, 49152)] * 3
    got = Resolver(proc, run_netns).resolve(iter(keys))
    assert got == {keys[0]: (entry(NS_B, 4, LO, 80, LO, 49152, 8, rx=1, inode=8888),
                             [Holder(200, "other", 4)])}  # fmt: skip
    assert counted["read_tcp"] == [NS_B]
    assert Resolver(proc, run_netns).resolve([]) == {}


def test_resolver_prefers_live_socket_and_exact_family(tmp_path):
    # The same 4-tuple twice in one namespace: a TIME_WAIT leftover (inode 0) and a new socket;
    # and a v4 listener next to a v6 one on ::ffff:0.0.0.0 (same canonical text).
    tcp = HEADER + (
        "   0: 0100007F:1F90 0100007F:D7C4 06 00000000:00000000 03:00001756 00000000     0"
        "        0 0 3 0000000000000000\n"
        "   1: 0100007F:1F90 0100007F:D7C4 08 00000000:00000001 00:00000000 00000000     0"
        "        0 4242 1 0000000000000000 20 4 28 10 -1\n"
        "   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
        "        0 5151 1 0000000000000000 100 0 0 10 0\n"
    )
    tcp6 = TCP6.splitlines()[0] + "\n" + (
        "   0: 0000000000000000FFFF000000000000:0050 0000000000000000FFFF000000000000:0000 0A"
        " 00000000:00000000 00:00000000 00000000     0        0 6161 1 0000000000000000\n"
    )
    proc = make_proc(tmp_path / "proc", {1: {"netns": NS_A, "tcp": tcp, "tcp6": tcp6}}, 1)
    got = Resolver(proc, str(tmp_path)).resolve([
        (NS_A, 4, LO, 8080, LO, 55236),
        (NS_A, 4, "0.0.0.0", 80, "0.0.0.0", 0),
        (NS_A, 6, "::ffff:0.0.0.0", 80, "::ffff:0.0.0.0", 0),
    ])  # fmt: skip
    assert [e.inode for e, _ in got.values()] == [4242, 5151, 6161]

"""sockdiag without root: netlink buffers built here with struct, parsed into procnet entries.

The layouts are those of include/uapi/linux/netlink.h (struct nlmsghdr) and inet_diag.h
(struct inet_diag_msg): ports big endian, addresses in network order, the rest host order.
"""

from __future__ import annotations

import doctest
import errno
import socket
import struct
from pathlib import Path

import pytest

from tcpwatch import procnet, sockdiag
from tcpwatch.procnet import Holder, Namespace, Resolver, TcpEntry, parse_tcp_table, read_tcp

NS = 4026531833
AF4, AF6 = socket.AF_INET, socket.AF_INET6
LO, MAPPED = "127.0.0.1", "::ffff:127.0.0.1"
FIXTURES = Path(__file__).parent / "fixtures" / "procnet"


def raw(family: int, text: str) -> bytes:
    """An address as inet_diag_sockid holds it: 16 bytes, IPv4 in the first 4."""
    return socket.inet_pton(family, text).ljust(16, b"\0")


def attr(kind: int, payload: bytes) -> bytes:
    """A netlink attribute (struct nlattr), padded to 4 bytes like the kernel's."""
    body = struct.pack("=HH", 4 + len(payload), kind) + payload
    return body.ljust((len(body) + 3) & ~3, b"\0")


def nlmsg(kind: int, payload: bytes, seq: int = 1) -> bytes:
    body = struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + payload  # NLM_F_MULTI
    return body.ljust((len(body) + 3) & ~3, b"\0")


def diag(family, state, laddr, lport, raddr, rport, rq=0, wq=0, uid=0, inode=0,
         attrs: bytes = b"") -> bytes:
    """One SOCK_DIAG_BY_FAMILY reply: struct inet_diag_msg, then attributes."""
    msg = struct.pack(
        "=BBBB HH 16s16s I8s IIIII", family, state, 2, 1,
        0, 0, raw(family, laddr), raw(family, raddr), 1, b"\xaa" * 8,
        1234, rq, wq, uid, inode,
    )  # fmt: skip
    # ports are __be16: patch them in big endian
    msg = msg[:4] + struct.pack(">HH", lport, rport) + msg[8:]
    return nlmsg(sockdiag.SOCK_DIAG_BY_FAMILY, msg + attrs)


def done(err: int = 0) -> bytes:
    return nlmsg(sockdiag.NLMSG_DONE, struct.pack("=i", err))


def error(err: int) -> bytes:
    return nlmsg(sockdiag.NLMSG_ERROR, struct.pack("=i", err) + b"\0" * 16)


def entry(family, laddr, lport, raddr, rport, state, tx=0, rx=0, uid=0, inode=0, netns=NS):
    return TcpEntry(netns, family, laddr, lport, raddr, rport, state, tx, rx, uid, inode)


def parsed(buf: bytes) -> tuple[list[TcpEntry], bool]:
    out: list[TcpEntry] = []
    return out, sockdiag.parse(buf, NS, out)


SHUTDOWN = attr(8, b"\0")  # INET_DIAG_SHUTDOWN: 5 bytes, padded to 8
CGROUP = attr(21, struct.pack("=Q", 77))


def test_doctests():
    assert doctest.testmod(sockdiag).failed == 0


def test_ipv4():
    buf = diag(AF4, 8, LO, 8080, LO, 55236, rq=6, wq=0, uid=1000, inode=9204, attrs=SHUTDOWN)
    assert parsed(buf) == ([entry(4, LO, 8080, LO, 55236, 8, rx=6, uid=1000, inode=9204)], False)


def test_ipv6_and_v4_mapped():
    buf = diag(AF6, 1, "::1", 8443, "::1", 46818, rq=7, wq=42, inode=9210) + diag(
        AF6, 8, MAPPED, 8443, MAPPED, 49540, rq=11, inode=9208, attrs=SHUTDOWN + CGROUP
    )
    got, _ = parsed(buf)
    assert got == [
        entry(6, "::1", 8443, "::1", 46818, 1, tx=42, rx=7, inode=9210),
        entry(6, MAPPED, 8443, MAPPED, 49540, 8, rx=11, inode=9208),
    ]
    # the same text /proc's parser makes for these addresses
    assert procnet._addr("0000000000000000FFFF00000100007F") == MAPPED
    assert procnet._addr("00000000000000000000000001000000") == "::1"


def test_listen_tx_queue_is_zero_as_in_proc():
    # inet_diag: rqueue = accept backlog, wqueue = max backlog; /proc: rx backlog, tx 0
    buf = diag(AF4, 10, "0.0.0.0", 80, "0.0.0.0", 0, rq=3, wq=4096, inode=5)
    assert parsed(buf)[0] == [entry(4, "0.0.0.0", 80, "0.0.0.0", 0, 10, rx=3, inode=5)]


def test_ports_are_big_endian():
    buf = diag(AF4, 1, LO, 0x1234, LO, 0xABCD) + diag(AF4, 1, LO, 1, LO, 65535)
    assert [(e.lport, e.rport) for e in parsed(buf)[0]] == [(0x1234, 0xABCD), (1, 65535)]


def test_many_messages_varied_lengths_and_done():
    msgs = [
        diag(AF4, 10, LO, 8080, "0.0.0.0", 0, rq=1, wq=8, inode=9202, attrs=SHUTDOWN + CGROUP),
        diag(AF4, 6, LO, 49540, LO, 8443),  # TIME_WAIT: no attributes at all
        diag(AF4, 5, LO, 55236, LO, 8080, attrs=SHUTDOWN),
        nlmsg(sockdiag.NLMSG_NOOP, b""),
        diag(AF6, 10, "::", 8443, "::", 0, inode=9206, attrs=attr(11, b"\0")),  # SKV6ONLY
    ]
    got, finished = parsed(b"".join(msgs) + done() + b"junk after DONE is never read")
    assert finished
    assert got == [
        entry(4, LO, 8080, "0.0.0.0", 0, 10, rx=1, inode=9202),
        entry(4, LO, 49540, LO, 8443, 6),
        entry(4, LO, 55236, LO, 8080, 5),
        entry(6, "::", 8443, "::", 0, 10, inode=9206),
    ]
    assert parsed(done())[1] is True
    assert parsed(b"") == ([], False)


def test_address_text_is_shared():
    buf = b"".join(diag(AF4, 8, LO, 80, "10.0.0.9", 4000 + i) for i in range(3))
    got, _ = parsed(buf)
    assert len({id(e.laddr) for e in got}) == 1 and len({id(e.raddr) for e in got}) == 1
    # The same 16 bytes are a different address in each family
    cache = sockdiag.address_cache()
    out: list[TcpEntry] = []
    sockdiag.parse(diag(AF4, 1, LO, 1, LO, 2), NS, out, cache)
    v6_twin = socket.inet_ntop(AF6, raw(AF4, LO))
    assert v6_twin == "7f00:1::"
    msg = diag(AF6, 1, v6_twin, 1, v6_twin, 2)
    sockdiag.parse(msg, NS, out, cache)
    assert [e.laddr for e in out] == [LO, "7f00:1::"]


def test_nlmsg_error_is_oserror():
    with pytest.raises(OSError) as exc:
        parsed(diag(AF4, 8, LO, 1, LO, 2) + error(-errno.ENOENT))
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        parsed(done(-errno.EINTR))  # a dump that failed half way says so in DONE
    assert exc.value.errno == errno.EINTR
    assert parsed(error(0)) == ([], False)  # an ACK, not an error


def test_nothing_appended_when_a_buffer_is_bad():
    out: list[TcpEntry] = []
    with pytest.raises(OSError):
        sockdiag.parse(diag(AF4, 8, LO, 1, LO, 2) + error(-errno.EPERM), NS, out)
    assert out == []


@pytest.mark.parametrize(
    "buf",
    [
        diag(AF4, 8, LO, 1, LO, 2)[:-10],  # cut in the middle of a message
        diag(AF4, 8, LO, 1, LO, 2) + b"\x10\0\0",  # less than a header left
        nlmsg(sockdiag.SOCK_DIAG_BY_FAMILY, b"\x02\x08" + b"\0" * 30),  # short inet_diag_msg
        struct.pack("=IHHII", 0, sockdiag.SOCK_DIAG_BY_FAMILY, 0, 0, 0),  # length 0: no loop
        struct.pack("=IHHII", 9999, sockdiag.NLMSG_DONE, 0, 0, 0),  # longer than the buffer
        nlmsg(sockdiag.NLMSG_ERROR, b"\xff"),  # error without its code
        nlmsg(sockdiag.NLMSG_OVERRUN, b""),
        diag(AF4, 8, LO, 1, LO, 2).replace(b"\x02\x08", b"\x07\x08", 1),  # family 7
    ],
)
def test_malformed_is_an_error_not_a_crash(buf):
    with pytest.raises(OSError) as exc:
        parsed(buf)
    assert exc.value.errno == errno.EBADMSG


def test_same_entries_as_proc_fixture():
    """The sockets of tests/unit/fixtures/procnet, as inet_diag would send them."""
    want = [
        *parse_tcp_table((FIXTURES / "tcp").read_text(), 4, NS),
        *parse_tcp_table((FIXTURES / "tcp6").read_text(), 6, NS),
    ]
    buf = b"".join(
        diag(AF4 if e.family == 4 else AF6, e.state, e.laddr, e.lport, e.raddr, e.rport,
             rq=e.rx_queue, wq=128 if e.state == 10 else e.tx_queue, uid=e.uid, inode=e.inode,
             attrs=SHUTDOWN)
        for e in want
    )  # fmt: skip
    assert parsed(buf + done()) == (want, True)


def test_states_mask():
    assert sockdiag.states_mask(None) == 0xFFE  # 1..11: what /proc shows
    assert sockdiag.states_mask({8}) == 1 << 8
    assert sockdiag.states_mask({6, 8}) == (1 << 6) | (1 << 8)
    assert sockdiag.states_mask({3}) == (1 << 3) | (1 << 10)  # the listener gives the uid
    assert sockdiag.states_mask({12, 13, 0}) == 0  # nothing /proc would list
    assert sockdiag.states_mask(set()) == 0


def test_request_layout():
    req = sockdiag.request(AF6, 1 << 8, 7)
    assert len(req) == 16 + 56  # nlmsghdr + inet_diag_req_v2
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq, pid) == (72, 20, 0x301, 7, 0)
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, ext, pad, states) == (AF6, socket.IPPROTO_TCP, 0, 0, 1 << 8)
    assert req[24:] == b"\0" * 48  # inet_diag_sockid: no filter


def test_fix_request_uids():
    lst4 = entry(4, "0.0.0.0", 80, "0.0.0.0", 0, 10, uid=1000, inode=7)
    lst4_exact = entry(4, "10.0.0.1", 80, "0.0.0.0", 0, 10, uid=1001, inode=8)
    lst6 = entry(6, "::", 443, "::", 0, 10, uid=33, inode=9)
    reqs = [
        entry(4, "10.0.0.1", 80, "10.0.0.2", 5000, 3),  # exact listener wins
        entry(4, "10.0.0.5", 80, "10.0.0.2", 5001, 3),  # wildcard
        entry(6, MAPPED, 443, MAPPED, 5002, 3),  # v4 client of a dual-stack listener
        entry(4, LO, 9999, LO, 5003, 3),  # no listener: stays 0
    ]
    fixed = sockdiag.fix_request_uids([lst4, lst4_exact, lst6, *reqs])
    assert [e.uid for e in fixed[3:]] == [1001, 1000, 33, 0]
    assert fixed[:3] == [lst4, lst4_exact, lst6]
    untouched = [lst4, entry(4, LO, 80, LO, 1, 1, uid=5, inode=3)]
    assert sockdiag.fix_request_uids(untouched) is untouched


class FakeNetlink:
    """Stands in for a sock_diag socket: answers each request with the next datagrams."""

    def __init__(self, *replies: list[bytes], claim: int | None = None) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.pending: list[bytes] = []
        self.claim = claim  # MSG_TRUNC: the size the kernel says the datagram had

    def send(self, data: bytes) -> int:
        self.requests.append(data)
        self.pending = list(self.replies.pop(0))
        return len(data)

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        assert flags & socket.MSG_TRUNC
        data = self.pending.pop(0)
        buf[: len(data)] = data
        return self.claim or len(data)


def test_read_tcp_dumps_both_families():
    v4 = [diag(AF4, 8, LO, 80, LO, 1, rq=1, inode=3) + diag(AF4, 8, LO, 80, LO, 2), done()]
    v6 = [diag(AF6, 8, "::1", 81, "::1", 3, rq=2) + done()]
    sock = FakeNetlink(v4, v6)
    got = sockdiag.read_tcp(sock, NS, {8})
    assert [(e.family, e.rport) for e in got] == [(4, 1), (4, 2), (6, 3)]
    families = [struct.unpack_from("=B", r, 16)[0] for r in sock.requests]
    states = {struct.unpack_from("=I", r, 20)[0] for r in sock.requests}
    assert families == [AF4, AF6] and states == {1 << 8}
    assert sockdiag.read_tcp(FakeNetlink(), NS, set()) == []  # nothing asked, nothing sent


def test_read_tcp_request_sockets_get_listener_uid():
    v4 = [diag(AF4, 10, LO, 80, "0.0.0.0", 0, uid=1000, inode=7) + diag(AF4, 3, LO, 80, LO, 9)
          + done()]  # fmt: skip
    got = sockdiag.read_tcp(FakeNetlink(v4, [done()]), NS, {3})
    assert got == [entry(4, LO, 80, LO, 9, 3, uid=1000)]  # LISTEN was asked for along only
    got = sockdiag.read_tcp(FakeNetlink(v4, [done()]), NS)
    assert [(e.state, e.uid) for e in got] == [(10, 1000), (3, 1000)]


def test_read_tcp_errors():
    with pytest.raises(OSError) as exc:
        sockdiag.read_tcp(FakeNetlink([error(-errno.ENOENT)]), NS)
    assert exc.value.errno == errno.ENOENT
    big = [diag(AF4, 8, LO, 80, LO, 1) + done()]
    with pytest.raises(OSError) as exc:  # a datagram larger than the buffer: not cut silently
        sockdiag.read_tcp(FakeNetlink(big, claim=sockdiag.RECV_BUFFER + 1), NS)
    assert exc.value.errno == errno.EMSGSIZE


class Recorder(procnet.Tally):
    """A Tally that keeps what it is given."""

    keep = frozenset({8, 10})

    def __init__(self) -> None:
        self.batches: list[list[TcpEntry]] = []
        self.ids: list[tuple] = []

    def take(self, batch: list[TcpEntry]) -> list[TcpEntry]:
        self.batches.append(batch)
        return batch

    def take_ids(self, netns, family, states, lports, ids) -> None:
        self.ids.append((netns, family, states, lports, ids))


def test_a_tally_gets_kept_states_whole_and_the_others_as_ids():
    v4 = [diag(AF4, 8, LO, 80, "10.0.0.9", 41000, rq=2, inode=5)
          + diag(AF4, 5, "10.0.0.1", 40000, "10.0.0.9", 5432)
          + diag(AF4, 10, "0.0.0.0", 80, "0.0.0.0", 0, inode=4, attrs=SHUTDOWN), done()]
    v6 = [diag(AF6, 6, "2001:db8::1", 40001, "2001:db8::9", 443) + done()]
    tally = Recorder()
    kept = sockdiag.read_tcp(FakeNetlink(v4, v6), NS, None, tally)
    assert kept == [entry(4, LO, 80, "10.0.0.9", 41000, 8, rx=2, inode=5),
                    entry(4, "0.0.0.0", 80, "0.0.0.0", 0, 10, inode=4)]
    (ns4, fam4, states4, lports4, ids4), (ns6, fam6, states6, lports6, ids6) = tally.ids
    assert (ns4, fam4, states4, lports4) == (NS, 4, bytes([5]), [40000])
    assert (ns6, fam6, states6, lports6) == (NS, 6, bytes([6]), [40001])
    assert sockdiag.id_texts(4, ids4[0]) == ("10.0.0.1", "10.0.0.9", 5432)
    assert sockdiag.id_texts(6, ids6[0]) == ("2001:db8::1", "2001:db8::9", 443)
    # One buffer mixing families (a dump asks for one) is given whole.
    mixed = Recorder()
    out: list[TcpEntry] = []
    sockdiag.parse(v4[0] + v6[0], NS, out, None, mixed)
    assert len(out) == 4 and mixed.ids == []


# ---- procnet's side, without root -------------------------------------------------------


def test_forced_proc_path(monkeypatch):
    monkeypatch.setattr(procnet, "_sock_diag_missing", False)
    monkeypatch.delenv(procnet.PROCNET_ENV, raising=False)
    assert procnet.use_sock_diag()
    monkeypatch.setenv(procnet.PROCNET_ENV, "proc")
    assert not procnet.use_sock_diag()
    monkeypatch.setenv(procnet.PROCNET_ENV, "")
    monkeypatch.setattr(procnet, "_sock_diag_missing", True)
    assert not procnet.use_sock_diag()


def fake_proc(tmp_path: Path) -> str:
    """/proc/1 in namespace NS with the fixture tables; its ns/net link leads nowhere, as in
    any fake tree, so sock_diag cannot enter it and the /proc text is read."""
    d = tmp_path / "proc" / "1"
    (d / "net").mkdir(parents=True)
    (d / "ns").mkdir()
    (d / "net" / "tcp").write_text((FIXTURES / "tcp").read_text())
    (d / "net" / "tcp6").write_text((FIXTURES / "tcp6").read_text())
    (d / "ns" / "net").symlink_to(f"net:[{NS}]")
    (d / "fd").mkdir()
    (d / "fd" / "5").symlink_to("socket:[9204]")
    (d / "comm").write_text("server\n")
    (tmp_path / "proc" / "self").symlink_to("1")
    return str(tmp_path / "proc")


def test_read_tcp_states_on_the_proc_path(tmp_path):
    proc = fake_proc(tmp_path)
    ns = Namespace(NS, 1, None)
    everything = read_tcp(ns, proc)
    assert len(everything) == 10
    assert read_tcp(ns, proc, {8}) == [e for e in everything if e.state == 8]
    assert [e.state for e in read_tcp(ns, proc, {10, 5})] == [10, 5, 5, 5, 10]
    assert read_tcp(ns, proc, set()) == []


def test_resolver_states(tmp_path):
    proc = fake_proc(tmp_path)
    cw = (NS, 4, LO, 8080, LO, 55236)
    fin_wait2 = (NS, 4, LO, 55236, LO, 8080)
    both = Resolver(proc, str(tmp_path / "none")).resolve([cw, fin_wait2])
    assert both[fin_wait2][0] is not None and both[fin_wait2][0].state == 5
    only = Resolver(proc, str(tmp_path / "none"), states=procnet.RESOLVE_STATES)
    got = only.resolve([cw, fin_wait2])
    assert got[fin_wait2] == (None, [])
    assert got[cw] == (entry(4, LO, 8080, LO, 55236, 8, rx=6, inode=9204),
                       [Holder(1, "server", 5)])  # fmt: skip

"""`tcpwatch top` without a kernel: grouping, sorting, percentiles, the collectors on fake
sources, and the rendered frame against golden text at fixed terminal sizes.

Regenerate the golden files after an intended change of the view with

    TCPWATCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_top.py

and read `git diff tests/unit/golden/` before committing.
"""

from __future__ import annotations

import doctest
import socket
import struct
import time
from array import array

import goldens
import orjson
import pytest
from click.testing import CliRunner
from streams import NETNS, SEC, Entry, Holder, Proc, at, const, flags, life, merge, step
from test_sockdiag import AF4, AF6, FakeNetlink, diag, done

from tcpwatch import schema, sockdiag
from tcpwatch.top import collect, command, hostinfo, model, view
from tcpwatch.top.hostinfo import PeerWait, PortRisk
from tcpwatch.top.model import CwSock, Ended, Entered, Host, Sample, build_rows


def sock(pid, comm, age, cause, lport=8080, raddr="10.0.0.2", rport=50000, unread=0,
         cgroup="/system.slice/api.service", leak_after=30.0):
    return CwSock(pid, comm, cgroup, lport, raddr, rport, age, unread, cause, age >= leak_after)


def sample() -> Sample:
    """Three leaking programs, one with an unknown owner, churn and exits in the window."""
    socks = (
        [sock(2411, "api", 120.0 + i, "eof_ignored", rport=50000 + i, unread=0) for i in range(7)]
        + [sock(2411, "api", 3.0, "not_reading", rport=50100, unread=512)]
        + [sock(3100, "gunicorn-worker", 45.5, "held_elsewhere", lport=9000,
                raddr="10.0.0.3", rport=41000 + i, cgroup="container:abcdef012345")
           for i in range(3)]
        + [sock(None, None, 2.0, "not_accepted", lport=443, raddr="2001:db8::7", rport=61000,
                unread=4096, cgroup="?")]
    )
    entered = [Entered(2411, "api", "/system.slice/api.service", 8080, "10.0.0.2", 50200 + i)
               for i in range(25)]
    ended = [Ended(2411, "api", "/system.slice/api.service", 8080, "10.0.0.2", 50200 + i,
                   0.002 * (i + 1), "closed") for i in range(20)]
    ended += [Ended(2411, "api", "/system.slice/api.service", 8080, "10.0.0.2", 50300, 2.5,
                    "slow_close")]
    ended += [Ended(777, "nginx", "/system.slice/nginx.service", 80, "10.0.0.9", 40000, 0.01,
                    "reset")]
    host = Host(
        hostname="web-1",
        states={"ESTABLISHED": 1204, "FIN_WAIT2": 4, "TIME_WAIT": 23881, "CLOSE_WAIT": 12,
                "LISTEN": 9},
        ephemeral_used=24100, port_range=(32768, 60999), events_per_s=35.5, lost=3,
        hooks=["state: tracepoint:sock:inet_sock_set_state", "owner: sock:sock_recv_length",
               "outcome: syscalls:sys_enter_close", "netns: struct net+176 (checked)"],
        signals=["accept queue (/proc inode)", "holders (/proc/*/fd)",
                 "FIN consumed (/proc rx_queue)", "EOF read (sock:sock_recv_length)"],
        fin_wait2=[PeerWait("10.0.0.50:8443", 4, 61.0)],
        port_risk=[PortRisk("10.0.0.1", "10.0.0.60:5432", 23900, 28232),
                   PortRisk("10.0.0.1", "10.0.0.61:6379", 120, 28232)],
    )
    return Sample("kernel", 10.0, host, socks, entered, ended, "2026-11-21T05:13:00.000000Z")


def check_golden(name: str, actual: str) -> None:
    goldens.check_golden(name, actual, __file__)


# -------------------------------------------------------------------------------- model


def test_rows_by_process_sorted_by_count():
    rows = build_rows(sample(), "process", "count")
    assert [r.group for r in rows] == ["api[2411]", "gunicorn-worker[3100]",
                                       "(unknown owner)", "nginx[777]"]
    api = rows[0]
    assert (api.pid, api.comm, api.close_wait, api.leaks, api.oldest_age_s) == (
        2411, "api", 8, 7, 126.0)
    assert api.new_per_s == 2.5 and api.closed == 21
    assert api.cause == "eof_ignored" and api.causes == {"eof_ignored": 7, "not_reading": 1}
    assert api.unread_bytes == 512
    # p50/p99 over the 21 exits and the 8 sockets still waiting (29 values)
    assert (api.p50_s, api.p99_s) == (0.03, 126.0)
    # A group with only exits: its cause comes from them, nothing is in CLOSE_WAIT now.
    nginx = rows[-1]
    assert (nginx.close_wait, nginx.cause, nginx.oldest_age_s, nginx.p99_s) == (
        0, "reset", None, 0.01)


@pytest.mark.parametrize(
    "by,first",
    # Server sockets (local 8080, peer port ephemeral) group by peer address alone.
    [("remote", "10.0.0.2"), ("port", ":8080"), ("cgroup", "/system.slice/api.service")],
)
def test_other_groupings(by, first):
    rows = build_rows(sample(), by, "count")
    assert rows[0].group == first
    if by == "remote":
        assert "[2001:db8::7]:61000" in [r.group for r in rows]


@pytest.mark.parametrize("sort,first", [("age", "api[2411]"), ("rate", "api[2411]"),
                                        ("unread", "(unknown owner)"), ("leaks", "api[2411]"),
                                        ("p99", "api[2411]")])
def test_sorts(sort, first):
    assert build_rows(sample(), "process", sort)[0].group == first


def test_filters():
    s = model.filter_sample(sample(), model.keep_only(ports=[9000]))
    assert [r.group for r in build_rows(s)] == ["gunicorn-worker[3100]"]
    s = model.filter_sample(sample(), model.keep_only(pids=[777]))
    assert [r.group for r in build_rows(s)] == ["nginx[777]"]


def reference_rows(sample: Sample, by: str, sort: str) -> list[model.Row]:
    """build_rows() as it was written first, one socket at a time: the oracle for the one
    that leaves per-socket work to C."""
    eph = sample.host.port_range
    stuck: dict = {}
    for s in sample.sockets:
        stuck.setdefault(model.group_of(by, s, eph), []).append(s)
    ended: dict = {}
    for e in sample.ended:
        ended.setdefault(model.group_of(by, e, eph), []).append(e)
    entered: dict = {}
    for e in sample.entered:
        g = model.group_of(by, e, eph)
        entered[g] = entered.get(g, 0) + e.count
    rows = []
    for g in sorted({*stuck, *ended, *entered}):
        socks, gone = stuck.get(g, []), ended.get(g, [])
        timed = [e for e in gone if e.duration_s is not None]
        durations = [e.duration_s for e in timed] + [s.age_s for s in socks]
        weights = ([e.count for e in timed] + [1] * len(socks)
                   if any(e.count != 1 for e in timed) else None)
        p50, p99 = model.percentiles(durations, (50, 99), weights)
        causes: dict = {}
        for c, n in ([(s.cause, 1) for s in socks] or [(e.cause, e.count) for e in gone]):
            causes[c] = causes.get(c, 0) + n
        who: dict = {}
        for it in [*socks, *gone]:
            if it.pid is not None:
                who[(it.pid, it.comm)] = who.get((it.pid, it.comm), 0) + it.count
        pid, comm = min(who, key=lambda k: (-who[k], k[0])) if who else (None, None)
        rows.append(model.Row(
            group=g, pid=pid, comm=comm, close_wait=len(socks),
            oldest_age_s=round(max(s.age_s for s in socks), 3) if socks else None,
            leaks=sum(s.leaked for s in socks),
            new_per_s=round(entered.get(g, 0) / sample.window_s, 3) if sample.window_s else 0.0,
            p50_s=model._r(p50), p99_s=model._r(p99),
            unread_bytes=sum(s.unread or 0 for s in socks),
            cause=model.dominant(s.cause for s in socks)
            or model.dominant([e.cause for e in gone], [e.count for e in gone]),
            causes=dict(sorted(causes.items())), closed=sum(e.count for e in gone),
        ))
    rows.sort(key=model._sort_key(sort))
    return rows


def random_sample(rng) -> Sample:
    """Sockets, entries and exits drawn from small pools, so that groups collide: unknown
    owners with and without comm, one pid under two comms, v4-mapped and plain addresses,
    server and client sides, tied ages, unread None."""
    pids = [(None, None), (None, "x"), (7, "a"), (7, "b"), (8, ""), (8, None), (9, "c")]
    addrs = ["10.0.0.2", "::ffff:10.0.0.2", "2001:db8::1", "10.0.0.3"]
    causes = ["eof_ignored", "not_reading", "held_elsewhere", "unknown", "not_accepted"]

    def ref():
        pid, comm = rng.choice(pids)
        return (pid, comm, rng.choice(["/a", "/b", "?"]), rng.choice([80, 8080, 40001]),
                rng.choice(addrs), rng.choice([443, 5432, 40002, 50003, 60999]))

    socks = [CwSock(*ref(), rng.choice([1.5, 2.0, rng.random() * 100]),
                    rng.choice([None, 0, 5, 1000]), rng.choice(causes), rng.random() < 0.3)
             for _ in range(rng.randrange(0, 60))]
    ended = [Ended(*ref(), rng.choice([None, 0.002, rng.random()]),
                   rng.choice(["closed", "reset", "slow_close"]), rng.choice([1, 1, 3]))
             for _ in range(rng.randrange(0, 20))]
    entered = [Entered(*ref(), rng.choice([1, 2])) for _ in range(rng.randrange(0, 20))]
    return Sample("kernel", rng.choice([0.0, 5.0, 10.0]), Host(port_range=(40000, 60000)),
                  socks, entered, ended)


def test_rows_are_those_of_the_socket_by_socket_oracle():
    import random

    rng = random.Random(4)
    groups = set()
    for _ in range(300):
        s = random_sample(rng)
        for by in model.GROUPINGS:
            for sort in model.SORTS:
                rows = build_rows(s, by, sort)
                assert rows == reference_rows(s, by, sort)
                groups.update(r.group for r in rows)
    # the pools did make the collisions the merging is for
    assert {"(unknown owner)", "?[8]", "a[7]", "b[7]", "10.0.0.2", "10.0.0.2:5432"} <= groups


def test_percentile_nearest_rank():
    assert model.percentile([5.0], 99) == 5.0
    assert model.percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert model.percentile([], 50) is None


# ------------------------------------------------------------------------------- view


def frame_text(width: int, height: int | None, by="process", sort="count", keys=True) -> str:
    s = sample()
    out = view.render(s, build_rows(s, by, sort), by, sort, width=width, height=height,
                      keys_help=keys)
    return view.plain(out, width)


@pytest.mark.parametrize("width,height", [(80, 24), (100, 30)])
def test_live_frame_golden(width, height):
    text = frame_text(width, height)
    check_golden(f"top.{width}x{height}.txt", text)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height
    assert max(len(line) for line in lines) <= width


def test_small_terminal_cuts_rows_not_header():
    text = frame_text(80, 11, by="remote")
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= 11 and "more" in text and lines[0].startswith("tcpwatch top")
    assert lines[-1].strip() == view.KEYS_HELP


def test_once_text_golden_has_every_row_and_the_sections():
    text = frame_text(100, None, keys=False)
    check_golden("top.once.txt", text)
    assert "FIN_WAIT2 by remote" in text and "10.0.0.60:5432" in text
    assert "10.0.0.61:6379" not in text.split("local ports per destination")[1]  # under 5%
    assert "PORTS warn" in text and "q quit" not in text


def test_colour_only_where_it_means_something():
    s = sample()
    rows = build_rows(s)
    coloured = view.plain(view.render(s, rows, "process", "count", width=100), 100, color=True)
    assert "\x1b[31m" in coloured  # leaks and stuck causes in red
    plain = view.plain(view.render(s, rows, "process", "count", width=100), 100)
    assert "\x1b" not in plain


def test_control_characters_in_comm_are_neutralised():
    s = sample()
    s.sockets.append(sock(666, "evil\x1b[2J", 1.0, "unknown"))
    assert "\x1b[2J" not in frame_text(100, None)


def test_json_frame():
    s = sample()
    frame = orjson.loads(orjson.dumps(view.frame_json(s, build_rows(s), "process", "count", 5.0)))
    assert frame["rows"][0] | {} == frame["rows"][0]
    row = frame["rows"][0]
    for key in ("pid", "comm", "close_wait", "oldest_age_s", "leaks", "cause", "new_per_s",
                "p50_s", "p99_s", "unread_bytes", "causes", "group"):
        assert key in row
    assert (row["pid"], row["comm"], row["close_wait"], row["cause"]) == (
        2411, "api", 8, "eof_ignored")
    assert frame["states"]["TIME_WAIT"] == 23881 and frame["lost"] == 3
    assert frame["ephemeral"] == {"used": 24100, "low": 32768, "high": 60999, "size": 28232}
    assert frame["port_risk"][0]["level"] == "warn" and frame["fin_wait2"][0]["count"] == 4


# --------------------------------------------------------------------------- hostinfo


def test_port_risk_and_fin_wait2_from_entries():
    e = [Entry(NETNS, 4, "10.0.0.1", 40000 + i, "10.0.0.60", 5432, state=st)
         for i, st in enumerate([1] * 5 + [8] * 3 + [6] * 2 + [5])]
    e.append(Entry(NETNS, 4, "10.0.0.1", 5432, "0.0.0.0", 0, state=10, inode=5))
    tally = hostinfo.HostTally((40000, 40011), {hostinfo.seen_key(e[10]): 100.0}, 160.0)
    kept = tally.take(e[:6]) + tally.take(e[6:])  # batches add up
    assert kept == [*e[5:8], e[11]]  # CLOSE_WAIT and LISTEN only
    (risk,) = tally.port_risk({40011})
    assert (risk.held, risk.usable, risk.level) == (11, 11, "critical")
    (peer,) = tally.fin_wait2()
    assert (peer.remote, peer.count, peer.oldest_s) == ("10.0.0.60:5432", 1, 60.0)
    assert tally.ephemeral_used() == 11
    assert tally.state_names() == {"ESTABLISHED": 5, "FIN_WAIT2": 1, "TIME_WAIT": 2,
                                   "CLOSE_WAIT": 3, "LISTEN": 1}
    # first sightings carried over for FIN_WAIT2 only (CLOSE_WAIT ones are the collector's)
    assert list(tally.first_seen.values()) == [100.0]


def test_a_counted_tally_lets_go_of_the_last_frames_first_sightings():
    """Once the snapshot is counted, the previous frame's first sightings (a dict as big as
    the host's FIN_WAIT2 sockets) are no longer kept alive by the tally."""
    import weakref

    class Firsts(dict):  # a dict that can be weakly referenced
        pass

    e = [Entry(NETNS, 4, "10.0.0.1", 40000 + i, "10.0.0.60", 5432, state=5) for i in range(3)]
    before = Firsts({hostinfo.seen_key(e[0]): 100.0})
    tally = hostinfo.HostTally((40000, 40011), before, 160.0)
    tally.take(e)
    tally.counted()
    gone = weakref.ref(before)
    del before
    assert gone() is None
    assert sorted(tally.first_seen.values()) == [100.0, 160.0, 160.0]  # carried over alike
    (peer,) = tally.fin_wait2()
    assert (peer.count, peer.oldest_s) == (3, 60.0)


def test_a_socket_listed_twice_keeps_its_first_sighting():
    """The tally moves each sighting out of the last frame's dict: a FIN_WAIT2 socket a dump
    lists twice (entries, or netlink ids) still has its old first sighting, not now."""
    e = Entry(NETNS, 4, "10.0.0.1", 40001, "10.0.0.60", 5432, state=5)
    text = hostinfo.HostTally((40000, 40011), {hostinfo.seen_key(e): 100.0}, 160.0)
    text.take([e, e])
    sid = (5432).to_bytes(2, "big") + bytes([10, 0, 0, 1]).ljust(16, b"\0") + bytes(
        [10, 0, 0, 60]).ljust(16, b"\0")
    key = hostinfo.seen_id_key(NETNS, 4, 40001, sid)
    ids = hostinfo.HostTally((40000, 40011), {key: 100.0}, 160.0)
    ids.take_ids(NETNS, 4, bytes([5, 5]), [40001, 40001], [sid, sid])
    ids.take_ids(NETNS, 4, bytes([5]), [40001], [sid])  # and in a later datagram
    for tally, listed in ((text, 2), (ids, 3)):
        assert list(tally.first_seen.values()) == [100.0]
        assert [(p.count, p.oldest_s) for p in tally.fin_wait2()] == [(listed, 60.0)]


def test_a_failed_snapshot_keeps_the_first_sightings_it_took_over(monkeypatch):
    e = [Entry(NETNS, 4, "10.0.0.1", 40000 + i, "10.0.0.60", 5432, state=5) for i in range(3)]
    rows = [e]

    def snapshot():
        if not rows:
            raise OSError("netlink went away")
        return rows.pop()

    view = collect._HostView(10.0, (), snapshot, lambda inodes: {}, Clock(100.0))
    view.read()
    first = dict(view.first_seen)
    assert len(first) == 3

    class Half(hostinfo.HostTally):  # counts the first batch, then the dump fails
        def take(self, entries):
            super().take(entries[:2])
            raise OSError("netlink went away")

    rows.append(e)
    monkeypatch.setattr(hostinfo, "HostTally", Half)
    view.clock.t += 5 * SEC
    with pytest.raises(OSError):
        view.read()
    assert view.first_seen == first


def test_port_risk_counts_a_local_port_held_twice_towards_one_peer_once():
    """Two sockets on one local port to one peer (a TIME_WAIT and its successor, or v4 and
    v4-mapped): one port held, whether counted from entries or from netlink ids."""
    def sid(lport_peer: int, laddr: bytes, raddr: bytes) -> bytes:
        return lport_peer.to_bytes(2, "big") + laddr.ljust(16, b"\0") + raddr.ljust(16, b"\0")

    e = [Entry(NETNS, 4, "10.0.0.1", 40001, "10.0.0.60", 5432, state=st) for st in (1, 6)]
    e.append(Entry(NETNS, 6, "::ffff:10.0.0.1", 40001, "::ffff:10.0.0.60", 5432, state=1))
    e.append(Entry(NETNS, 4, "10.0.0.1", 40002, "10.0.0.60", 5432, state=1))
    text = hostinfo.HostTally((40000, 40011), {}, 1.0)
    text.take(e)
    ids = hostinfo.HostTally((40000, 40011), {}, 1.0)
    one = sid(5432, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 60]))
    ids.take_ids(NETNS, 4, bytes([1, 6, 1]), [40001, 40001, 40002], [one, one, one])
    mapped = sid(5432, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]),
                 bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 60]))
    ids.take_ids(NETNS, 6, bytes([1]), [40001], [mapped])
    for tally in (text, ids):
        (risk,) = tally.port_risk(set())
        assert (risk.laddr, risk.remote, risk.held) == ("10.0.0.1", "10.0.0.60:5432", 2)


def test_tally_merges_one_endpoint_written_two_ways():
    """IPv4 and v4-mapped IPv6 sockets to one peer: one port-risk row, one FIN_WAIT2 row,
    each port counted once."""
    e = [Entry(NETNS, 4, "10.0.0.1", 40000, "10.0.0.60", 5432, state=5),
         Entry(NETNS, 6, "::ffff:10.0.0.1", 40001, "::ffff:10.0.0.60", 5432, state=5),
         Entry(NETNS, 6, "::ffff:10.0.0.1", 40000, "::ffff:10.0.0.60", 5432, state=1)]
    tally = hostinfo.HostTally((40000, 40011), {}, 10.0)
    tally.take(e)
    (risk,) = tally.port_risk(set())
    assert (risk.laddr, risk.remote, risk.held) == ("10.0.0.1", "10.0.0.60:5432", 2)
    (peer,) = tally.fin_wait2()
    assert (peer.remote, peer.count, peer.oldest_s) == ("10.0.0.60:5432", 2, 0.0)


def host_table(gone: int = 0, extra: int = 0) -> list[tuple]:
    """(family, state, laddr, lport, raddr, rport, inode) of a varied host: FIN_WAIT2 to one
    peer written as IPv4 and as v4-mapped IPv6, to an IPv6 peer, from two local addresses;
    ports inside and outside the range; listeners, server children, TIME_WAIT, requests.
    gone: FIN_WAIT2 sockets left out; extra: new ones added."""
    rows = [(AF4, 10, "0.0.0.0", 8080, "0.0.0.0", 0, 900), (AF6, 10, "::", 8443, "::", 0, 901)]
    rows += [(AF4, 8, "10.0.0.1", 8080, "10.0.0.2", 41000 + i, 1000 + i) for i in range(5)]
    rows += [(AF4, 5, f"10.0.0.{1 + i % 2}", 40000 + i, "10.0.0.60", 5432, 0)
             for i in range(gone, 30 + extra)]
    rows += [(AF6, 5, "::ffff:10.0.0.1", 40100 + i, "::ffff:10.0.0.60", 5432, 0)
             for i in range(4)]
    rows += [(AF6, 5, "2001:db8::1", 50000 + i, "2001:db8::9", 443, 0) for i in range(3)]
    rows += [(AF4, 1, "10.0.0.1", 40200 + i, "10.0.0.61", 6379, 2000 + i) for i in range(6)]
    rows += [(AF4, 6, "10.0.0.1", 40300 + i, "10.0.0.60", 5432, 0) for i in range(2)]
    rows += [(AF4, 3, "10.0.0.1", 8080, "10.0.0.3", 45000, 0),  # a request: no port of its own
             (AF4, 1, "10.0.0.1", 20000, "10.0.0.62", 80, 3000)]  # below the range
    return rows


def feed_both(rows: list[tuple], first: tuple[dict, dict], now: float):
    """Two tallies of one table: one fed TcpEntry (as from /proc text), one fed netlink
    datagrams of 7 messages (as from sock_diag: take_ids() for what it does not keep)."""
    fam = {AF4: 4, AF6: 6}
    text = hostinfo.HostTally((40000, 60000), first[0], now)
    kept_text = text.take([Entry(NETNS, fam[f], la, lp, ra, rp, state=st, inode=ino)
                           for f, st, la, lp, ra, rp, ino in rows])
    diag_tally = hostinfo.HostTally((40000, 60000), first[1], now)
    replies = []
    for f in (AF4, AF6):
        msgs = [diag(f, st, la, lp, ra, rp, inode=ino) for ff, st, la, lp, ra, rp, ino in rows
                if ff == f]
        replies.append([b"".join(msgs[i:i + 7]) for i in range(0, len(msgs), 7)] + [done()])
    kept_diag = sockdiag.read_tcp(FakeNetlink(*replies), NETNS, None, diag_tally)
    return (text, kept_text), (diag_tally, kept_diag)


def test_a_tally_fed_netlink_ids_gives_the_figures_of_one_fed_entries():
    (text, kept_text), (raw, kept_raw) = feed_both(host_table(), ({}, {}), 100.0)
    assert sorted(kept_raw) == sorted(kept_text) and len(kept_raw) == 7
    assert raw.state_names() == text.state_names() == {
        "ESTABLISHED": 7, "SYN_RECV": 1, "FIN_WAIT2": 37, "TIME_WAIT": 2, "CLOSE_WAIT": 5,
        "LISTEN": 2}
    risk = raw.port_risk(set())
    assert risk == text.port_risk(set())
    # the v4-mapped sockets to 10.0.0.60:5432 count with the IPv4 ones from 10.0.0.1
    assert [(r.laddr, r.remote, r.held) for r in risk[:3]] == [
        ("10.0.0.1", "10.0.0.60:5432", 21), ("10.0.0.2", "10.0.0.60:5432", 15),
        ("10.0.0.1", "10.0.0.61:6379", 6)]
    assert raw.fin_wait2() == text.fin_wait2() == [PeerWait("10.0.0.60:5432", 34, 0.0),
                                                   PeerWait("[2001:db8::9]:443", 3, 0.0)]
    assert raw.ephemeral_used() == text.ephemeral_used() == 45
    assert len(raw.first_seen) == len(text.first_seen) == 37

    # The next frame: 5 FIN_WAIT2 sockets gone, 8 new; first sightings carried over alike.
    (text2, _), (raw2, _) = feed_both(host_table(gone=5, extra=8),
                                      (text.first_seen, raw.first_seen), 160.0)
    assert raw2.fin_wait2() == text2.fin_wait2() == [PeerWait("10.0.0.60:5432", 37, 60.0),
                                                     PeerWait("[2001:db8::9]:443", 3, 60.0)]
    assert sorted(raw2.first_seen.values()) == sorted(text2.first_seen.values())
    assert sorted(raw2.first_seen.values()).count(100.0) == 32  # 37 - 5 gone
    assert raw2.port_risk(set()) == text2.port_risk(set())


# ------------------------------------------------------------------------- collectors

SERVER = Proc(812, "server")
SK = 0xFFFF888105B5DC80


class FakeSource:
    """Raw events handed out on poll(), a lost counter, no bcc."""

    def __init__(self, events: list[dict]) -> None:
        self.batches = [[schema.encode(ev) for ev in events]]

    def poll(self, timeout_s: float) -> list[bytes]:
        return self.batches.pop(0) if self.batches else []

    def counters(self) -> dict[str, int]:
        return {"lost": 2}

    def close(self) -> None:
        pass


class Clock:
    def __init__(self, t_s: float) -> None:
        self.t = at(t_s)

    def __call__(self) -> int:
        return self.t


def test_kernel_collector_joins_kernel_and_proc():
    evs = merge(
        # stuck: owner seen, forked child holds it
        life(SK, [step(1.0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)]),
        # came and went within the window, closed quickly
        life(SK + 64, [step(2.0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
                       step(2.01, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER,
                            outcome="closed")], rport=50001),
        # still in the accept queue of a listener held by the server
        life(SK + 128, [step(3.0, "ESTABLISHED", "CLOSE_WAIT")], rport=50002),
    )
    table = [
        Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 51234, rx_queue=1, inode=9204),
        Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 50002, rx_queue=40, inode=0),
        Entry(NETNS, 4, "0.0.0.0", 8080, "0.0.0.0", 0, state=10, inode=9000),
        Entry(NETNS, 4, "10.0.0.1", 33000, "10.0.0.60", 5432, state=5, inode=7),
    ]
    holders = {9204: [Holder(813, "worker", 5)], 9000: [Holder(812, "server", 3)]}
    clock = Clock(0.0)
    col = collect.KernelCollector(
        FakeSource(evs), {"owner": "sock:sock_recv_length"}, window_s=10.0,
        snapshot=lambda: table, holders_of=lambda inodes: {i: holders[i] for i in inodes
                                                           if i in holders},
        clock=clock)
    col.seed()
    col.sample()
    col.pump(0.1)
    clock.t = at(5.0)
    s = col.sample()
    got = sorted((x.pid, x.comm, x.cause, x.age_s, x.unread) for x in s.sockets)
    assert got == [(812, "server", "not_accepted", 2.0, 39), (813, "worker", "held_elsewhere",
                                                             4.0, 0)]
    assert [(e.duration_s, e.cause) for e in s.ended] == [(0.01, "closed")]
    assert s.window_s == 5.0 and len(s.entered) == 3
    assert s.host.lost == 2 and s.host.states["FIN_WAIT2"] == 1
    rows = build_rows(s)
    assert {r.group: r.cause for r in rows} == {"server[812]": "not_accepted",
                                                "worker[813]": "held_elsewhere"}


class FakeMapSource(FakeSource):
    """The kernel's side of top's cw-map mode, played from an event stream: sockets entering
    CLOSE_WAIT go into a `cw` map (EOF and owner news update them), and only exits are handed
    out on poll(), as bpf/tcpwatch.bpf.c does with TW_CFG_CW_MAP."""

    def __init__(self, events: list[dict]) -> None:
        lay = schema.layout_of("tw_cw")
        self.cw: dict[int, dict] = {}
        self.forgotten: list[int] = []
        exits = []
        for ev in events:
            sk = ev["sk"]
            if ev["kind"] == const("TW_KIND_STATE") and ev["old"] == schema.CLOSE_WAIT:
                self.cw.pop(sk, None)
                exits.append(ev)
            elif ev["kind"] == const("TW_KIND_STATE") and ev["new"] == schema.CLOSE_WAIT:
                self.cw[sk] = dict(ev)
            elif sk in self.cw:  # EOF / owner news
                self.cw[sk].update(pid=ev["pid"], tid=ev["tid"], comm=ev["comm"],
                                   flags=ev["flags"] | self.cw[sk]["flags"])
        self.batches = [[schema.encode(ev) for ev in exits]]
        fam = {4: socket.AF_INET, 6: socket.AF_INET6}
        self.rows = {
            sk: lay.struct.pack(
                ev["ts_ns"], 0, socket.inet_pton(fam[ev["family"]], ev["laddr"]).ljust(16, b"\0"),
                socket.inet_pton(fam[ev["family"]], ev["raddr"]).ljust(16, b"\0"), ev["pid"],
                ev["tid"], ev["netns"], fam[ev["family"]], ev["lport"], ev["rport"],
                ev["flags"] & 0xFF, 0, ev["comm"].encode())
            for sk, ev in self.cw.items()
        }

    def read_cw_chunks(self) -> list[tuple[bytes, bytes]]:
        """As loader.KernelSource: the sk addresses and the values, in batches of 2."""
        rows = [(sk, raw) for sk, raw in self.rows.items() if sk not in self.forgotten]
        return [(b"".join(struct.pack("=Q", sk) for sk, _ in rows[i:i + 2]),
                 b"".join(raw for _, raw in rows[i:i + 2])) for i in range(0, len(rows), 2)]

    def forget_cw(self, sks: list[int]) -> None:
        self.forgotten += sks


def test_kernel_map_mode_gives_the_same_sample_as_the_event_stream():
    evs = merge(
        life(SK, [step(1.0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)]),
        life(SK + 64, [step(2.0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
                       step(2.01, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER,
                            outcome="closed")], rport=50001),
        life(SK + 128, [step(3.0, "ESTABLISHED", "CLOSE_WAIT")], rport=50002),
        # in the map, but /proc no longer has it in CLOSE_WAIT: its exit was skipped
        life(SK + 192, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)], rport=50003),
    )
    table = [
        Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 51234, rx_queue=1, inode=9204),
        Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 50002, rx_queue=40, inode=0),
        Entry(NETNS, 4, "0.0.0.0", 8080, "0.0.0.0", 0, state=10, inode=9000),
    ]
    holders = {9204: [Holder(813, "worker", 5)], 9000: [Holder(812, "server", 3)]}
    samples = []
    for source, cw_map in ((FakeSource(evs), False), (FakeMapSource(evs), True)):
        clock = Clock(0.0)
        col = collect.KernelCollector(
            source, {"owner": "sock:sock_recv_length"}, window_s=10.0,
            snapshot=lambda: table, holders_of=lambda inodes: {i: holders[i] for i in inodes
                                                               if i in holders},
            clock=clock, cw_map=cw_map)
        col.seed()
        col.sample()
        col.pump(0.1)
        clock.t = at(5.0)
        samples.append(col.sample())
    events, kernel = samples
    def key(socks: list) -> list:
        return sorted(socks, key=lambda x: x.rport)

    # The event path still believes the socket whose exit was skipped; the map path checks
    # its map against /proc and drops it from the map.
    assert key(kernel.sockets) == [x for x in key(events.sockets) if x.rport != 50003]
    assert [(x.pid, x.cause) for x in key(kernel.sockets)] == [(812, "not_accepted"),
                                                                (813, "held_elsewhere")]
    assert kernel.ended == events.ended == [
        collect.Ended(812, "server", "?", 8080, "10.0.0.2", 50001, 0.01, "closed")]
    assert len(kernel.entered) == 3  # the stale one entered before the window
    assert kernel.host.lost == events.host.lost == 2
    assert source.forgotten == [SK + 192]


class World:
    """The kernel's `cw` map, /proc's CLOSE_WAIT and LISTEN sockets, their holders and the
    processes' cgroups, changed at random between frames (CacheWorld.change)."""

    LISTENER = 9000  # inode of the listener on 8080, held by SERVER

    def __init__(self, rng) -> None:
        self.rng = rng
        self.socks: dict[int, dict] = {}  # sk -> the socket (in_map / in_proc say where)
        self.scan: dict[int, tuple] = {self.LISTENER: (Holder(812, "server", None),)}
        self.cgroups = {812: "/a", 813: "/b", 900: "/c"}
        self.next_sk, self.next_inode, self.next_port = SK, 20000, 41000
        self.clock = Clock(0.0)

    def add(self, **extra) -> int:
        sk, self.next_sk = self.next_sk, self.next_sk + 64
        self.next_port += 1
        sock = dict(ts=self.clock.t, laddr="10.0.0.1", lport=8080,
                    raddr=self.rng.choice(["10.0.0.2", "10.0.0.3"]), rport=self.next_port,
                    netns=self.rng.choice([NETNS, NETNS, 0]), proc_netns=NETNS,
                    pid=812, tid=812, comm="server", flags=flags("OWNER"), inode=0, rx=1,
                    in_map=True, in_proc=True)
        sock.update(extra)
        if self.rng.random() < 0.7:
            self.accept(sock)
        self.socks[sk] = sock
        return sk

    def accept(self, sock: dict) -> None:
        sock["inode"], self.next_inode = self.next_inode, self.next_inode + 1
        who = self.rng.choice([Holder(812, "server", None), Holder(813, "worker", None)])
        self.scan = {**self.scan, sock["inode"]: (who,)}

    def change(self) -> str:
        """One random change; its name."""
        rng, live = self.rng, [s for s in self.socks.values() if s["in_map"] and s["in_proc"]]
        what = rng.choice(["new", "owner", "eof", "rx", "accept", "holder", "rescan", "close",
                           "reuse", "missed_exit", "cgroup", "twin", "reorder", "nothing"])
        sock = rng.choice(live) if live else None
        if what == "new" or sock is None:
            self.add()
            return "new"
        if what == "owner":
            sock.update(pid=900, tid=901, comm="api", flags=flags("OWNER"))
        elif what == "eof":
            sock["flags"] |= flags("EOF_READ")
        elif what == "rx":
            sock["rx"] = rng.choice([0, 1, 7, 300, 5000])
        elif what == "accept":
            self.accept(sock)
        elif what == "holder" and sock["inode"]:
            self.scan = {**self.scan, sock["inode"]: (Holder(813, "worker", None),
                                                      Holder(812, "server", None))}
        elif what == "rescan":  # a new scan finding the same: new, equal objects
            self.scan = {i: tuple(Holder(*h) for h in held) for i, held in self.scan.items()}
        elif what == "close":
            sock.update(in_map=False, in_proc=False)
        elif what == "reuse":  # a closed socket's address taken by a new one
            old = next((sk for sk, s in self.socks.items() if not s["in_map"]), None)
            if old is not None:
                self.socks[old] = dict(self.socks[self.add()])
                del self.socks[self.next_sk - 64]
        elif what == "missed_exit":  # gone from /proc, the map still has it: stale in 1 s
            sock["in_proc"] = False
        elif what == "reorder":  # /proc lists the sockets in another order
            order = list(self.socks.items())
            rng.shuffle(order)
            self.socks = dict(order)
        elif what == "cgroup":
            self.cgroups[rng.choice([812, 813, 900])] = rng.choice(["/a", "/x", "/y"])
        elif what == "twin":  # the same 4-tuple in another namespace, tracked or not
            # (one that has none yet: the kernel keeps one socket per 4-tuple and namespace)
            ns = 1 + max(s["proc_netns"] for s in self.socks.values()
                         if (s["raddr"], s["rport"]) == (sock["raddr"], sock["rport"]))
            twin = dict(sock, proc_netns=ns, inode=0)
            twin["netns"] = rng.choice([ns, ns, 0])
            self.socks[self.next_sk] = twin
            self.next_sk += 64
            twin["in_map"] = rng.random() < 0.5
        return what

    def table(self) -> list:
        rows = [Entry(NETNS, 4, "0.0.0.0", 8080, "0.0.0.0", 0, state=10, inode=self.LISTENER)]
        rows += [Entry(s["proc_netns"], 4, s["laddr"], s["lport"], s["raddr"], s["rport"],
                       rx_queue=s["rx"], inode=s["inode"])
                 for s in self.socks.values() if s["in_proc"]]
        return rows

    def cw_values(self) -> list[tuple[int, bytes]]:
        lay = schema.layout_of("tw_cw")
        return [(sk, lay.struct.pack(
            s["ts"], 0, socket.inet_aton(s["laddr"]).ljust(16, b"\0"),
            socket.inet_aton(s["raddr"]).ljust(16, b"\0"), s["pid"], s["tid"], s["netns"],
            socket.AF_INET, s["lport"], s["rport"], s["flags"], 0, s["comm"].encode()))
            for sk, s in self.socks.items() if s["in_map"]]


class WorldSource(FakeMapSource):
    """A `cw` map read from a World; forget_cw() drops entries from it (or only counts)."""

    def __init__(self, world: World, forgets: bool) -> None:
        super().__init__([])
        self.world, self.forgets = world, forgets

    def read_cw_chunks(self) -> list[tuple[bytes, bytes]]:
        rows = self.world.cw_values()
        return [(b"".join(struct.pack("=Q", sk) for sk, _ in rows[i:i + 3]),
                 b"".join(raw for _, raw in rows[i:i + 3])) for i in range(0, len(rows), 3)]

    def forget_cw(self, sks: list[int]) -> None:
        self.forgotten += sks
        if self.forgets:
            for sk in sks:
                self.world.socks[sk]["in_map"] = False


def world_collector(world: World, forgets: bool) -> collect.KernelCollector:
    col = collect.KernelCollector(WorldSource(world, forgets), {}, window_s=10.0,
                                  leak_after_s=3.0, snapshot=world.table, clock=world.clock,
                                  cw_map=True)

    class Scans:  # the holder scan is the world's: the same dict until it rescans
        def get(self, inodes):
            return world.scan

    col.view.holders = Scans()
    return col


@pytest.mark.parametrize("colliding", [False, True])
def test_tracked_sockets_kept_from_frame_to_frame_are_those_made_afresh(monkeypatch,
                                                                        colliding):
    """A collector that keeps its CwSocks from frame to frame shows, after every change,
    the sockets a new collector makes from scratch: owners, EOF, receive queues, accepts,
    holders (changed, or rescanned alike), closes, reused sk addresses, missed exits, cgroups,
    one 4-tuple in two namespaces, /proc's order, ages and leaks as time passes. (colliding:
    the /proc index's 4-tuple hashes fall in 3 values.)"""
    import builtins
    import random

    if colliding:
        monkeypatch.setattr(collect, "hash", lambda x: builtins.hash(x) % 3 if isinstance(
            x, tuple) else builtins.hash(x), raising=False)
    rng = random.Random(7)
    world = World(rng)
    monkeypatch.setattr(hostinfo, "cgroup_of", lambda pid, proc_root="/proc":
                        world.cgroups.get(pid, "?"))
    for _ in range(12):
        world.add()
    kept = world_collector(world, forgets=True)
    made = []
    real_make = collect.KernelCollector._make

    def counting_make(self, *args):
        if self is kept:
            made.append(1)
        return real_make(self, *args)

    monkeypatch.setattr(collect.KernelCollector, "_make", counting_make)
    shown = 0
    seen_changes = set()
    for step_no in range(400):
        seen_changes.add(world.change())
        if rng.random() < 0.5:
            seen_changes.add(world.change())
        world.clock.t += int(rng.choice([0.3, 0.7, 1.5]) * SEC)
        fresh = world_collector(world, forgets=False)
        fresh.view.cw_seen = dict(kept.view.cw_seen)  # the same first sightings
        want = fresh.sample().sockets
        got = kept.sample().sockets
        assert got == want, f"step {step_no}"
        # what it keeps is what the map has now (closed and forgotten sockets let go)
        assert set(kept._known) == {sk for sk, s in world.socks.items() if s["in_map"]}
        shown += len(got)
    assert seen_changes >= {"new", "owner", "eof", "rx", "accept", "holder", "rescan", "close",
                            "reuse", "missed_exit", "cgroup", "twin", "reorder"}
    assert kept.source.forgotten  # missed exits were forgotten
    # most sockets were kept, not made again (never-accepted ones, a third of the new ones,
    # are always made again)
    assert shown > 10000 and len(made) < shown / 3, (shown, len(made))


@pytest.mark.parametrize("degenerate", [None, lambda h: 7, lambda h: h % 3])
def test_proc_index_finds_by_key_and_namespace_whatever_the_hashes(monkeypatch, degenerate):
    """The /proc index is keyed by hash: with every key colliding (or a third of them), it
    finds what it finds with real hashes, and marks the same entries."""
    import builtins

    if degenerate is not None:
        monkeypatch.setattr(collect, "hash", lambda x: degenerate(builtins.hash(x)),
                            raising=False)
    other = NETNS + 1
    cw = [Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 41000 + i, inode=i + 1)
          for i in range(6)]
    cw += [Entry(other, 4, "10.0.0.1", 8080, "10.0.0.2", 41000, inode=50),  # a twin
           Entry(NETNS, 6, "::ffff:10.0.0.1", 8080, "::ffff:10.0.0.9", 42000, inode=60)]
    index = collect._ProcIndex(cw)
    find = index.find
    assert find(("10.0.0.1", 8080, "10.0.0.2", 41003), NETNS) is cw[3]
    assert find(("10.0.0.1", 8080, "10.0.0.2", 41003), other) is None  # wrong namespace
    assert find(("10.0.0.1", 8080, "10.0.0.2", 41000), other) is cw[6]  # the twin
    assert find(("10.0.0.1", 8080, "10.0.0.2", 41000), 0) is cw[0]  # any: the first
    assert find(("10.0.0.1", 8080, "10.0.0.9", 42000), 0) is cw[7]  # canonical
    assert find(("10.0.0.1", 8080, "10.0.0.2", 49999), 0) is None
    assert index.unused() == [cw[1], cw[2], cw[4], cw[5]]


def test_age_seconds_is_round_to_the_millisecond():
    import random

    rng = random.Random(3)
    values = [0, 1, 499_999, 500_000, 500_001, 1_500_000, 2_500_000, -1, -500_000, -2_500_000,
              1 << 62, (1 << 62) + 500_000, 10**18 + 1_500_000]
    values += [rng.randrange(-10**9, 10**13) for _ in range(20000)]
    values += [rng.randrange(10**6) * 10**6 + 500_000 + rng.randrange(-1500, 1500)
               for _ in range(20000)]  # around ties
    for ns in values:
        got, want = collect.age_seconds(ns), round(ns / 1e9, 3)
        assert got == want and str(got) == str(want), ns  # -0.0 stays -0.0


def test_a_full_cw_map_is_reported_in_the_header():
    class Full(FakeMapSource):
        def counters(self) -> dict[str, int]:
            return {"lost": 0, "cw_full": 7}

    col = collect.KernelCollector(Full([]), {}, snapshot=lambda: [],
                                  holders_of=lambda inodes: {}, clock=Clock(1.0), cw_map=True)
    (warning,) = col.sample().host.warnings
    assert warning.startswith("7 sockets entered CLOSE_WAIT while the kernel's cw map was full")
    col = collect.KernelCollector(FakeMapSource([]), {}, snapshot=lambda: [],
                                  holders_of=lambda inodes: {}, clock=Clock(1.0), cw_map=True)
    assert col.sample().host.warnings == []


LAST_ACK, CLOSE = 9, 7


class CountedSource(FakeMapSource):
    """top's raw path: exits counted in the kernel's `exits` map (cumulative counts and
    duration histograms per key), one reading per sample."""

    def __init__(self, readings: list[list[tuple[dict, dict[float, int]]]]) -> None:
        super().__init__([])
        self.readings = readings

    def read_exits(self) -> list[tuple[tuple, int, bytes]]:
        kl = schema.layout_of("tw_exit_key")
        out = []
        for key, stays in self.readings.pop(0):
            hist = array("I", bytes(4 * const("TW_EXIT_BUCKETS")))
            for secs, n in stays.items():
                hist[schema.exit_bucket(int(secs * 1e9))] += n
            raw = kl.struct.pack(*(key.get(name, b"" if name == "pad" else 0)
                                   for name in kl.names))
            out.append((kl.struct.unpack(raw), sum(stays.values()), hist.tobytes()))
        return out


def test_exits_counted_in_the_kernel_become_weighted_rows():
    closed = {"daddr": socket.inet_aton("10.0.0.2").ljust(16, b"\0"), "pid": 812,
              "family": socket.AF_INET, "sport": 8080, "dport": 0,
              "outcome": const("TW_OUT_CLOSE"), "newstate": LAST_ACK,
              "who": const("TW_F_OWNER"), "comm": b"server"}
    reset = dict(closed, pid=900, comm=b"api", sport=41000, dport=5432,
                 daddr=socket.inet_aton("10.0.0.60").ljust(16, b"\0"),
                 outcome=const("TW_OUT_RESET"), newstate=CLOSE, who=const("TW_F_ACTOR"))
    source = CountedSource([
        [],  # at start
        [(closed, {0.002: 2, 0.05: 1})],
        [(closed, {0.002: 4, 0.05: 1}), (reset, {0.3: 1})],  # cumulative, as the kernel's
        [(closed, {0.002: 4, 0.05: 1}), (reset, {0.3: 1})],  # nothing new
    ])
    clock = Clock(0.0)
    col = collect.KernelCollector(source, {}, window_s=10.0, snapshot=lambda: [],
                                  holders_of=lambda inodes: {}, clock=clock, cw_map=True)
    for t in (0.0, 1.0, 2.0, 3.0):
        clock.t = at(t)
        s = col.sample()
    rows = {r.group: r for r in build_rows(s)}
    server, api = rows["server[812]"], rows["api[900]"]
    assert (server.closed, server.causes, server.close_wait) == (5, {"closed": 5}, 0)
    assert server.new_per_s == pytest.approx(5 / s.window_s, abs=0.001)
    # durations to within 1/16 of the stay (the bucket's middle)
    assert server.p50_s == pytest.approx(0.002, rel=1 / 16)
    assert server.p99_s == pytest.approx(0.05, rel=1 / 16)
    assert (api.closed, api.causes, api.p50_s) == (1, {"reset": 1}, pytest.approx(0.3, rel=1 / 16))
    by_remote = {r.group: r.closed for r in build_rows(s, by="remote")}
    # a server socket's peer is grouped by its address alone; a client's by address:port
    assert by_remote == {"10.0.0.2": 5, "10.0.0.60:5432": 1}


def test_snapshot_collector_ages_from_first_sight():
    tables = [
        [Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 1, rx_queue=0, inode=1)],
        [Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 1, rx_queue=0, inode=1),
         Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 2, rx_queue=6, inode=2)],
    ]
    clock = Clock(0.0)
    col = collect.SnapshotCollector(10.0, snapshot=lambda: tables.pop(0),
                                    holders_of=lambda inodes: {1: [Holder(5, "mine", 3)]},
                                    clock=clock)
    col.sample()
    clock.t += 4 * SEC
    s = col.sample()
    assert sorted((x.rport, x.age_s, x.cause, x.pid) for x in s.sockets) == [
        (1, 4.0, "eof_ignored", 5), (2, 0.0, "not_reading", None)]
    assert len(s.entered) == 1 and s.mode == "snapshot"


# -------------------------------------------------------------------------------- CLI


def test_help_and_json_needs_once():
    runner = CliRunner()
    res = runner.invoke(command.top, ["-h"])
    assert res.exit_code == 0
    for opt in ("--once", "--interval", "--format", "--by", "--sort", "--pid", "--port"):
        assert opt in res.output
    res = runner.invoke(command.top, ["--format", "json"])
    assert res.exit_code == 2 and "--once" in res.output


def test_once_json_in_forced_snapshot_mode(monkeypatch):
    monkeypatch.setattr(collect.procnet, "snapshot", lambda each: each.take([
        Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 1, rx_queue=3, inode=11)]))
    monkeypatch.setattr(collect.procnet, "holders_of", lambda inodes, fds=True: {})
    res = CliRunner().invoke(command.top, ["--snapshot", "--once", "--interval", "0.1",
                                           "--format", "json", "--by", "port"])
    assert res.exit_code == 0, res.output
    frame = orjson.loads(res.stdout.splitlines()[-1])
    assert frame["mode"] == "snapshot" and frame["by"] == "port"
    assert [(r["group"], r["close_wait"], r["cause"]) for r in frame["rows"]] == [
        (":8080", 1, "not_reading")]


@pytest.mark.parametrize("module", [model, view, hostinfo, collect])
def test_docstring_examples(module):
    assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# ------------------------------------------------------------------ holder lookups


def test_holder_scans_are_reused_in_proportion_to_their_cost_and_slow_ones_run_aside():
    from tcpwatch.top.collect import HolderCache

    answers = [{7: ["first"]}, {7: ["second"], 8: ["new"]}]
    calls = []

    def slow_scan(inodes):
        calls.append(set(inodes))
        time.sleep(0.15)
        return answers[len(calls) - 1]

    cache = HolderCache(slow_scan)
    assert cache.get({7}) == {7: ["first"]}  # the first scan is waited for
    assert cache.get({7, 8}) == {7: ["first"]} and len(calls) == 1  # reused: it cost 0.15 s
    cache._at -= 2.0  # as if 2 s had passed (reuse lasts 10 x 0.15 s)
    t0 = time.monotonic()
    assert cache.get({7, 8}) == {7: ["first"]}  # the last result while a new scan runs
    assert time.monotonic() - t0 < 0.1
    cache._worker.join(5)
    assert cache.get({7, 8}) == {7: ["second"], 8: ["new"]} and calls[1] == {7, 8}


def test_holder_inodes_are_worked_out_only_when_a_scan_is_due():
    from tcpwatch.top.collect import HolderCache

    asked = []

    def inodes():
        asked.append(1)
        return {7}

    cache = HolderCache(lambda wanted: {i: ["x"] for i in wanted})
    assert cache.get(inodes) == {7: ["x"]} and len(asked) == 1  # the first scan: due
    cache._cost, cache._at = 1.0, time.monotonic()  # as if it had cost 1 s just now
    assert cache.get(inodes) == {7: ["x"]} and len(asked) == 1  # reused: not worked out
    cache._at -= 20.0
    assert cache.get(lambda: set()) == {}  # due, nothing to look for


def test_a_scan_keeps_the_inode_set_made_for_it_and_copies_a_callers_own():
    """100,000 inodes are 4 MB a set: one worked out for the scan is handed over as is."""
    from tcpwatch.top.collect import HolderCache

    given = []
    cache = HolderCache(lambda wanted: given.append(wanted) or {i: ["x"] for i in wanted})
    made = {7, 8}
    assert cache.get(lambda: made) == {7: ["x"], 8: ["x"]} and given[-1] is made
    mine = {9}
    assert cache.get(mine) == {9: ["x"]} and given[-1] == mine and given[-1] is not mine


def test_cheap_holder_scans_happen_every_frame():
    from tcpwatch.top.collect import HolderCache

    calls = []
    cache = HolderCache(lambda inodes: calls.append(set(inodes)) or {i: ["x"] for i in inodes})
    assert cache.get({1}) == {1: ["x"]}
    assert cache.get({1, 2}) == {1: ["x"], 2: ["x"]}
    assert cache.get(set()) == {} and calls == [{1}, {1, 2}]

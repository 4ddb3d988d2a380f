"""Aggregator: CLOSE_WAIT tracking, leak detection and the records it builds (no kernel)."""

from __future__ import annotations

import datetime
import doctest

import pytest
import streams
from streams import (
    NETNS,
    SEC,
    T0,
    WALL_OFFSET_NS,
    Entry,
    FakeResolver,
    Found,
    Holder,
    Proc,
    at,
    eof,
    event,
    flags,
    life,
    merge,
    step,
)

from tcpwatch import aggregate, timefmt
from tcpwatch.aggregate import Aggregator

SK = 0xFFFF888105B5DC80
SK2 = 0xFFFF888105B5E500
SERVER = Proc(812, "server")
WORKER = Proc(813, "worker")
TUPLE = ("10.0.0.1", 8080, "10.0.0.2", 51234)  # the default socket of streams.life()

# Key order of each record, as in docs/ndjson.md.
HEAD = ["event", "ts", "sk", "family", "laddr", "lport", "raddr", "rport", "netns",
        "pid", "tid", "comm"]
STATE_KEYS = [*HEAD, "old", "new", "duration_s", "owner"]
CLOSE_WAIT_KEYS = [*HEAD, "duration_s", "since", "new", "outcome", "closer_pid", "closer_tid",
                   "closer_comm", "eof_read", "leaked", "preexisting"]
LEAK_KEYS = [*HEAD, "age_s", "since", "holders", "owner_pid", "owner_comm", "rx_queue", "inode",
             "eof_read", "preexisting"]
EXISTING_KEYS = [*HEAD, "state", "holders", "owner_pid", "owner_comm", "rx_queue", "inode",
                 "eof_read", "preexisting"]


def make(resolver: FakeResolver | None = None, **kw) -> Aggregator:
    return Aggregator(30.0, WALL_OFFSET_NS, resolver.resolve if resolver else None, **kw)


def feed_all(agg: Aggregator, events: list[dict]) -> list[dict]:
    return [rec for ev in events for rec in agg.feed(ev)]


def only(records: list[dict], kind: str) -> dict:
    found = [r for r in records if r["event"] == kind]
    assert len(found) == 1, records
    return found[0]


def enter_cw(t_s: float = 0.5, owner: Proc | None = SERVER, **sock) -> list[dict]:
    return life(sock.pop("sk", SK), [step(t_s, "ESTABLISHED", "CLOSE_WAIT", owner=owner)], **sock)


# ------------------------------------------------------------------- records


def test_state_record_fields():
    agg = make()
    ev = life(SK, [step(0.0, "SYN_RECV", "ESTABLISHED", owner=SERVER, via_listener=True,
                        prev_ns=1_234_567_891)])[0]
    assert agg.feed(ev) == [
        {
            "event": "state",
            "ts": "2026-11-21T05:13:00.000000Z",
            "sk": "0xffff888105b5dc80",
            "family": "ipv4",
            "laddr": "10.0.0.1",
            "lport": 8080,
            "raddr": "10.0.0.2",
            "rport": 51234,
            "netns": NETNS,
            "pid": 812,
            "tid": 812,
            "comm": "server",
            "old": "SYN_RECV",
            "new": "ESTABLISHED",
            "duration_s": 1.234568,
            "owner": "listener",
        }
    ]


def test_state_without_owner_or_prev_has_nulls():
    ev = event(ts_ns=T0, sk=SK, old=1, new=8, pid=4242, comm="softirq-victim", netns=0,
               flags=flags("PREV_UNKNOWN"))
    rec = make().feed(ev)[0]
    assert list(rec) == STATE_KEYS
    assert (rec["pid"], rec["tid"], rec["comm"], rec["owner"]) == (None, None, None, None)
    assert rec["duration_s"] is None and rec["netns"] is None


def test_ts_is_monotonic_plus_offset():
    rec = make().feed(event(ts_ns=at(1.2345678), sk=SK, old=1, new=2))[0]
    assert rec["ts"] == "2026-11-21T05:13:01.234567Z"


# --------------------------------------------------------------------- leaks


def test_leak_with_known_owner():
    agg = make()
    feed_all(agg, enter_cw(0.5))
    assert agg.tick(at(30.499)) == []
    (leak,) = agg.tick(at(30.5))
    assert leak == {
        "event": "leak",
        "ts": "2026-11-21T05:13:30.500000Z",
        "sk": "0xffff888105b5dc80",
        "family": "ipv4",
        "laddr": "10.0.0.1",
        "lport": 8080,
        "raddr": "10.0.0.2",
        "rport": 51234,
        "netns": NETNS,
        "pid": 812,
        "tid": 812,
        "comm": "server",
        "age_s": 30.0,
        "since": "2026-11-21T05:13:00.500000Z",
        "holders": [],
        "owner_pid": 812,
        "owner_comm": "server",
        "rx_queue": None,
        "inode": None,
        "eof_read": False,
        "preexisting": False,
    }
    assert agg.leaks == 1


def test_leak_with_unknown_owner_is_resolved():
    res = FakeResolver({TUPLE: (Found(rx_queue=6, inode=9204), [Holder(812, "server", 5)])})
    agg = make(res)
    feed_all(agg, enter_cw(0.0, owner=None))
    (leak,) = agg.tick(at(31))
    assert list(leak) == LEAK_KEYS
    assert (leak["pid"], leak["tid"], leak["comm"]) == (812, None, "server")
    assert leak["holders"] == [{"pid": 812, "comm": "server", "fd": 5}]
    assert (leak["owner_pid"], leak["owner_comm"]) == (None, None)
    # /proc's 6 is 5 unread bytes plus the FIN's sequence number.
    assert (leak["rx_queue"], leak["inode"], leak["age_s"]) == (5, 9204, 31.0)
    assert res.calls == [[(NETNS, 4, *TUPLE)]]


def test_leak_not_found_by_resolver_falls_back_to_kernel_owner():
    agg = make(FakeResolver())
    feed_all(agg, enter_cw(0.0))
    (leak,) = agg.tick(at(30))
    assert (leak["pid"], leak["comm"], leak["holders"]) == (812, "server", [])


def test_leak_emitted_once():
    agg = make(FakeResolver())
    feed_all(agg, enter_cw(0.0))
    assert len(agg.tick(at(30))) == 1
    assert agg.tick(at(31)) == [] and agg.tick(at(300)) == []
    assert agg.leaks == 1


def test_resolver_called_once_per_tick_with_the_batch():
    res = FakeResolver()
    agg = make(res)
    events = merge(*(enter_cw(t, sk=SK + i, rport=50000 + i) for i, t in enumerate([0, 1, 2, 10])))
    feed_all(agg, events)
    assert agg.tick(at(29.9)) == [] and res.calls == []  # nothing due: no /proc scan
    leaks = agg.tick(at(32.5))
    assert [r["rport"] for r in leaks] == [50000, 50001, 50002]
    assert res.calls == [[(NETNS, 4, "10.0.0.1", 8080, "10.0.0.2", 50000 + i) for i in range(3)]]
    assert [r["rport"] for r in agg.tick(at(40))] == [50003]
    assert len(res.calls) == 2


def test_failed_resolve_is_retried_next_tick():
    class Flaky(FakeResolver):
        def resolve(self, keys):
            if not self.calls:
                self.calls.append(keys)
                raise OSError("proc went away")
            return super().resolve(keys)

    res = Flaky()
    agg = make(res)
    feed_all(agg, enter_cw(0.0))
    with pytest.raises(OSError):
        agg.tick(at(30))
    assert len(agg.tick(at(31))) == 1


def test_socket_that_closed_in_time_never_leaks():
    agg = make(FakeResolver())
    feed_all(agg, life(SK, [
        step(0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(29, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER),
    ]))
    assert agg.tick(at(60)) == []
    assert agg.in_close_wait() == []


# ----------------------------------------------------------- leaving CLOSE_WAIT


def test_slow_close_reports_duration_and_closer():
    agg = make()
    records = feed_all(agg, life(SK, [
        step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(13.0, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="closed"),
        step(13.001, "LAST_ACK", "CLOSE"),
    ]))
    cw = only(records, "close_wait")
    assert cw == {
        "event": "close_wait",
        "ts": "2026-11-21T05:13:13.000000Z",
        "sk": "0xffff888105b5dc80",
        "family": "ipv4",
        "laddr": "10.0.0.1",
        "lport": 8080,
        "raddr": "10.0.0.2",
        "rport": 51234,
        "netns": NETNS,
        "pid": 812,
        "tid": 812,
        "comm": "server",
        "duration_s": 12.5,
        "since": "2026-11-21T05:13:00.500000Z",
        "new": "LAST_ACK",
        "outcome": "closed",
        "closer_pid": 812,
        "closer_tid": 812,
        "closer_comm": "server",
        "eof_read": False,
        "leaked": False,
        "preexisting": False,
    }
    assert [r["duration_s"] for r in records if r["event"] == "state"] == [None, 12.5, 0.001]
    assert records.index(cw) == 2  # right after the state record of the same transition
    assert (agg.transitions, agg.close_waits) == (3, 1)


def test_shutdown():
    recs = feed_all(make(), life(SK, [
        step(0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(2, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="shutdown"),
    ]))
    cw = only(recs, "close_wait")
    assert (cw["outcome"], cw["new"], cw["closer_pid"], cw["duration_s"]) == (
        "shutdown", "LAST_ACK", 812, 2.0)


def test_reset_has_no_closer():
    recs = feed_all(make(), life(SK, [
        step(0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(7.25, "CLOSE_WAIT", "CLOSE", owner=SERVER, outcome="reset"),
    ]))
    cw = only(recs, "close_wait")
    assert cw["outcome"] == "reset" and cw["new"] == "CLOSE"
    assert (cw["closer_pid"], cw["closer_tid"], cw["closer_comm"]) == (None, None, None)
    assert (cw["pid"], cw["duration_s"]) == (812, 7.25)


def test_exit():
    dying = Proc(812, "server", tid=815)
    recs = feed_all(make(), life(SK, [
        step(0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(5, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=dying, outcome="exit"),
    ]))
    cw = only(recs, "close_wait")
    assert (cw["outcome"], cw["closer_pid"], cw["closer_tid"]) == ("exit", 812, 815)


@pytest.mark.parametrize(
    ("new", "outcome", "expected"),
    [("LAST_ACK", 0, "closed"), ("CLOSE", 0, "unknown"), ("CLOSE", "error", "error"),
     ("LAST_ACK", 99, "unknown")],
)
def test_outcome_names(new, outcome, expected):
    recs = feed_all(make(), life(SK, [step(0, "ESTABLISHED", "CLOSE_WAIT"),
                                      step(1, "CLOSE_WAIT", new, outcome=outcome)]))
    assert only(recs, "close_wait")["outcome"] == expected


def test_socket_held_by_forked_child():
    """The parent closed its descriptor (no FIN: the child still holds one); the child
    is the one the leak names, and later the one that closes."""
    res = FakeResolver({TUPLE: (Found(6, 9204), [Holder(813, "worker", 7)])})
    agg = make(res)
    feed_all(agg, enter_cw(0.0, owner=SERVER))
    (leak,) = agg.tick(at(30))
    assert (leak["pid"], leak["comm"], leak["owner_pid"], leak["owner_comm"]) == (
        813, "worker", 812, "server")
    recs = agg.feed(life(SK, [step(45, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=WORKER,
                                   outcome="closed", cw_ns=45 * SEC)])[0])
    cw = only(recs, "close_wait")
    assert (cw["pid"], cw["comm"]) == (812, "server")  # the owner the kernel knows
    assert (cw["closer_pid"], cw["closer_comm"]) == (813, "worker")
    assert cw["leaked"] is True and cw["duration_s"] == 45.0


def test_close_wait_owner_falls_back_to_holder_then_closer():
    res = FakeResolver({TUPLE: (Found(0, 9204), [Holder(813, "worker", 7)])})
    agg = make(res)
    feed_all(agg, enter_cw(0.0, owner=None))
    agg.tick(at(30))
    cw = only(agg.feed(life(SK, [step(31, "CLOSE_WAIT", "CLOSE", actor=WORKER, cw_ns=31 * SEC,
                                      outcome="closed")])[0]), "close_wait")
    assert (cw["pid"], cw["tid"], cw["comm"]) == (813, None, "worker")

    agg = make()
    recs = feed_all(agg, life(SK2, [step(0, "ESTABLISHED", "CLOSE_WAIT"),
                                    step(3, "CLOSE_WAIT", "LAST_ACK", actor=WORKER)]))
    cw = only(recs, "close_wait")
    assert (cw["pid"], cw["tid"], cw["comm"]) == (813, 813, "worker")


def test_untracked_socket_leaving_close_wait_still_reported():
    """Its entry was lost (ring buffer full) but the kernel knows how long it waited."""
    ev = life(SK, [step(9, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, cw_ns=4 * SEC)])[0]
    cw = only(make().feed(ev), "close_wait")
    assert (cw["duration_s"], cw["since"], cw["preexisting"], cw["leaked"]) == (
        4.0, "2026-11-21T05:13:05.000000Z", False, False)


# ------------------------------------------------------------------ EOF, reuse


def test_eof_event_marks_socket():
    agg = make(FakeResolver())
    evs = life(SK, [
        step(0, "ESTABLISHED", "CLOSE_WAIT"),
        eof(0.25, owner=SERVER),
        step(40, "CLOSE_WAIT", "LAST_ACK", actor=SERVER),
    ])
    assert agg.feed(evs[0])[0]["event"] == "state"
    assert agg.feed(evs[1]) == []  # EOF has no record of its own
    (leak,) = agg.tick(at(30))
    assert leak["eof_read"] is True
    assert (leak["owner_pid"], leak["pid"]) == (812, 812)  # the reader is the owner
    cw = only(agg.feed(evs[2]), "close_wait")
    assert cw["eof_read"] is True and cw["leaked"] is True
    assert (agg.events, agg.transitions) == (3, 2)


def test_eof_flag_on_the_leaving_event_alone_counts():
    ev = event(ts_ns=at(2), sk=SK, old=8, new=9, cw_ns=2 * SEC, flags=flags("EOF_READ"))
    assert only(make().feed(ev), "close_wait")["eof_read"] is True


def test_reused_sk_does_not_inherit_tracking():
    agg = make(FakeResolver())
    feed_all(agg, enter_cw(0.0))
    # Its exit from CLOSE_WAIT was lost; the struct sock is freed and reused by a new connection.
    recs = feed_all(agg, life(SK, [step(5, "CLOSE", "SYN_SENT", owner=WORKER),
                                   step(5.1, "SYN_SENT", "ESTABLISHED", owner=WORKER)],
                              rport=443))
    assert [r["event"] for r in recs] == ["state", "state"]
    assert agg.in_close_wait() == [] and agg.tick(at(60)) == []
    # The new connection enters CLOSE_WAIT: a fresh age, not the old one's.
    feed_all(agg, life(SK, [step(20, "ESTABLISHED", "CLOSE_WAIT", owner=WORKER)], rport=443))
    assert agg.tick(at(49)) == []
    (leak,) = agg.tick(at(50))
    assert (leak["age_s"], leak["rport"], leak["pid"]) == (30.0, 443, 813)


def test_transition_to_close_stops_tracking():
    agg = make()
    feed_all(agg, enter_cw(0.0))
    feed_all(agg, life(SK, [step(1, "LAST_ACK", "CLOSE")]))  # we missed CLOSE_WAIT -> LAST_ACK
    assert agg.in_close_wait() == []


def test_ipv6():
    a6, b6 = "2001:db8:85a3:8d3:1319:8a2e:370:7348", "2001:db8::1"
    res = FakeResolver({(a6, 443, b6, 61000): (Found(0, 77), [Holder(2001, "nginx", 12)])})
    agg = make(res)
    recs = feed_all(agg, life(SK, [step(0, "ESTABLISHED", "CLOSE_WAIT")], family=6, laddr=a6,
                              lport=443, raddr=b6, rport=61000))
    assert (recs[0]["family"], recs[0]["laddr"], recs[0]["raddr"]) == ("ipv6", a6, b6)
    (leak,) = agg.tick(at(30))
    assert res.calls == [[(NETNS, 6, a6, 443, b6, 61000)]]
    assert (leak["family"], leak["pid"], leak["comm"]) == ("ipv6", 2001, "nginx")


# ----------------------------------------------------------------- pre-existing

ENTRY = Entry(NETNS, 4, *TUPLE, rx_queue=1, inode=9100)


def test_seed_existing_record():
    agg = make()
    (rec,) = agg.seed_existing([ENTRY, ENTRY._replace(state=1, rport=1)],
                               {9100: [Holder(812, "server", 9)]}, T0)
    assert rec == {
        "event": "existing",
        "ts": "2026-11-21T05:13:00.000000Z",
        "sk": None,
        "family": "ipv4",
        "laddr": "10.0.0.1",
        "lport": 8080,
        "raddr": "10.0.0.2",
        "rport": 51234,
        "netns": NETNS,
        "pid": 812,
        "tid": None,
        "comm": "server",
        "state": "CLOSE_WAIT",
        "holders": [{"pid": 812, "comm": "server", "fd": 9}],
        "owner_pid": None,
        "owner_comm": None,
        "rx_queue": 0,  # /proc's 1 is the unread FIN alone
        "inode": 9100,
        "eof_read": False,
        "preexisting": True,
    }
    (snap,) = agg.in_close_wait()
    assert (snap.sk, snap.since_ns, snap.preexisting) == (None, T0, True)


def test_iter_existing_consumes_the_snapshot_only_when_asked():
    def snapshot():
        return ([ENTRY, ENTRY._replace(state=1, rport=1, inode=9101),
                 ENTRY._replace(rport=2, inode=9102)],
                {9100: [Holder(812, "server", 9)], 9102: [Holder(813, "worker", 4)],
                 9101: [Holder(1, "init", 3)]})

    entries, holders = snapshot()
    kept = list(make().iter_existing(entries, holders, T0))
    assert entries == snapshot()[0] and holders == snapshot()[1]
    entries, holders = snapshot()
    taken = list(make().iter_existing(entries, holders, T0, consume=True))
    assert taken == kept and [r["pid"] for r in taken] == [812, 813]
    assert entries == [None, None, None]
    assert holders == {9101: [Holder(1, "init", 3)]}  # a socket in another state: not taken


def test_preexisting_leaks_then_closes_with_unknown_duration():
    res = FakeResolver()
    agg = make(res)
    agg.seed_existing([ENTRY], {9100: [Holder(812, "server", 9)]}, T0)
    (leak,) = agg.tick(at(30))  # age from first sight
    assert (leak["preexisting"], leak["since"], leak["sk"]) == (True, None, None)
    assert leak["age_s"] == 30.0
    assert (leak["rx_queue"], leak["inode"]) == (0, 9100)  # resolver lost it: last known values
    # The kernel reports it as it leaves CLOSE_WAIT: sk learnt, entry predates tracing.
    recs = feed_all(agg, life(SK, [step(41, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER,
                                        outcome="closed")]))
    state, cw = recs
    assert state["duration_s"] is None
    assert list(cw) == CLOSE_WAIT_KEYS
    assert (cw["duration_s"], cw["since"]) == (None, None)
    assert (cw["preexisting"], cw["leaked"]) == (True, True)
    assert cw["sk"] == "0xffff888105b5dc80"
    assert agg.in_close_wait() == [] and agg.tick(at(100)) == []


def test_preexisting_binds_to_sk_on_eof():
    agg = make(FakeResolver())
    agg.seed_existing([ENTRY._replace(netns=0)], {}, T0)  # netns unknown matches any
    feed_all(agg, life(SK, [eof(3, owner=SERVER)]))
    (snap,) = agg.in_close_wait()
    assert (snap.sk, snap.netns, snap.eof_read, snap.owner.pid) == (SK, NETNS, True, 812)
    (leak,) = agg.tick(at(30))
    assert (leak["sk"], leak["eof_read"], leak["owner_pid"]) == ("0xffff888105b5dc80", True, 812)


def test_preexisting_in_another_netns_is_not_bound():
    agg = make()
    agg.seed_existing([ENTRY._replace(netns=4026532177)], {}, T0)
    recs = feed_all(agg, life(SK, [step(2, "CLOSE_WAIT", "CLOSE", outcome="reset")]))
    cw = only(recs, "close_wait")
    assert (cw["preexisting"], cw["leaked"], cw["duration_s"]) == (True, False, None)
    (snap,) = agg.in_close_wait()  # the other namespace's socket is still waiting
    assert (snap.sk, snap.netns) == (None, 4026532177)


def test_seed_skips_sockets_the_kernel_already_reported():
    agg = make()
    feed_all(agg, enter_cw(0.0))
    assert agg.seed_existing([ENTRY], {}, at(0.2)) == []
    assert agg.seed_existing([ENTRY._replace(laddr="::ffff:10.0.0.1", family=6)], {}, T0) == []


def test_unaccepted_existing_socket_has_no_holder():
    (rec,) = make().seed_existing([ENTRY._replace(inode=0, rx_queue=518)], {0: ["bogus"]}, T0)
    assert (rec["pid"], rec["holders"], rec["inode"], rec["rx_queue"]) == (None, [], 0, 517)


# ------------------------------------------------------------- stacks, summary


def test_symbolize_only_when_stacks_were_taken():
    calls = []

    def symbolize(ev):
        calls.append(ev["kstack_id"])
        return {"kstack": ["tcp_set_state", "tcp_fin"], "ustack": []}

    agg = make(symbolize=symbolize)
    plain, stacked = life(SK, [step(0, "ESTABLISHED", "CLOSE_WAIT"),
                               step(1, "CLOSE_WAIT", "LAST_ACK", kstack_id=3)])
    assert "kstack" not in agg.feed(plain)[0]
    rec = agg.feed(stacked)[0]
    assert list(rec)[-2:] == ["kstack", "ustack"] and rec["kstack"][0] == "tcp_set_state"
    assert calls == [3]


def test_summary_and_lost():
    agg = make(FakeResolver(), start_mono_ns=T0)
    feed_all(agg, merge(enter_cw(1.0), life(SK2, [eof(2.0)])))
    agg.tick(at(31))
    assert agg.note_lost(0, at(31)) == []
    assert agg.note_lost(5, at(32)) == [
        {"event": "lost", "ts": "2026-11-21T05:13:32.000000Z", "count": 5, "total": 5,
         "dropped": 5, "missed": 0}
    ]
    assert agg.note_lost(7, at(33))[0]["count"] == 2
    # Skipped transitions (recursion misses) count as lost too, reported apart.
    assert agg.note_lost(7, at(33), missed=2)[0] == {
        "event": "lost", "ts": "2026-11-21T05:13:33.000000Z", "count": 2, "total": 9,
        "dropped": 7, "missed": 2}
    assert agg.summary(at(40.5)) == {
        "event": "summary",
        "ts": "2026-11-21T05:13:40.500000Z",
        "events": 2,
        "transitions": 1,
        "close_waits": 0,
        "leaks": 1,
        "lost": 9,
        "missed": 2,
        "elapsed_s": 40.5,
    }


def test_summary_elapsed_from_first_sight():
    agg = make()
    assert agg.summary(at(3))["elapsed_s"] == 0.0
    agg.feed(event(ts_ns=at(5), sk=SK, old=1, new=2))
    assert agg.summary(at(7.25))["elapsed_s"] == 2.25


def test_in_close_wait_snapshot():
    agg = make()
    feed_all(agg, enter_cw(4.0))
    (snap,) = agg.in_close_wait()
    assert snap == aggregate.CloseWaitSocket(
        SK, (4, *TUPLE), NETNS, at(4.0), aggregate.Owner(812, 812, "server", "socket"),
        False, False, False,
    )


def test_tick_cost_does_not_grow_with_tracked_sockets():
    """Sockets not yet due are never looked at: tick() stops at the first one."""
    agg = make(FakeResolver())
    feed_all(agg, merge(*(enter_cw(t / 1000, sk=SK + t, rport=t) for t in range(2000))))
    seen = []
    original = aggregate._Tracked.key

    def spy(self):
        seen.append(self.sk)
        return original(self)

    aggregate._Tracked.key = spy
    try:
        assert len(agg.tick(at(30.0005))) == 1
    finally:
        aggregate._Tracked.key = original
    assert set(seen) == {SK}


# ------------------------------------------------------------------ timefmt


@pytest.mark.parametrize("wall_ns", [0, 1_795_237_980_123_456_789, 1_795_237_999_999_999_999,
                                     951_782_400_000_001_000])
def test_rfc3339_matches_datetime(wall_ns):
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    expected = epoch + datetime.timedelta(microseconds=wall_ns // 1000)
    assert timefmt.rfc3339(wall_ns) == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_rfc3339_cache_follows_the_second():
    base = 1_795_237_980 * SEC
    assert timefmt.rfc3339(base + 999_999_000) == "2026-11-21T05:13:00.999999Z"
    assert timefmt.rfc3339(base + SEC) == "2026-11-21T05:13:01.000000Z"
    assert timefmt.rfc3339(base + 5) == "2026-11-21T05:13:00.000000Z"


@pytest.mark.parametrize("module", [aggregate, timefmt, streams])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0

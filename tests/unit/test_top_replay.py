"""`tcpwatch top --replay LOG... [--at TIME]`: the leaderboard as it was at a moment of a log.

A synthetic log with known content is replayed at several times T and the sockets in
CLOSE_WAIT, ages, counts, groupings and causes are checked against what the log says; the
recorded real-kernel logs of the analyze tests are cross-checked against `analyze --until`;
and the same kernel events are fed to the live KernelCollector and, through trace's
aggregator, to a log, to check that a replay draws what live top drew at that moment.

Regenerate the golden frames after an intended change with

    TCPWATCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_top_replay.py

and read `git diff tests/unit/golden/` before committing.
"""

from __future__ import annotations

import doctest
import gzip
import io
import sys
from pathlib import Path

import goldens
import orjson
import pytest
from click.testing import CliRunner
from streams import WALL_OFFSET_NS, Proc, at, life, merge, step

from tcpwatch import cli, schema
from tcpwatch.aggregate import Aggregator
from tcpwatch.analyze import inputs
from tcpwatch.analyze.timeparse import epoch, stamp
from tcpwatch.classify import Causes
from tcpwatch.top import collect, command, replay
from tcpwatch.top.model import build_rows, filter_sample, keep_only

HERE = Path(__file__).parent
LOGS = HERE / "fixtures" / "logs"
T0 = epoch("2026-11-21T05:13:00.000000Z")
HOOKS = {"state": "tracepoint:sock:inet_sock_set_state", "buffer": "ring",
         "owner": "sock:sock_recv_length", "outcome": "syscalls:sys_enter_close",
         "netns": None}


# ------------------------------------------------------------------- a log with known content


def ts(t: float) -> str:
    return stamp(T0 + t)


def sock(sk, lport, raddr, rport, pid, comm):
    return {"sk": sk, "family": "ipv4", "laddr": "10.0.0.1", "lport": lport, "raddr": raddr,
            "rport": rport, "netns": 4026531840, "pid": pid, "tid": pid, "comm": comm}


SERVER = dict(lport=8080, raddr="10.0.0.2", pid=812, comm="server")
A = sock("0xa", rport=51000, **SERVER)
B = sock("0xb", rport=51001, **SERVER)
E = sock("0xe", rport=51002, **SERVER)
C = sock("0xc", lport=53000, raddr="192.168.1.5", rport=5432, pid=900, comm="api")
OLD = sock(None, lport=8080, raddr="10.0.0.9", rport=40000, pid=812, comm="server")
QUEUED = sock(None, lport=443, raddr="10.0.0.8", rport=52000, pid=None, comm=None)
FW = sock("0xf", lport=54000, raddr="10.0.0.50", rport=8443, pid=900, comm="api")


def start(t=0.0, pid=100, **kw):
    rec = {"event": "start", "ts": ts(t), "v": 1, "version": "0.1.0", "hostname": "web-1",
           "kernel": "6.18.0-test", "pid": pid, "hooks": HOOKS, "leak_after_s": 30.0,
           "filters": {"pid": [], "port": [], "state": []}, "warnings": []}
    return rec | kw


def state(t, s, old, new, owner="socket"):
    return {"event": "state", "ts": ts(t), **s, "old": old, "new": new, "duration_s": 0.1,
            "owner": owner}


def close_wait(t, s, dur, outcome="closed", leaked=False, **kw):
    rec = {"event": "close_wait", "ts": ts(t), **s, "duration_s": dur,
           "since": ts(t - dur) if dur is not None else None, "new": "LAST_ACK",
           "outcome": outcome, "closer_pid": s["pid"], "closer_tid": s["pid"],
           "closer_comm": s["comm"], "eof_read": False, "leaked": leaked,
           "preexisting": dur is None, "cause": "closed"}
    return rec | kw


def existing(t, s, holder, rx_queue, inode):
    pid, comm = holder if holder else (None, None)
    return {"event": "existing", "ts": ts(t), **s, "sk": None, "pid": pid, "tid": None,
            "comm": comm, "state": "CLOSE_WAIT",
            "holders": [{"pid": pid, "comm": comm, "fd": 9}] if holder else [],
            "owner_pid": None, "owner_comm": None, "rx_queue": rx_queue, "inode": inode,
            "eof_read": False, "preexisting": True}


def leak(t, s, age, holder, rx_queue, inode, cause, since=True):
    pid, comm = holder if holder else (s["pid"], s["comm"])
    return {"event": "leak", "ts": ts(t), **s, "pid": pid, "tid": None, "comm": comm,
            "age_s": age, "since": ts(t - age) if since else None,
            "holders": [{"pid": pid, "comm": comm, "fd": 7}] if holder else [],
            "owner_pid": s["pid"], "owner_comm": s["comm"], "rx_queue": rx_queue,
            "inode": inode, "eof_read": False, "preexisting": not since, "cause": cause}


def scenario() -> list[dict]:
    """Who is in CLOSE_WAIT when (seconds after 05:13:00):

    OLD     pre-existing (holder server[812]) ......... 0 - 20 (closed)
    QUEUED  pre-existing, accept queue, 517 B unread .. 0 - end (leak at 30: not_accepted)
    A       server[812] -> held by worker[813] ........ 1 - 44 (leak at 31, exited)
    B       server[812] ............................... 2 - 3 (closed after 1.0 s)
    C       api[900] client of 192.168.1.5:5432 ....... 5 - 6.5 (reset)
    E       server[812] ............................... 40 - end
    FW      api[900] in FIN_WAIT2 towards 10.0.0.50:8443 from 45
    """
    return [
        start(),
        existing(0, OLD, (812, "server"), rx_queue=0, inode=9100),
        existing(0, QUEUED, None, rx_queue=517, inode=0),
        state(0.5, A, "SYN_RECV", "ESTABLISHED", owner="listener"),
        state(1, A, "ESTABLISHED", "CLOSE_WAIT"),
        state(2, B, "ESTABLISHED", "CLOSE_WAIT"),
        state(3, B, "CLOSE_WAIT", "LAST_ACK"),
        close_wait(3, B, 1.0),
        state(5, C, "ESTABLISHED", "CLOSE_WAIT"),
        state(6.5, C, "CLOSE_WAIT", "CLOSE"),
        close_wait(6.5, C, 1.5, outcome="reset", cause="reset"),
        state(20, {**OLD, "sk": "0xd"}, "CLOSE_WAIT", "LAST_ACK"),
        close_wait(20, {**OLD, "sk": "0xd"}, None),
        {"event": "lost", "ts": ts(25), "count": 3, "total": 3, "dropped": 3, "missed": 0},
        leak(30, QUEUED, 30.0, None, rx_queue=517, inode=0, cause="not_accepted", since=False),
        leak(31, A, 30.0, (813, "worker"), rx_queue=5, inode=9204, cause="held_elsewhere"),
        state(40, E, "ESTABLISHED", "CLOSE_WAIT"),
        state(44, A, "CLOSE_WAIT", "LAST_ACK"),
        close_wait(44, A, 43.0, outcome="exit", leaked=True, cause="exited"),
        state(44.9, FW, "ESTABLISHED", "FIN_WAIT1"),
        state(45, FW, "FIN_WAIT1", "FIN_WAIT2"),
        {"event": "summary", "ts": ts(50), "events": 14, "transitions": 13, "close_waits": 4,
         "leaks": 2, "lost": 3, "missed": 0, "elapsed_s": 50.0},
    ]


def ndjson(records: list) -> bytes:
    return b"".join(r if isinstance(r, bytes) else orjson.dumps(r) + b"\n" for r in records)


def replayed(data: bytes, at_s: float | None = None, **kw) -> replay.Replayer:
    """A Replayer fed `data` in batches of 3 lines (so pruning and batch edges are used)."""
    r = replay.Replayer(None if at_s is None else T0 + at_s, **kw)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for i in range(0, len(lines), 3):
        if r.feed_lines("mem", i + 1, lines[i:i + 3], False):
            break
    return r


def stuck(sample) -> list[tuple]:
    """The sockets in CLOSE_WAIT: (remote port, pid, comm, age, leaked, unread, cause)."""
    return sorted((s.rport, s.pid, s.comm, s.age_s, s.leaked, s.unread, s.cause)
                  for s in sample.sockets)


def check_golden(name: str, actual: str) -> None:
    goldens.check_golden(name, actual, __file__)


# ------------------------------------------------------------------ the sockets at several T


def test_at_2_5s_two_existing_and_two_new():
    s = replayed(ndjson(scenario()), 2.5).sample()
    assert s.mode == "replay" and s.ts == ts(2.5) and s.window_s == 2.5
    assert stuck(s) == [
        (40000, 812, "server", 2.5, False, 0, "unknown"),  # /proc rx_queue 0 cannot tell
        (51000, 812, "server", 1.5, False, None, "unknown"),  # no leak record yet
        (51001, 812, "server", 0.5, False, None, "unknown"),
        (52000, None, None, 2.5, False, 517, "not_accepted"),  # from its existing record
    ]
    assert s.host.states == {"CLOSE_WAIT": 4}
    assert s.host.events_per_s == 1.2  # 3 state records (0.5, 1, 2) in 2.5 s
    assert s.host.lost == 0 and s.host.hostname == "web-1"
    rows = build_rows(s, "process", "count")
    assert [(r.group, r.close_wait, r.oldest_age_s, r.new_per_s, r.closed) for r in rows] == [
        ("server[812]", 3, 2.5, 0.8, 0), ("(unknown owner)", 1, 2.5, 0.0, 0)]


def test_a_socket_is_gone_at_the_moment_it_left_close_wait():
    log = ndjson(scenario())
    before = replayed(log, 2.999999).sample()
    assert 51001 in [x.rport for x in before.sockets]
    s = replayed(log, 3.0).sample()
    assert 51001 not in [x.rport for x in s.sockets]
    assert [(e.rport, e.duration_s, e.cause, e.pid) for e in s.ended] == [
        (51001, 1.0, "closed", 812)]
    # the pre-existing socket, matched by its addresses when its sk shows up
    assert 40000 in [x.rport for x in replayed(log, 19.9).sample().sockets]
    s = replayed(log, 20.0).sample()
    assert 40000 not in [x.rport for x in s.sockets]
    assert [(e.rport, e.duration_s) for e in s.ended] == [(40000, None)]


def test_a_client_reset_is_grouped_by_its_server_endpoint():
    s = replayed(ndjson(scenario()), 6.5).sample()
    assert 5432 not in [x.rport for x in s.sockets]
    rows = {r.group: r for r in build_rows(s, "remote", "count")}
    r = rows["192.168.1.5:5432"]
    assert (r.close_wait, r.closed, r.cause, r.p50_s, r.new_per_s) == (0, 1, "reset", 1.5,
                                                                        round(1 / 6.5, 3))
    # server sockets: by peer address alone (A stuck, B closed at 3)
    assert (rows["10.0.0.2"].close_wait, rows["10.0.0.2"].closed) == (1, 1)


def test_at_35s_leak_records_name_holder_cause_and_unread():
    s = replayed(ndjson(scenario()), 35.0).sample()
    assert stuck(s) == [
        (51000, 813, "worker", 34.0, True, 5, "held_elsewhere"),
        (52000, None, None, 35.0, True, 517, "not_accepted"),
    ]
    assert s.host.lost == 3 and s.host.events_per_s == 0.0 and s.window_s == 10.0
    assert (s.entered, s.ended) == ([], [])
    rows = build_rows(s, "process", "age")
    assert [(r.group, r.leaks, r.unread_bytes, r.cause) for r in rows] == [
        ("(unknown owner)", 1, 517, "not_accepted"), ("worker[813]", 1, 5, "held_elsewhere")]


def test_at_the_end_by_default():
    r = replayed(ndjson(scenario()))
    s = r.sample()
    assert s.ts == ts(50)
    assert stuck(s) == [
        (51002, 812, "server", 10.0, False, None, "unknown"),
        (52000, None, None, 50.0, True, 517, "not_accepted"),
    ]
    # A left in the window (40, 50]: charged to the worker that held it, cause from outcome.
    assert [(e.rport, e.pid, e.comm, e.duration_s, e.cause) for e in s.ended] == [
        (51000, 813, "worker", 43.0, "exited")]
    assert [(e.rport, e.pid) for e in s.entered] == [(51002, 812)]
    assert s.host.events_per_s == 0.4  # 40, 44, 44.9, 45 in 10 s
    assert [(p.remote, p.count, p.oldest_s) for p in s.host.fin_wait2] == [
        ("10.0.0.50:8443", 1, 5.0)]
    assert s.host.warnings == [] and r.untracked == 0 and r.records == len(scenario())


def test_groupings_sorts_and_filters_work_as_live():
    s = replayed(ndjson(scenario()), 35.0).sample()
    assert [r.group for r in build_rows(s, "port", "count")] == [":443", ":8080"]
    assert [r.group for r in build_rows(s, "remote", "unread")] == ["10.0.0.8", "10.0.0.2"]
    assert [r.group for r in build_rows(s, "cgroup")] == ["?"]  # not in the log
    only = filter_sample(s, keep_only(pids=[813]))
    assert [(x.rport, x.pid) for x in only.sockets] == [(51000, 813)]
    only = filter_sample(s, keep_only(ports=[443]))
    assert [x.rport for x in only.sockets] == [52000]


def test_leak_after_and_slow_close_options():
    log = ndjson(scenario())
    # default: the log's own threshold (30 s); E is 10 s old at the end
    assert [x.leaked for x in replayed(log).sample().sockets if x.rport == 51002] == [False]
    s = replayed(log, leak_after_s=10.0).sample()
    assert [x.leaked for x in s.sockets if x.rport == 51002] == [True]
    # B closed 1.0 s after the FIN: "closed" with the default 1 s, slow with --slow-close 0.5
    assert [e.cause for e in replayed(log, 3.0).sample().ended] == ["closed"]
    assert [e.cause for e in replayed(log, 3.0, slow_close_s=0.5).sample().ended] == [
        "slow_close"]


def test_window_option_sets_rates_and_exits_counted():
    log = ndjson(scenario())
    s = replayed(log, 7.0, window_s=1.9).sample()
    assert s.window_s == 1.9 and [e.rport for e in s.ended] == [5432] and s.entered == []
    # as live top, the window includes its first instant: C entered at exactly T - 2 s
    s = replayed(log, 7.0, window_s=2.0).sample()
    assert [e.rport for e in s.entered] == [5432]
    s = replayed(log, 7.0, window_s=5.0).sample()
    assert sorted(e.rport for e in s.ended) == [5432, 51001]
    assert sorted(e.rport for e in s.entered) == [5432, 51001]


def test_a_second_run_keeps_sockets_it_finds_again_and_drops_the_others():
    recs = scenario() + [
        start(60, pid=101),
        existing(60, QUEUED, None, rx_queue=600, inode=0),
        state(61, sock("0x9", 8080, "10.0.0.3", 41000, 812, "server"), "ESTABLISHED",
              "CLOSE_WAIT"),
        {"event": "summary", "ts": ts(63)},
    ]
    log = ndjson(recs)
    between = replayed(log, 55.0).sample()  # tcpwatch stopped at 50, started again at 60
    assert [x.rport for x in between.sockets] == [51002, 52000]
    assert between.host.warnings[0].startswith("tcpwatch was not running at T: its run ended "
                                                "at 2026-11-21T05:13:50")
    r = replayed(log, 62.0)
    s = r.sample()
    # QUEUED seen again (true age kept, new unread count), E not: it ended unseen
    assert stuck(s) == [(41000, 812, "server", 1.0, False, None, "unknown"),
                        (52000, None, None, 62.0, True, 600, "not_accepted")]
    assert r.untracked == 1 and r.runs == 2 and s.window_s == 2.0 and s.host.warnings == []


def test_logs_of_two_hosts_are_both_read_up_to_t(tmp_path):
    """Each file is read up to T (not only the first): another host's log covers T too."""
    one, two = tmp_path / "web-1.ndjson", tmp_path / "web-2.ndjson"
    one.write_bytes(ndjson(scenario() + [{"event": "lost", "ts": ts(100), "count": 1}]))
    other = [start(0.5, hostname="web-2", pid=7),
             state(2, {**A, "pid": 4000, "comm": "db"}, "ESTABLISHED", "CLOSE_WAIT"),
             {"event": "summary", "ts": ts(200)}]  # well past T + 60 s: read to the end
    two.write_bytes(ndjson(other))
    r = replay.Replayer(T0 + 2.5)
    r.run([inputs.Source(str(p), str(p)) for p in (one, two)])
    s = r.sample()
    assert s.host.hostname == "web-1,web-2" and r.files == [str(one), str(two)]
    # the same sk on two hosts is two sockets
    assert sorted((x.rport, x.pid) for x in s.sockets) == [
        (40000, 812), (51000, 812), (51000, 4000), (51001, 812), (52000, None)]


def test_lost_exits_do_not_leave_ghosts():
    """A socket seen closing without its close_wait record (lost events) is dropped."""
    recs = scenario()
    recs.insert(5, state(1.5, A, "LAST_ACK", "CLOSE"))  # A's exit from CLOSE_WAIT was lost
    r = replayed(ndjson(recs), 2.0)
    assert 51000 not in [x.rport for x in r.sample().sockets] and r.untracked == 1


def test_memory_is_the_sockets_in_close_wait_and_the_window():
    recs = [start()]
    for i in range(3000):  # one connection every 0.1 s, each 0.05 s in CLOSE_WAIT
        s = sock(f"{0x1000 + i:#x}", 8080, "10.0.0.2", 32768 + i, 812, "server")
        recs += [state(i / 10, s, "ESTABLISHED", "CLOSE_WAIT"),
                 state(i / 10 + 0.05, s, "CLOSE_WAIT", "LAST_ACK"),
                 close_wait(i / 10 + 0.05, s, 0.05)]
    r = replayed(ndjson(recs), window_s=10.0)
    assert r.open == {} and r.by_tuple == {}
    assert len(r.entered) <= 120 and len(r.ended) <= 120 and len(r._per_ms) <= 240
    s = r.sample()
    # [T - 10 s, T] with T = 299.95: entries at 290.0 .. 299.9, exits at 289.95 .. 299.95
    assert len(s.entered) == 100 and len(s.ended) == 101 and s.host.events_per_s == 20.1
    (row,) = build_rows(s)
    assert (row.new_per_s, row.closed, row.p99_s, row.cause) == (10.0, 101, 0.05, "closed")


# ---------------------------------------------------------- the same moment, live and replayed


class _Clock:
    def __init__(self) -> None:
        self.t = at(0.0)

    def __call__(self) -> int:
        return self.t


class _TimedSource:
    """The kernel's events up to the clock's time, each handed out once."""

    def __init__(self, events: list[dict], clock: _Clock) -> None:
        self.raw = [(ev["ts_ns"], schema.encode(ev)) for ev in events]
        self.clock = clock

    def poll(self, timeout_s: float) -> list[bytes]:
        out = [raw for t, raw in self.raw if t <= self.clock.t]
        self.raw = [(t, raw) for t, raw in self.raw if t > self.clock.t]
        return out

    def counters(self) -> dict[str, int]:
        return {"lost": 0}

    def close(self) -> None:
        pass


def _events() -> list[dict]:
    server, worker, api = Proc(812, "server"), Proc(813, "worker"), Proc(900, "api")
    sk = 0xFFFF888105B50000
    return merge(
        life(sk, [step(1.0, "ESTABLISHED", "CLOSE_WAIT", owner=server)], rport=51000),
        life(sk + 64, [step(2.0, "ESTABLISHED", "CLOSE_WAIT", owner=server),
                       step(2.125, "CLOSE_WAIT", "LAST_ACK", owner=server, actor=server,
                            outcome="closed")], rport=51001),
        life(sk + 128, [step(3.0, "ESTABLISHED", "CLOSE_WAIT", owner=worker),
                        step(5.5, "CLOSE_WAIT", "LAST_ACK", owner=worker, actor=worker,
                             outcome="closed")], rport=51002),
        life(sk + 192, [step(6.0, "ESTABLISHED", "CLOSE_WAIT", owner=api),
                        step(9.0, "CLOSE_WAIT", "CLOSE", owner=api, outcome="reset")],
             lport=53000, raddr="192.168.1.5", rport=5432),
        life(sk + 256, [step(12.0, "ESTABLISHED", "CLOSE_WAIT", owner=api)],
             lport=53001, raddr="192.168.1.5", rport=5432),
        life(sk + 320, [step(14.0, "ESTABLISHED", "CLOSE_WAIT", via_listener=True,
                             owner=server)], rport=51003),
    )


def _log_of(events: list[dict], end_s: float) -> bytes:
    """What `tcpwatch trace -o` writes for these events: records of trace's aggregator,
    ticked every 0.5 s for leaks, after a start record at 0."""
    agg = Aggregator(30.0, WALL_OFFSET_NS, resolve=None, causes=Causes.from_hooks({}),
                     start_mono_ns=at(0.0))
    recs: list = [start(hooks={"state": "tracepoint:sock:inet_sock_set_state"})]
    tick = 0.5
    for ev in events:
        while at(tick) <= ev["ts_ns"]:
            recs += agg.tick(at(tick))
            tick += 0.5
        recs += agg.feed(ev)
    recs += agg.tick(at(end_s))
    recs.append({"event": "summary", "ts": ts(end_s)})
    return ndjson(recs)


@pytest.mark.parametrize("when", [2.125, 5.5, 9.0, 13.25, 16.0])
def test_replay_draws_what_live_top_drew_at_that_moment(when):
    events = _events()
    clock = _Clock()
    live = collect.KernelCollector(_TimedSource(events, clock), {}, window_s=10.0,
                                   snapshot=lambda: [], holders_of=lambda inodes: {},
                                   clock=clock)
    live.seed()
    live.sample()  # top starts at 0, with the trace that wrote the log
    for t in (0.5 * k for k in range(1, int(when * 2) + 1)):
        clock.t = at(t)
        live.pump(0)
        live.sample()
    clock.t = at(when)
    live.pump(0)
    got_live = live.sample()
    got_replay = replayed(_log_of(events, 20.0), when, leak_after_s=30.0).sample()
    assert got_replay.window_s == got_live.window_s
    assert stuck(got_replay) == stuck(got_live)
    for by in ("process", "remote", "port"):
        for sort in ("count", "age", "rate", "p99"):
            assert build_rows(got_replay, by, sort) == build_rows(got_live, by, sort), (by,
                                                                                       sort)


# ------------------------------------------------------------------- recorded real-kernel logs


def _analyze_open(path: str, until: str | None) -> list[tuple]:
    from tcpwatch.analyze.engine import Analyzer, Options

    opts = Options(until=epoch(until) if until else None)
    res = Analyzer(opts).run([inputs.Source(path, path)])
    return sorted((o["lport"], o["rport"], o["pid"], round(o["age_s"], 3)) for o in res.open)


@pytest.mark.parametrize("at_ts", [None, "2026-11-21T05:57:14.800000Z",
                                   "2026-11-21T05:57:15.900000Z",
                                   "2026-11-21T05:57:16.369167Z"])
def test_recorded_log_agrees_with_analyze_until(at_ts):
    """Sockets open at T per `analyze --until T` are those replayed at T, with their ages."""
    path = str(LOGS / "recorded.ndjson")
    r = replay.Replayer(epoch(at_ts) if at_ts else None)
    r.run([inputs.Source(path, path)])
    s = r.sample()
    got = sorted((x.lport, x.rport, x.pid, x.age_s) for x in s.sockets)
    assert got == _analyze_open(path, at_ts)
    assert r.corrupt == 0 and s.host.lost == 0


def test_recorded_log_at_16s_facts():
    """record.py: 2 slow sockets still open at 05:57:16 (closed at 16.369), 2 never closed,
    1 client socket; the leak records (05:57:15.86) name unread bytes and causes."""
    path = str(LOGS / "recorded.ndjson")
    r = replay.Replayer(epoch("2026-11-21T05:57:16.000000Z"))
    r.run([inputs.Source(path, path)])
    s = r.sample()
    assert sorted((x.lport, x.rport, x.unread, x.cause, x.leaked) for x in s.sockets) == [
        (7123, 51044, 5, "not_reading", True), (7123, 51058, 5, "not_reading", True),
        (7123, 51064, 0, "not_reading", True), (7123, 51070, 0, "not_reading", True),
        (35434, 7124, None, "unknown", True)]
    assert r.leak_after == 1.0  # the log's own threshold
    (row,) = build_rows(s)
    assert (row.group, row.close_wait, row.leaks, row.unread_bytes, row.cause) == (
        "python[6744]", 5, 5, 10, "not_reading")


def test_rotated_gz_log_replays_like_one_file(tmp_path):
    recs = scenario()
    first, second = ndjson(recs[:12]), ndjson([start(part=2)] + recs[12:])
    (tmp_path / "t.ndjson.20261121T051320.000Z.gz").write_bytes(gzip.compress(first))
    (tmp_path / "t.ndjson").write_bytes(second)
    runner = CliRunner()
    for when in ("+35s", "2026-11-21T05:13:20Z", None):
        extra = ["--at", when] if when else []
        one = tmp_path / "one.ndjson"
        one.write_bytes(ndjson(recs))
        a = runner.invoke(command.top, ["--replay", str(one), "--format", "json", *extra])
        b = runner.invoke(command.top, ["--replay", str(tmp_path / "t.ndjson*"), "--format",
                                        "json", *extra])
        assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
        fa, fb = orjson.loads(a.stdout), orjson.loads(b.stdout)
        assert fb["replay"].pop("files")[0].endswith(".gz")
        fa["replay"].pop("files")
        # the second file's header (the same run's start record, part 2) is one more record
        assert fb["replay"].pop("records") == fa["replay"].pop("records") + 1
        assert fa == fb
    # the recorded rotated log (real gz files, part 2..n headers) reads as one run
    res = runner.invoke(command.top, ["--replay", str(LOGS / "recorded-rotated.ndjson*"),
                                      "--format", "json"])
    frame = orjson.loads(res.stdout)
    assert frame["replay"]["runs"] == 1 and len(frame["replay"]["files"]) == 5
    assert frame["states"] == {"CLOSE_WAIT": 3} and frame["replay"]["untracked"] == 0


def test_a_later_part_alone_says_what_is_missing(tmp_path):
    """Given only the newest file of a rotated log, the log starts at its first record (not
    at the run's start, which its header repeats), and the frame says sockets are missing."""
    recs = scenario()
    newest = tmp_path / "t.ndjson"
    newest.write_bytes(ndjson([start(part=3)] + recs[12:]))  # from 20 s on
    r = replay.Replayer(T0 + 19.0)
    with pytest.raises(replay.ReplayError, match="is before the log starts "
                                                 r"\(2026-11-21T05:13:20.000000Z\)"):
        r.run([inputs.Source(str(newest), str(newest))])
    r = replay.Replayer(T0 + 35.0)
    r.run([inputs.Source(str(newest), str(newest))])
    s = r.sample()
    assert r.first_ts == ts(20) and r.partial == 3 and s.window_s == 10.0
    assert s.host.warnings[0] == (
        "the log starts with part 3 of a tcpwatch run (the earlier files were not given): "
        "sockets that entered CLOSE_WAIT before 2026-11-21T05:13:20.000000Z are missing")
    # what the part does show: A through its leak record, QUEUED through its own
    assert sorted((x.rport, x.pid, x.cause) for x in s.sockets) == [
        (51000, 813, "held_elsewhere"), (52000, None, "not_accepted")]
    assert sorted(x.age_s for x in s.sockets) == [34.0, 35.0]  # from the leak records


def test_stdin_works_with_a_time_or_the_end():
    log = ndjson(scenario())
    res = CliRunner().invoke(command.top, ["--replay", "-", "--at", "+35s", "--format", "json"],
                             input=log)
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout)["states"] == {"CLOSE_WAIT": 2}


# -------------------------------------------------------------------------- the CLI frames


def run_top(args: list[str], input: bytes | None = None):
    return CliRunner().invoke(command.top, args, input=input)


@pytest.fixture
def log_path(tmp_path) -> Path:
    path = tmp_path / "scenario.ndjson"
    path.write_bytes(ndjson(scenario()))
    return path


def test_text_frame_golden(log_path):
    res = run_top(["--replay", str(log_path), "--at", "2026-11-21T05:13:35Z"])
    assert res.exit_code == 0 and res.stderr == ""
    check_golden("top.replay.txt", res.stdout)
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["tcpwatch", "top", "web-1", "replay", "by", "process", "sort",
                                "count", "10s", "05:13:35Z"]
    assert lines[1].startswith("REPLAY of a log at 2026-11-21T05:13:35.000000Z")
    assert "ports - ephemeral   events 0/s   lost 3" in res.stdout
    assert max(len(line) for line in lines) <= 100


def test_text_frame_at_the_end_by_remote_golden(log_path):
    res = run_top(["--replay", str(log_path), "--by", "remote", "--sort", "age"])
    assert res.exit_code == 0
    check_golden("top.replay.end.txt", res.stdout)
    assert "10.0.0.50:8443" in res.stdout.split("FIN_WAIT2 by remote")[1]


def test_json_frame_golden(log_path):
    res = run_top(["--replay", str(log_path), "--at", "+35s", "--format", "json", "--by",
                   "port"])
    assert res.exit_code == 0
    frame = orjson.loads(res.stdout)
    frame["replay"]["files"] = ["scenario.ndjson"]  # tmp_path differs per run
    check_golden("top.replay.json", orjson.dumps(frame, option=orjson.OPT_INDENT_2).decode()
                 + "\n")
    assert frame["mode"] == "replay" and frame["ts"] == ts(35)
    assert frame["replay"]["at"] == ts(35) and frame["interval_s"] is None
    assert frame["ephemeral"]["used"] is None and frame["port_risk"] is None
    assert [(r["group"], r["close_wait"], r["leaks"], r["cause"]) for r in frame["rows"]] == [
        (":443", 1, 1, "not_accepted"), (":8080", 1, 1, "held_elsewhere")]


def test_pid_and_port_filters_on_the_command_line(log_path):
    res = run_top(["--replay", str(log_path), "--at", "+35s", "--format", "json",
                   "--pid", "813"])
    assert [r["group"] for r in orjson.loads(res.stdout)["rows"]] == ["worker[813]"]
    res = run_top(["--replay", str(log_path), "--at", "+2.5s", "--format", "json",
                   "--port", "443", "--leak-after", "2"])
    rows = orjson.loads(res.stdout)["rows"]
    assert [(r["group"], r["leaks"]) for r in rows] == [("(unknown owner)", 1)]


@pytest.mark.parametrize(("at_arg", "seconds"), [("10s", 40.0), ("-10s", 40.0), ("+12s", 12.0),
                                                 ("2026-11-21T05:13:12Z", 12.0),
                                                 ("2026-11-21 05:13:12", 12.0)])
def test_at_forms(log_path, at_arg, seconds):
    res = run_top(["--replay", str(log_path), "--at", at_arg, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout)["replay"]["at"] == ts(seconds)


def test_corrupt_lines_are_counted_named_and_skipped(tmp_path, log_path):
    lines = ndjson(scenario()).split(b"\n")
    lines[3:3] = [b"garbage", b"[1, 2]", b'{"event":"state","ts":"2026-11-21T05:13:01Z"}',
                  b'{"event":"state","ts":"yesterday"}']
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"\n".join(lines))
    res = run_top(["--replay", str(bad), "--at", "+35s", "--format", "json"])
    assert res.exit_code == 0
    clean = run_top(["--replay", str(log_path), "--at", "+35s", "--format", "json"])
    got, want = orjson.loads(res.stdout), orjson.loads(clean.stdout)
    assert got["rows"] == want["rows"] and got["replay"]["corrupt"] == 4
    assert [line.split(" (")[0] for line in res.stderr.splitlines()[:3]] == [
        "tcpwatch: warning: 4 corrupt lines skipped; the first:",
        f"  {bad}:4: not JSON",
        f"  {bad}:5: not a tcpwatch record",
    ]
    assert res.stderr.splitlines()[3:] == [
        f"  {bad}:6: not a tcpwatch record (ValueError: 'ts' is not an RFC 3339 UTC time: "
        "'2026-11-21T05:13:01Z')",
        f"  {bad}:7: not a tcpwatch record (ValueError: 'ts' is not an RFC 3339 UTC time: "
        "'yesterday')",
    ]


def test_damaged_gz_keeps_what_it_could_read(tmp_path):
    path = tmp_path / "d.ndjson.gz"
    recs = [start()]
    for i in range(5000):  # more than one 1 MiB read, so some lines come out
        s = sock(f"{0x1000 + i:#x}", 8080, "10.0.0.2", 32768 + i, 812, "server")
        recs += [state(i / 10, s, "ESTABLISHED", "CLOSE_WAIT")]
    path.write_bytes(gzip.compress(ndjson(recs))[:-30])
    res = run_top(["--replay", str(path), "--format", "json"])
    assert res.exit_code == 0
    assert "compressed data cut short or damaged" in res.stderr
    assert 0 < orjson.loads(res.stdout)["states"]["CLOSE_WAIT"] < 5000
    path.write_bytes(gzip.compress(ndjson(scenario()))[:-30])  # nothing comes out at all
    res = run_top(["--replay", str(path)])
    assert res.exit_code == 1 and res.stdout == "" and res.stderr.count("\n") == 1
    assert "nothing usable read from" in res.stderr and "compressed data cut" in res.stderr


# ------------------------------------------------------------------------------- errors


def main_run(args: list[str], capsys, stdin: bytes | None = None, monkeypatch=None):
    """(exit status, stdout, stderr) of `tcpwatch top ARGS` through cli.main."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exc:
        cli.main(["top", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize(("args", "message"), [
    (["--at", "2026-11-21T05:12:59Z"],
     "--at 2026-11-21T05:12:59Z (2026-11-21T05:12:59.000000Z) is before the log starts "
     "(2026-11-21T05:13:00.000000Z)"),
    (["--at", "2026-11-21T05:13:50.000001Z"],
     "--at 2026-11-21T05:13:50.000001Z is after the end of the log "
     "(2026-11-21T05:13:50.000000Z)"),
    (["--at", "51s"], "--at 51s (2026-11-21T05:12:59.000000Z) is before the log starts "
                      "(2026-11-21T05:13:00.000000Z)"),
    (["--at", "+1h"], "--at +1h (2026-11-21T06:13:00.000000Z) is after the end of the log "
                      "(2026-11-21T05:13:50.000000Z)"),
])
def test_t_outside_the_log_is_one_line_and_exit_1(log_path, capsys, args, message):
    code, out, err = main_run(["--replay", str(log_path), *args], capsys)
    assert (code, out, err) == (1, "", f"tcpwatch: error: {message}\n")


def test_missing_file_schema_version_and_nothing_usable(tmp_path, log_path, capsys):
    code, out, err = main_run(["--replay", str(tmp_path / "nope.ndjson")], capsys)
    assert (code, out) == (1, "")
    assert err == f"tcpwatch: error: cannot read {tmp_path}/nope.ndjson: No such file or " \
                  "directory\n"
    code, out, err = main_run(["--replay", str(tmp_path / "*.gz")], capsys)
    assert (code, err) == (1, f"tcpwatch: error: no file matches {tmp_path}/*.gz\n")
    # one missing file among good ones: a warning, as for analyze
    code, out, err = main_run(["--replay", str(log_path), str(tmp_path / "nope.ndjson")],
                              capsys)
    assert code == 0 and "tcpwatch: warning: cannot read" in err and "CW 2" in out
    v2 = tmp_path / "v2.ndjson"
    v2.write_bytes(ndjson(scenario()).replace(b'"v":1', b'"v":2'))
    code, out, err = main_run(["--replay", str(v2)], capsys)
    assert (code, out) == (1, "")
    assert err == (f"tcpwatch: error: {v2}:1: written with NDJSON schema version 2; this "
                   "tcpwatch reads version 1: replay it with a matching tcpwatch\n")
    junk = tmp_path / "junk.ndjson"
    junk.write_bytes(b"\x00\x01 not a log\n")
    code, out, err = main_run(["--replay", str(junk)], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"tcpwatch: error: nothing usable read from {junk}: 1 corrupt line, "
                          f"the first: {junk}:1: not JSON")


def test_stdin_cannot_count_back_from_its_end(capsys, monkeypatch):
    code, out, err = main_run(["--replay", "-", "--at", "5m"], capsys, ndjson(scenario()),
                              monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "stdin cannot tell" in err


@pytest.mark.parametrize(("args", "needle"), [
    (["--replay", "LOG", "--snapshot"], "--replay reads a log, --snapshot reads /proc"),
    (["--replay", "LOG", "--once", "--interval", "5"], "--interval does not go with --replay"),
    (["--replay"], "--replay needs at least one LOG"),
    (["LOG"], "': LOG arguments go with --replay"),
    (["--at", "5m"], "--at needs --replay"),
    (["--replay", "LOG", "--at", "yesterday"], "'yesterday' is not a time"),
])
def test_usage_errors_are_one_line_and_exit_2(log_path, capsys, args, needle):
    args = [str(log_path) if a == "LOG" else a for a in args]
    code, out, err = main_run(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err, err
    assert err.startswith("tcpwatch: error: ")


def test_once_is_implied_and_accepted(log_path):
    res = run_top(["--replay", str(log_path), "--once", "--format", "json"])
    assert res.exit_code == 0 and orjson.loads(res.stdout)["mode"] == "replay"


def test_help_documents_replay():
    res = run_top(["-h"])
    assert res.exit_code == 0
    assert "--replay" in res.stdout and "--at" in res.stdout and "[LOG...]" in res.stdout


def test_docstring_examples():
    assert doctest.testmod(replay, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0

"""Sinks: NDJSON and table output of a fixed synthetic trace, compared with golden files.

To regenerate the golden files after an intended change of output, run

    TCPWATCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_sinks.py

then read `git diff tests/unit/golden/` line by line before committing it.
"""

from __future__ import annotations

import doctest
import io
import re
import stat
from pathlib import Path

import click
import goldens
import orjson
import pytest
from goldens import GOLDEN
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
    life,
    merge,
    step,
)

import tcpwatch.sinks
from tcpwatch.aggregate import Aggregator
from tcpwatch.classify import Causes
from tcpwatch.sinks import ndjson, table
from tcpwatch.sinks.ndjson import NdjsonSink, open_ndjson
from tcpwatch.sinks.table import TableSink
from tcpwatch.timefmt import rfc3339

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ndjson.md"

SERVER = Proc(812, "server")
WORKER = Proc(813, "worker")
API = Proc(900, "api", tid=903)
KUBE = Proc(4194301, "kube-controller")  # a 7-digit pid and a 15-character comm
V6_LOCAL = "2001:db8:85a3:8d3:1319:8a2e:370:7348"
V6_PEER = "2001:db8:1234:5678:9abc:def0:1234:5678"
V6_OTHER = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff"

START = {
    "event": "start",
    "ts": rfc3339(T0 + WALL_OFFSET_NS),
    "v": 1,
    "version": "0.1.0",
    "kernel": "6.18.0-test",
    "hostname": "web-1",
    "hooks": {
        "state": "tracepoint:sock:inet_sock_set_state",
        "close": "tracepoint:syscalls:sys_enter_close",
        "recv": "tracepoint:sock:sock_recv_length",
        "exit": None,
    },
    "leak_after_s": 30.0,
    "filters": {"pid": [], "port": [8080, 443], "state": []},
    "warnings": ["no kprobes on this kernel: exits are judged from syscall tracepoints"],
}

# Already in CLOSE_WAIT when tracing starts: one held by the server, one never accepted.
EXISTING = [
    Entry(NETNS, 4, "10.0.0.1", 8080, "10.0.0.9", 40000, rx_queue=1, inode=9100),
    Entry(NETNS, 6, V6_LOCAL, 443, V6_OTHER, 52000, rx_queue=518, inode=0),
]
EXISTING_HOLDERS = {9100: [Holder(812, "server", 9)]}


def golden_events() -> list[dict]:
    """Six sockets, each showing one way out of (or no way out of) CLOSE_WAIT."""
    slow_close = life(0xFFFF888105B5DC80, [
        step(0.1, "SYN_RECV", "ESTABLISHED", owner=SERVER, via_listener=True, prev_ns=200_000),
        step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        eof(0.6, owner=SERVER),
        step(2.0, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="closed",
             kstack_id=7),
        step(2.001, "LAST_ACK", "CLOSE", owner=SERVER),
    ])
    # The server forked a worker that inherited the descriptor: the parent's close() sends no
    # FIN, the worker holds the socket until it exits.
    forked = life(0xFFFF888105B5E500, [
        step(1.0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(45.0, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=WORKER, outcome="exit"),
    ], raddr="10.0.0.3", rport=40001)
    reset = life(0xFFFF8881062A0000, [
        step(3.0, "CLOSE", "SYN_SENT", owner=API),
        step(3.001, "SYN_SENT", "ESTABLISHED", owner=API),
        step(5.0, "ESTABLISHED", "CLOSE_WAIT", owner=API),
        step(6.5, "CLOSE_WAIT", "CLOSE", owner=API, outcome="reset"),
    ], laddr="10.0.0.1", lport=53000, raddr="192.168.100.200", rport=5432)
    ipv6_leak = life(0xFFFF8881062A1F00, [
        step(8.0, "ESTABLISHED", "CLOSE_WAIT"),
    ], family=6, laddr=V6_LOCAL, lport=443, raddr=V6_PEER, rport=61000)
    shutdown = life(0xFFFF8881062A3E00, [
        step(10.0, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
        step(10.25, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="shutdown"),
    ], raddr="10.0.0.4", rport=40100)
    long_comm = life(0xFFFF8881062A5D00, [
        step(12.0, "ESTABLISHED", "CLOSE_WAIT", owner=KUBE),
        step(13.5, "CLOSE_WAIT", "LAST_ACK", owner=KUBE, actor=KUBE, outcome="closed"),
    ], laddr="172.16.254.101", lport=10257, raddr="172.16.254.1", rport=33333)
    # The first pre-existing socket: the kernel learns of it only as the server closes it.
    preexisting_close = life(0xFFFF8881062A7C00, [
        step(20.0, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="closed"),
    ], raddr="10.0.0.9", rport=40000)
    return merge(slow_close, forked, reset, ipv6_leak, shutdown, long_comm, preexisting_close)


def golden_records() -> list[dict]:
    """The whole trace as the trace loop would emit it: start, existing, events with a tick
    every second, a lost report, summary."""
    resolver = FakeResolver({
        ("10.0.0.1", 8080, "10.0.0.3", 40001): (Found(6, 9204), [Holder(813, "worker", 7)]),
        (V6_LOCAL, 443, V6_PEER, 61000): (Found(0, 9301), [Holder(2001, "nginx", 12)]),
        (V6_LOCAL, 443, V6_OTHER, 52000): (Found(518, 0), []),
    })
    agg = Aggregator(30.0, WALL_OFFSET_NS, resolver.resolve, symbolize=fake_symbolize,
                     start_mono_ns=T0, causes=Causes(recv_eof=True))
    out = [START, *agg.seed_existing(EXISTING, EXISTING_HOLDERS, T0)]
    second = 1
    for ev in golden_events():
        while at(second) <= ev["ts_ns"]:
            out += tick(agg, second)
            second += 1
        out += agg.feed(ev)
    while second <= 50:
        out += tick(agg, second)
        second += 1
    out.append(agg.summary(at(50)))
    return out


def tick(agg: Aggregator, second: int) -> list[dict]:
    lost = agg.note_lost(3, at(second)) if second == 25 else []
    return lost + agg.tick(at(second))


def fake_symbolize(ev: dict) -> dict:
    return {"kstack": ["tcp_set_state", "tcp_close", "__x64_sys_close"], "ustack": ["close"]}


def check_golden(name: str, actual: bytes) -> None:
    goldens.check_golden(name, actual, __file__)


def render_table(records: list[dict], width: int = 100, color: bool = False) -> str:
    out = io.StringIO()
    sink = TableSink(out, color=color, width=width)
    for rec in records:
        sink.write(rec)
    sink.close()
    return out.getvalue()


# ---------------------------------------------------------------------- NDJSON


def test_ndjson_golden():
    buf = io.BytesIO()
    sink = NdjsonSink(buf)
    for rec in golden_records():
        sink.write(rec)
    sink.close()
    check_golden("trace.ndjson", buf.getvalue())


def test_ndjson_golden_shape():
    lines = (GOLDEN / "trace.ndjson").read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line \n-terminated
    records = [orjson.loads(line) for line in lines[:-1]]
    assert records[0]["event"] == "start" and records[-1]["event"] == "summary"
    kinds = {r["event"] for r in records}
    assert kinds == {"start", "existing", "state", "close_wait", "leak", "lost", "summary"}
    assert [r["outcome"] for r in records if r["event"] == "close_wait"] == [
        "closed", "reset", "shutdown", "closed", "closed", "exit"]
    assert sum(r["event"] == "leak" for r in records) == records[-1]["leaks"] == 3


def test_every_emitted_field_is_documented():
    documented = set(re.findall(r"`([a-z_]+)`", DOCS.read_text()))
    for rec in golden_records()[1:]:  # START is the CLI's, built here by hand
        missing = [key for key in rec if key not in documented]
        assert not missing, f"{rec['event']} fields not in docs/ndjson.md: {missing}"


def test_ndjson_records_are_ordered_as_documented():
    recs = golden_records()
    for rec in recs:
        assert list(rec)[:2] == ["event", "ts"]


# ----------------------------------------------------------------------- table


def test_table_golden():
    check_golden("trace.table.txt", render_table(golden_records()).encode())


@pytest.mark.parametrize("width", [100, 120, 90, 80, 60, 40])
def test_table_never_wider_than_width(width):
    for line in render_table(golden_records(), width=width).splitlines():
        assert len(line) <= min(width, 100), line


def test_table_long_ipv6_keeps_the_ports():
    text = render_table(golden_records(), width=100)
    v6 = [line for line in text.splitlines() if "]:61000" in line]
    assert v6 and all("]:443" in line for line in v6)
    assert all(len(line) <= 100 for line in v6)


def test_table_color_marks_leaks_only_in_color_mode():
    records = golden_records()
    plain = render_table(records).splitlines()
    assert not any("\x1b[" in line for line in plain)
    colored = render_table(records, color=True).splitlines()
    assert [click.unstyle(line) for line in colored] == plain  # color adds no columns
    event_col = next(line for line in plain if line.startswith("TIME_UTC")).index("EVENT")
    leaks = [i for i, line in enumerate(plain) if line[event_col:].startswith("LEAK")]
    assert len(leaks) == 3
    assert all(colored[i].startswith("\x1b[31m\x1b[1m") for i in leaks)  # red, bold
    rows = [i for i, line in enumerate(plain) if line[event_col:].startswith(("CW", "ESTAB"))]
    assert rows and all(colored[i] == plain[i] for i in rows)  # the rest stays quiet


def test_table_neutralises_control_characters():
    rec = dict(golden_records()[2], comm="evil\x1b[2J\x07", event="leak", age_s=31.0)
    text = render_table([rec])
    assert "\x1b" not in text and "\x07" not in text and "evil?[2J?" in text


def test_table_ignores_unknown_records():
    assert render_table([{"event": "something_new", "ts": "2026-11-21T05:13:00.000000Z"}]) == ""


# ---------------------------------------------------------------------- flushing


class CountingBytesIO(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_ndjson_flush_interval_honoured():
    buf = CountingBytesIO()
    sink = NdjsonSink(buf, flush_interval_s=1.0, clock=lambda: 100.0)
    sink.maybe_flush(100.5)
    assert buf.flushes == 0  # nothing written yet
    sink.write({"event": "lost", "count": 1})
    sink.maybe_flush(100.999)
    assert buf.flushes == 0
    sink.maybe_flush(101.0)
    assert buf.flushes == 1
    sink.maybe_flush(105.0)
    assert buf.flushes == 1  # nothing new since
    sink.write({"event": "lost", "count": 2})
    sink.maybe_flush(105.0)
    assert buf.flushes == 2  # the last flush was long ago: this record need not wait
    sink.write({"event": "lost", "count": 3})
    sink.maybe_flush(105.5)
    assert buf.flushes == 2  # within a second of the last flush
    sink.maybe_flush(106.0)
    assert buf.flushes == 3


def test_ndjson_flush_interval_with_injected_clock():
    now = [0.0]
    buf = CountingBytesIO()
    sink = NdjsonSink(buf, flush_interval_s=0.5, clock=lambda: now[0])
    sink.write({"event": "summary"})
    now[0] = 0.4
    sink.maybe_flush()
    assert buf.flushes == 0
    now[0] = 0.5
    sink.maybe_flush()
    assert buf.flushes == 1


def test_ndjson_line_format():
    buf = io.BytesIO()
    sink = NdjsonSink(buf)
    sink.write({"event": "lost", "ts": "x", "count": 1, "total": 1, "f": 0.5, "n": None})
    sink.close()
    assert buf.getvalue() == (
        b'{"event":"lost","ts":"x","count":1,"total":1,"f":0.5,"n":null}\n'
    )
    assert not buf.closed  # not ours to close (stdout)


def test_open_ndjson_truncates_with_mode_0640(tmp_path):
    path = tmp_path / "trace.ndjson"
    path.write_text("old log\n")
    path.chmod(0o666)
    sink = open_ndjson(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_bytes() == b""
    sink.write({"event": "summary", "events": 1})
    assert path.read_bytes() == b""  # buffered until a flush
    sink.flush()
    assert path.read_bytes() == b'{"event":"summary","events":1}\n'
    sink.close()


def test_open_ndjson_new_file(tmp_path):
    path = tmp_path / "new.ndjson"
    open_ndjson(str(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) & ~0o640 == 0  # umask may only narrow it
    assert path.read_bytes() == b""


def test_table_flush_interval():
    out = io.StringIO()
    flushes = []
    out.flush = lambda: flushes.append(1)  # type: ignore[method-assign]
    sink = TableSink(out, color=False, clock=lambda: 0.0)
    sink.write(golden_records()[2])
    sink.maybe_flush(0.5)
    assert flushes == []
    sink.maybe_flush(1.0)
    assert flushes == [1]


@pytest.mark.parametrize("module", [tcpwatch.sinks, ndjson, table])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_golden_stream_uses_real_times():
    """Guard for the scenario itself: T0 is 05:13:00 UTC and ticks run each second."""
    assert START["ts"] == "2026-11-21T05:13:00.000000Z"
    assert at(1) - T0 == SEC


# ------------------------------------------------------------ table with -o (rate-limited)


def limited_table(rows: int = 2):
    now = [0.0]
    out = io.StringIO()
    sink = TableSink(out, color=False, clock=lambda: now[0], rows_per_s=rows,
                     elsewhere="/var/log/t.ndjson", wall=lambda: 1795237980.0 + now[0])
    return sink, out, now


def test_table_with_output_file_limits_transitions_and_routine_closes():
    records = golden_records()
    states = [r for r in records if r["event"] == "state"]
    closes = [r for r in records if r["event"] == "close_wait"]
    routine = [r for r in closes if r["cause"] == "closed"]
    other = [r for r in closes if r["cause"] != "closed"]
    leaks = [r for r in records if r["event"] in ("leak", "existing", "lost")]
    assert routine and other and leaks
    sink, out, now = limited_table(rows=2)
    for rec in states + routine + other + leaks:
        sink.write(rec)
    text = out.getvalue()
    assert len(re.findall(r"[A-Z_2]+>[A-Z_2]+", text)) == 2  # the room of this second
    for rec in other:  # slow closes, resets, exits: always
        assert f"CW {rec['cause']}" in text
    assert text.count("LEAK") == 3 and text.count("EXISTING") == 2 and "LOST 3" in text
    assert "not shown" not in text  # said once the second is over
    now[0] = 1.0
    sink.maybe_flush()
    hidden = len(states) - 2 + len(routine)
    last = out.getvalue().splitlines()[-1]
    assert last == (f"05:13:01 ... {len(states) - 2} transitions and {len(routine)} routine "
                    "CLOSE_WAIT exits not shown (all in /var/log/t.ndjson)")
    assert hidden > 0
    sink.write(states[0])  # a new second: room again
    assert out.getvalue().splitlines()[-1].endswith("SYN_RECV>ESTAB")


def test_table_limit_counts_what_the_fast_path_did_not_hand_over():
    sink, out, now = limited_table(rows=3)
    assert sink.limited and sink.state_room() == 3
    sink.write(golden_records()[3])
    assert sink.state_room() == 2
    sink.not_shown(1000, 7)
    sink.write({"event": "summary", "events": 1010, "leaks": 0, "lost": 0, "close_waits": 7,
                "elapsed_s": 0.5})
    lines = out.getvalue().splitlines()
    assert lines[-2].endswith("... 1000 transitions and 7 routine CLOSE_WAIT exits not shown "
                              "(all in /var/log/t.ndjson)")  # before the summary, not lost
    assert lines[-1].startswith("1010 events")
    now[0] = 5.0
    assert sink.state_room() == 3 and out.getvalue().splitlines()[-1].startswith("1010 events")


def test_table_without_output_file_is_unlimited():
    sink = TableSink(io.StringIO(), color=False)
    assert not sink.limited and sink.state_room() >= 10**9
    assert len(re.findall(r"[A-Z_2]+>[A-Z_2]+", render_table(golden_records()))) == 16


def test_table_clean_fast_path_keeps_its_rules():
    assert table.clean("ünï\tx") == "?n??x" and table.clean("ok 1") == "ok 1"
    assert table.clean(7) == "7" and table.clean("\x7f") == "?"


def test_log_file_write_lines_rotates_between_lines_like_write(tmp_path):
    lines = [orjson.dumps({"event": "state", "seq": i, "pad": "x" * (i % 37)}) + b"\n"
             for i in range(400)]
    header = {"event": "start", "ts": "2026-11-21T05:13:00.000000Z", "v": 1}
    made = []
    for name, by_chunk in (("a", False), ("b", True)):
        path = tmp_path / name / "t.ndjson"
        path.parent.mkdir()
        log = ndjson.LogFile(str(path), rotation=ndjson.Rotation(size=2000, compress=False),
                             wall=iter(range(1_000_000, 2_000_000)).__next__)
        log.write(header)
        for i in range(0, len(lines), 37):
            chunk = lines[i:i + 37]
            if by_chunk:
                log.write_lines(b"".join(chunk), len(chunk))
            else:
                for line in chunk:
                    log.write(orjson.loads(line))
        log.close()
        made.append([Path(p).read_bytes() for p in ndjson.rotated_files(str(path))]
                    + [path.read_bytes()])
    assert made[0] == made[1] and len(made[0]) > 5


def test_log_file_counts_unwritten_lines_of_chunks():
    log = ndjson.LogFile("/dev/full", warn=lambda m: None)
    log.write_lines(b'{"a":1}\n{"a":2}\n{"a":3}\n', 3)
    log.flush()
    log.write_lines(b'{"a":4}\n', 1)
    log.close()
    assert log.unwritten == 4


def test_ndjson_sink_write_lines():
    buf = io.BytesIO()
    sink = NdjsonSink(buf)
    sink.write({"event": "start"})
    sink.write_lines(b'{"event":"state"}\n{"event":"state"}\n', 2)
    sink.close()
    assert buf.getvalue() == b'{"event":"start"}\n{"event":"state"}\n{"event":"state"}\n'


def test_table_summary_says_how_full_the_kernel_buffer_came():
    out = io.StringIO()
    sink = TableSink(out, color=False)
    rec = {"event": "summary", "events": 9, "leaks": 0, "lost": 0, "close_waits": 2,
           "elapsed_s": 31.0}
    sink.write(rec)
    sink.write({**rec, "buffer_peak_pct": 37.5})
    first, second = out.getvalue().splitlines()[-2:]
    assert first == "9 events, 0 leaks, 0 lost (2 left CLOSE_WAIT, 31.00s traced)"
    assert second == ("9 events, 0 leaks, 0 lost (2 left CLOSE_WAIT, 31.00s traced, "
                      "kernel buffer at most 37.5% full)")

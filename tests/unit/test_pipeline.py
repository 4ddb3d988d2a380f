"""The trace loop on recorded raw events: decode -> aggregate -> sinks, lost, stop."""

from __future__ import annotations

import io

import orjson
from streams import WALL_OFFSET_NS, Proc, at, life, step

from tcpwatch import schema
from tcpwatch.aggregate import Aggregator
from tcpwatch.pipeline import TraceLoop, pid_filter
from tcpwatch.sinks.ndjson import NdjsonSink

SERVER = Proc(812, "server")
CLIENT = Proc(900, "client")


class RecordedSource:
    """Raw tw_event bytes handed out in batches, with a lost-event counter that grows."""

    def __init__(self, batches: list[list[bytes]], lost: list[int]) -> None:
        self.batches = batches
        self.lost_totals = lost
        self.polls = 0

    def poll(self, timeout_s: float) -> list[bytes]:
        self.polls += 1
        return self.batches.pop(0) if self.batches else []

    def counters(self) -> dict[str, int]:
        return {"lost": self.lost_totals[min(self.polls, len(self.lost_totals)) - 1]}


def raw(events: list[dict]) -> list[bytes]:
    return [schema.encode(ev) for ev in events]


def run_loop(batches, lost, keep=None, duration_s=10.0):
    clock_ns = iter(range(at(0), at(100), 250_000_000))  # 0.25 s per reading
    out = io.BytesIO()
    sink = NdjsonSink(out)
    agg = Aggregator(leak_after_s=1.0, mono_to_wall_ns=WALL_OFFSET_NS, start_mono_ns=at(0))
    loop = TraceLoop(RecordedSource(batches, lost), agg, [sink], keep=keep,
                     clock=lambda: next(clock_ns))
    summary = loop.run(duration_s)
    sink.flush()
    return summary, [orjson.loads(line) for line in out.getvalue().splitlines()]


def leaking_server() -> list[dict]:
    return life(0xA1, [
        step(0.0, "LISTEN", "SYN_RECV", owner=SERVER, via_listener=True),
        step(0.0, "SYN_RECV", "ESTABLISHED", owner=SERVER, via_listener=True),
        step(0.1, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
    ])


def closing_client() -> list[dict]:
    return life(0xB2, [
        step(0.0, "CLOSE", "SYN_SENT", owner=CLIENT, actor=CLIENT),
        step(0.0, "SYN_SENT", "ESTABLISHED", owner=CLIENT),
        step(0.2, "ESTABLISHED", "CLOSE_WAIT", owner=CLIENT),
        step(0.7, "CLOSE_WAIT", "LAST_ACK", owner=CLIENT, actor=CLIENT, outcome="closed"),
    ], lport=40000, rport=443)


def test_events_flow_to_records_and_a_summary():
    summary, recs = run_loop([raw(leaking_server()), raw(closing_client())], [0])
    kinds = [r["event"] for r in recs]
    assert kinds.count("state") == 7
    assert kinds.count("close_wait") == 1 and kinds.count("leak") == 1
    assert kinds[-1] == "summary" and recs[-1] == summary
    assert (summary["events"], summary["leaks"], summary["lost"]) == (7, 1, 0)
    (cw,) = [r for r in recs if r["event"] == "close_wait"]
    assert (cw["duration_s"], cw["outcome"], cw["closer_pid"]) == (0.5, "closed", 900)


def test_lost_events_are_reported_as_they_grow_and_in_the_summary():
    summary, recs = run_loop([raw(leaking_server())] + [[]] * 12, [0, 0, 0, 5, 5, 5, 9])
    lost = [r for r in recs if r["event"] == "lost"]
    assert [(r["count"], r["total"]) for r in lost] == [(5, 5), (4, 9)]
    assert summary["lost"] == 9


def test_stop_ends_the_loop_and_still_drains_what_the_kernel_sent():
    source = RecordedSource([raw(leaking_server())], [0])
    agg = Aggregator(leak_after_s=60, mono_to_wall_ns=WALL_OFFSET_NS)
    out = io.BytesIO()
    loop = TraceLoop(source, agg, [NdjsonSink(out)])
    loop.stop()  # as a SIGTERM before the first poll would
    summary = loop.run(None)
    assert summary["transitions"] == 3  # the final drain read the batch


def test_pid_filter_keeps_records_about_the_pid_as_owner_holder_or_closer():
    keep = pid_filter([900])
    _, recs = run_loop([raw(leaking_server()), raw(closing_client())], [0], keep=keep)
    assert {r.get("pid") for r in recs if r["event"] == "state"} == {900}
    assert not [r for r in recs if r["event"] == "leak"]  # the leak is the server's
    assert recs[-1]["event"] == "summary"
    assert keep({"event": "leak", "pid": None, "holders": [{"pid": 900}]})
    assert keep({"event": "close_wait", "pid": 812, "closer_pid": 900})

"""The trace loop on recorded raw events: decode -> aggregate -> sinks, lost, stop."""

from __future__ import annotations

import io
import threading

import orjson
from streams import WALL_OFFSET_NS, FakeResolver, Found, Holder, Proc, at, life, merge, step

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


# ------------------------------------------------------------- leak lookups off the loop


class GatedResolver:
    """A resolver that blocks until released, as a /proc scan of a big host takes seconds."""

    def __init__(self, fail_first: bool = False) -> None:
        self.fake = FakeResolver({("10.0.0.1", 8080, "10.0.0.2", 51234):
                                  (Found(1, 777), [Holder(812, "server", 5)])})
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_first = fail_first

    def resolve(self, keys):
        self.started.set()
        assert self.release.wait(5)
        if self.fail_first:
            self.fail_first = False
            raise OSError("proc went away")
        return self.fake.resolve(keys)


def background_loop(batches, resolver, fast=True):
    now = [at(0)]
    out = io.BytesIO()
    sink = NdjsonSink(out)
    agg = Aggregator(leak_after_s=1.0, mono_to_wall_ns=WALL_OFFSET_NS, start_mono_ns=at(0),
                     resolve=resolver.resolve)
    source = RecordedSource(batches, [0])
    loop = TraceLoop(source, agg, [sink], clock=lambda: now[0], fast=fast,
                     background_resolve=True)

    def records():
        sink.flush()
        return [orjson.loads(line) for line in out.getvalue().splitlines()]

    return loop, now, records


def test_a_slow_lookup_does_not_stop_draining_and_the_leak_comes_when_it_is_done():
    resolver = GatedResolver()
    later = life(0xC3, [step(2.0, "CLOSE", "SYN_SENT", owner=CLIENT, actor=CLIENT)], lport=41000)
    loop, now, records = background_loop([raw(leaking_server())], resolver)
    loop._drain(0)
    now[0] = at(1.5)
    loop._leaks(now[0])  # due: handed to the worker, which blocks
    assert resolver.started.wait(5)
    loop.source.batches.append(raw(later))
    loop._drain(0)  # the loop goes on draining meanwhile
    assert [r["event"] for r in records()].count("state") == 4
    assert not [r for r in records() if r["event"] == "leak"]
    resolver.release.set()
    assert loop.resolver.wait(5)
    now[0] = at(2.5)
    loop._leaks(now[0])
    (leak,) = [r for r in records() if r["event"] == "leak"]
    assert (leak["pid"], leak["holders"], leak["inode"]) == (812, [
        {"pid": 812, "comm": "server", "fd": 5}], 777)
    assert leak["age_s"] == 2.4  # at the moment it is written
    assert loop.agg.leaks == 1


def test_a_socket_closed_while_its_lookup_runs_reports_its_leak_before_its_close():
    for fast in (True, False):
        resolver = GatedResolver()
        loop, now, records = background_loop([raw(leaking_server())], resolver, fast=fast)
        loop._drain(0)
        now[0] = at(1.5)
        loop._leaks(now[0])
        assert resolver.started.wait(5)
        close = life(0xA1, [step(1.7, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER,
                                 outcome="closed", cw_ns=1_600_000_000)])
        loop.source.batches.append(raw(close))
        loop._drain(0)
        kinds = [r["event"] for r in records()]
        assert kinds[-3:] == ["leak", "state", "close_wait"], (fast, kinds)
        leak, cw = records()[-3], records()[-1]
        assert (leak["pid"], leak["holders"], leak["age_s"]) == (812, [], 1.6)
        assert cw["leaked"] is True and cw["duration_s"] == 1.6
        resolver.release.set()
        assert loop.resolver.wait(5)
        now[0] = at(2.0)
        loop._leaks(now[0])
        assert [r["event"] for r in records()].count("leak") == 1  # not twice
        assert loop.agg.leaks == 1


def test_a_failed_lookup_is_tried_again_a_second_later():
    resolver = GatedResolver(fail_first=True)
    resolver.release.set()
    loop, now, records = background_loop([raw(leaking_server())], resolver)
    loop._drain(0)
    now[0] = at(1.5)
    loop._leaks(now[0])
    assert loop.resolver.wait(5)
    loop._leaks(now[0])  # the failure comes back: due again, but not before a second
    assert not [r for r in records() if r["event"] == "leak"]
    now[0] = at(2.0)
    loop._leaks(now[0])
    assert loop._inflight is None
    now[0] = at(2.6)
    loop._leaks(now[0])
    assert loop.resolver.wait(5)
    loop._leaks(now[0])
    (leak,) = [r for r in records() if r["event"] == "leak"]
    assert leak["holders"] == [{"pid": 812, "comm": "server", "fd": 5}]


def test_the_end_of_a_run_waits_for_the_lookup_in_hand_and_resolves_the_rest():
    resolver = GatedResolver()
    other = life(0xD4, [step(0.9, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)], rport=51235)
    loop, now, records = background_loop([raw(merge(leaking_server(), other))], resolver)
    loop._drain(0)
    now[0] = at(1.5)
    loop._leaks(now[0])  # the first is due and handed over; the other is not due yet
    assert resolver.started.wait(5)
    threading.Timer(0.2, resolver.release.set).start()
    loop.stop()
    now[0] = at(5)
    summary = loop.run(None)
    leaks = [r for r in records() if r["event"] == "leak"]
    assert [r["rport"] for r in leaks] == [51234, 51235]
    assert leaks[0]["holders"] == [{"pid": 812, "comm": "server", "fd": 5}]
    assert records()[-1]["event"] == "summary" and summary["leaks"] == 2


def test_the_summary_says_how_many_sockets_the_kernel_map_forgot_when_the_source_knows():
    class Evicting(RecordedSource):
        def counters(self) -> dict[str, int]:
            return {"lost": 0, "sock_evicted_min": 37}

    out = io.BytesIO()
    agg = Aggregator(leak_after_s=60, mono_to_wall_ns=WALL_OFFSET_NS)
    loop = TraceLoop(Evicting([raw(leaking_server())], [0]), agg, [NdjsonSink(out)])
    loop.stop()
    assert loop.run(None)["sock_evicted_min"] == 37
    summary, _ = run_loop([raw(leaking_server())], [0])
    assert "sock_evicted_min" not in summary  # a recorded source knows nothing of the map


def test_the_summary_says_how_full_the_buffer_came_when_the_source_knows():
    class Filling(RecordedSource):
        def counters(self) -> dict[str, int | float]:
            return {"lost": 0, "buffer_peak_pct": 12.5}

    agg = Aggregator(leak_after_s=60, mono_to_wall_ns=WALL_OFFSET_NS)
    loop = TraceLoop(Filling([raw(leaking_server())], [0]), agg, [NdjsonSink(io.BytesIO())])
    loop.stop()
    assert loop.run(None)["buffer_peak_pct"] == 12.5
    summary, _ = run_loop([raw(leaking_server())], [0])
    assert "buffer_peak_pct" not in summary  # a recorded source reads no ring


def test_after_loop_runs_once_before_the_last_drain():
    # trace drops its real-time priority there: the last drain and lookups run without it.
    order: list[str] = []

    class Watched(RecordedSource):
        def poll(self, timeout_s: float) -> list[bytes]:
            order.append("poll")
            return super().poll(timeout_s)

    agg = Aggregator(leak_after_s=60, mono_to_wall_ns=WALL_OFFSET_NS)
    loop = TraceLoop(Watched([raw(leaking_server())], [0]), agg, [NdjsonSink(io.BytesIO())])
    loop.stop()  # no loop turn: straight to the end
    loop.run(None, after_loop=lambda: order.append("after"))
    assert order == ["after", "poll"]


def test_a_big_batch_of_lookups_is_written_one_record_at_a_time_and_the_heap_trimmed(
        monkeypatch):
    from tcpwatch import pipeline

    trims = []
    monkeypatch.setattr(pipeline.heap, "trim", lambda: trims.append(1))
    monkeypatch.setattr(pipeline, "TRIM_AFTER", 2)
    resolver = GatedResolver()
    resolver.release.set()
    other = life(0xD4, [step(0.1, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)], rport=51235)
    loop, now, records = background_loop([raw(merge(leaking_server(), other))], resolver)
    seen_found = []
    real = loop.agg.iter_leak_records

    def spy(due, found, now_ns):
        seen_found.append(found)
        for rec in real(due, found, now_ns):
            # streamed: while this record is written, the next one is not made yet
            assert len(found) == 2 - len([r for r in records() if r["event"] == "leak"]) - 1
            yield rec

    loop.agg.iter_leak_records = spy
    loop._drain(0)
    now[0] = at(1.5)
    loop._leaks(now[0])
    assert loop.resolver.wait(5)
    assert trims == []
    loop._leaks(now[0])
    assert [r["rport"] for r in records() if r["event"] == "leak"] == [51234, 51235]
    assert seen_found == [{}]  # each socket's lookup taken out as its record was made
    assert trims == [1]  # two records: as big as TRIM_AFTER

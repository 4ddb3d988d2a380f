"""The trace loop: source -> decode -> aggregator -> sinks, until told to stop.

Independent of bcc: the source is anything with poll() and counters(), so
tests drive it with recorded or synthetic raw events.

Events take the fast path (fastpath.FastPath: raw bytes straight to NDJSON lines) when the
sinks allow it, else decode() -> Aggregator.feed() -> records -> every sink's write().
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Callable, Protocol

from tcpwatch import schema
from tcpwatch.aggregate import Aggregator
from tcpwatch.fastpath import FastPath
from tcpwatch.sinks import Sink


class Source(Protocol):
    def poll(self, timeout_s: float) -> list[bytes]: ...
    def counters(self) -> dict[str, int]: ...


def pid_filter(pids: Iterable[int]) -> Callable[[dict], bool]:
    """Keep records about the given processes: as owner, holder or closer.

    The kernel lets CLOSE_WAIT transitions of sockets with an unknown owner through
    (the owner may be one of these pids); this is where they are decided.

    >>> keep = pid_filter([42])
    >>> keep({"event": "leak", "pid": 7, "holders": [{"pid": 42}]}), keep({"pid": 7})
    (True, False)
    """
    wanted = set(pids)

    def keep(rec: dict) -> bool:
        if rec.get("event") in ("start", "lost", "summary"):
            return True
        if rec.get("pid") in wanted or rec.get("closer_pid") in wanted:
            return True
        return any(h.get("pid") in wanted for h in rec.get("holders") or ())

    return keep


class TraceLoop:
    """Runs a source through an aggregator into sinks; stop() may come from a signal."""

    def __init__(
        self,
        source: Source,
        aggregator: Aggregator,
        sinks: list[Sink],
        keep: Callable[[dict], bool] | None = None,
        poll_s: float = 0.1,
        clock: Callable[[], int] = time.monotonic_ns,
        fast: bool = True,
    ) -> None:
        self.source = source
        self.agg = aggregator
        self.sinks = sinks
        self.keep = keep
        self.poll_s = poll_s
        self.clock = clock
        self.stopping = False
        # None when a sink or setting needs every record built (see FastPath.build).
        self.fast = FastPath.build(aggregator, sinks, keep) if fast else None

    def stop(self, *_args: object) -> None:
        self.stopping = True

    def emit(self, records: Iterable[dict]) -> None:
        for rec in records:
            if self.keep is None or self.keep(rec):
                for sink in self.sinks:
                    sink.write(rec)

    def _drain(self, timeout_s: float) -> None:
        batch = self.source.poll(timeout_s)
        if self.fast is not None:
            self.fast.process(batch)
            return
        decode = schema.decode
        feed = self.agg.feed
        for raw in batch:
            self.emit(feed(decode(raw)))

    def _check_lost(self) -> None:
        counts = self.source.counters()
        self.emit(self.agg.note_lost(counts["lost"], self.clock(), counts.get("missed", 0)))

    def run(self, duration_s: float | None = None) -> dict:
        """Loop until stop() or duration_s; returns the summary record (also emitted)."""
        start = self.clock()
        deadline = start + int(duration_s * 1e9) if duration_s else None
        last_second = start
        while not self.stopping:
            self._drain(self.poll_s)
            now = self.clock()
            self.emit(self.agg.tick(now))
            if now - last_second >= 1_000_000_000:
                self._check_lost()
                last_second = now
            wall = time.monotonic()
            for sink in self.sinks:
                sink.maybe_flush(wall)
            if deadline is not None and now >= deadline:
                break
        # Whatever the kernel produced before we stopped is still delivered.
        self._drain(0)
        now = self.clock()
        self.emit(self.agg.tick(now))
        self._check_lost()
        summary = self.agg.summary(now)
        self.emit([summary])
        return summary

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

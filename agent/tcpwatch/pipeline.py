"""The trace loop: source -> decode -> aggregator -> sinks, until told to stop.

Independent of bcc: the source is anything with poll() and counters(), so
tests drive it with recorded or synthetic raw events.

Events take the fast path (fastpath.FastPath: raw bytes straight to NDJSON lines) when the
sinks allow it, else decode() -> Aggregator.feed() -> records -> every sink's write().
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from typing import Callable, Protocol

from tcpwatch import heap, schema
from tcpwatch.aggregate import Aggregator
from tcpwatch.fastpath import FastPath
from tcpwatch.sinks import Sink

# A batch of leak lookups this big leaves tables worth handing back to the kernel.
TRIM_AFTER = 1000


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


class BackgroundResolver:
    """Runs resolve(keys) on a worker thread, one batch at a time.

    Looking up who holds sockets reads /proc/*/fd of every process: about 4 us per open
    descriptor, so seconds on a host with 100,000 sockets. Done on the loop's thread it
    would stop the kernel buffer from being drained (and events be lost) while it runs.
    The worker's syscalls release the GIL, so draining goes on meanwhile.
    """

    def __init__(self, resolve: Callable[[list], dict]) -> None:
        self._resolve = resolve
        self._cv = threading.Condition()
        self._job: tuple[object, list] | None = None
        self._done: list[tuple[object, dict | BaseException]] = []
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tcpwatch-resolve", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A batch is queued or being resolved (its result may not be collected yet)."""
        with self._cv:
            return self._busy

    def submit(self, token: object, keys: list) -> None:
        """Resolve keys; the result comes back from results() with token. One at a time."""
        with self._cv:
            if self._busy:
                raise RuntimeError("a batch is being resolved already")
            self._busy = True
            self._job = (token, keys)
            self._cv.notify()

    def results(self) -> list[tuple[object, dict | BaseException]]:
        """Finished batches: (token, found) or (token, the exception resolve() raised)."""
        with self._cv:
            done, self._done = self._done, []
            if done:
                self._busy = False
            return done

    def wait(self, timeout_s: float) -> bool:
        """Wait until the batch in hand is finished; False on timeout."""
        with self._cv:
            return bool(self._cv.wait_for(lambda: self._done or not self._busy, timeout_s))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._job is not None or self._closed)
                if self._closed:
                    return
                token, keys = self._job
                self._job = None
            try:
                result: dict | BaseException = self._resolve(keys)
            except Exception as exc:  # handed back: the loop decides (retry later)
                result = exc
            with self._cv:
                self._done.append((token, result))
                self._cv.notify_all()


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
        background_resolve: bool = False,
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
        # The compiled scanner reads a ring buffer in place when the source has one.
        scan = self.fast.ring_scanner() if self.fast is not None else None
        poll_scanned = getattr(source, "poll_scanned", None)
        self._poll_scanned = (
            (lambda timeout_s: poll_scanned(timeout_s, scan)) if scan and poll_scanned else None)
        resolve = aggregator.resolve_fn
        self.resolver = BackgroundResolver(resolve) if background_resolve and resolve else None
        self._retry_ns = 0  # after a failed lookup, when to try again
        self._inflight: list | None = None  # sockets whose lookup the resolver has now

    def stop(self, *_args: object) -> None:
        self.stopping = True

    def emit(self, records: Iterable[dict]) -> None:
        for rec in records:
            if self.keep is None or self.keep(rec):
                for sink in self.sinks:
                    sink.write(rec)

    def _drain(self, timeout_s: float) -> None:
        fast = self.fast
        if fast is not None:
            items = self._poll_scanned(timeout_s) if self._poll_scanned else None
            if items is not None:
                fast.process_items(items)
            else:
                fast.process(self.source.poll(timeout_s))
            return
        batch = self.source.poll(timeout_s)
        decode = schema.decode
        feed = self.agg.feed
        for raw in batch:
            self.emit(feed(decode(raw)))

    def _check_lost(self) -> dict[str, int]:
        counts = self.source.counters()
        self.emit(self.agg.note_lost(counts["lost"], self.clock(), counts.get("missed", 0)))
        return counts

    def _leaks(self, now: int, final: bool = False) -> None:
        """Leak records: with the background resolver, collect a finished batch and hand
        it the sockets due now; else resolve them here (Aggregator.tick)."""
        if self.resolver is None:
            self.emit(self.agg.tick(now))
            return
        for due, found in self.resolver.results():
            self._inflight = None
            if isinstance(found, BaseException):
                self.agg.requeue(due)
                self._retry_ns = now + 1_000_000_000
            else:
                self.emit(self.agg.iter_leak_records(due, found, now))
                if len(due) >= TRIM_AFTER:
                    heap.trim()  # the lookups' tables are garbage now
        if final:
            # The batch in hand, then whatever is due, before the summary.
            if self._inflight is not None and self.resolver.wait(10.0):
                self._leaks(now)
            self.resolver.close()
            self.resolver = None
            if self._inflight is not None:  # still not back: looked up again below
                self.agg.requeue(self._inflight)
            due = self.agg.take_due(now)
            found: dict = {}
            if due and self.agg.resolve_fn is not None:
                # /proc unreadable at exit: the records name the kernel's owner instead.
                with contextlib.suppress(OSError):
                    found = self.agg.resolve_fn(self.agg.keys(due))
            self.emit(self.agg.iter_leak_records(due, found, now))
            return
        if self._inflight is not None or now < self._retry_ns:
            return
        due = self.agg.take_due(now)
        if due:
            self._inflight = due
            self.resolver.submit(due, self.agg.keys(due))

    def run(self, duration_s: float | None = None,
            after_loop: Callable[[], object] | None = None) -> dict:
        """Loop until stop() or duration_s; returns the summary record (also emitted).
        after_loop: called when the loop ends, before the last drain and lookups (trace
        drops its real-time priority there)."""
        start = self.clock()
        deadline = start + int(duration_s * 1e9) if duration_s else None
        last_second = start
        while not self.stopping:
            self._drain(self.poll_s)
            now = self.clock()
            self._leaks(now)
            if now - last_second >= 1_000_000_000:
                self._check_lost()
                last_second = now
            wall = time.monotonic()
            for sink in self.sinks:
                sink.maybe_flush(wall)
            if deadline is not None and now >= deadline:
                break
        if after_loop is not None:
            after_loop()
        # Whatever the kernel produced before we stopped is still delivered.
        self._drain(0)
        now = self.clock()
        self._leaks(now, final=True)
        counts = self._check_lost()
        summary = self.agg.summary(now)
        if "sock_evicted_min" in counts:
            # The kernel's socket map is bounded (LRU): say if it had to forget sockets.
            summary["sock_evicted_min"] = counts["sock_evicted_min"]
        if "rescued" in counts:
            # Transitions the kernel skipped the state program for, recovered (not in `lost`).
            summary["rescued"] = counts["rescued"]
        if "buffer_peak_pct" in counts:
            summary["buffer_peak_pct"] = counts["buffer_peak_pct"]
        self.emit([summary])
        return summary

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

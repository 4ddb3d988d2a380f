"""Sinks: where aggregator records go (terminal table, NDJSON log).

Every sink takes records (dicts, docs/ndjson.md) one at a time and decides itself how to
show them; the trace loop only calls the four methods of `Sink`:

>>> sink = NdjsonSink(sys.stdout.buffer)       # doctest: +SKIP
>>> for rec in agg.feed(ev): sink.write(rec)   # doctest: +SKIP
>>> sink.maybe_flush()   # once per poll: cheap, flushes ~1/s   # doctest: +SKIP
>>> sink.close()   # flushes; closes only a stream it opened    # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def flush(self) -> None: ...

    def maybe_flush(self, now: float | None = None) -> None: ...

    def close(self) -> None: ...


class FlushTimer:
    """Says when a buffered sink is due to flush: at most every `interval_s` seconds, and
    only if something was written since the last flush.

    >>> t = FlushTimer(1.0, clock=lambda: 10.0)
    >>> t.wrote(); t.due(10.5), t.due(11.0)
    (False, True)
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.last = clock()
        self.dirty = False

    def wrote(self) -> None:
        self.dirty = True

    def due(self, now: float | None = None) -> bool:
        if not self.dirty:
            return False
        return (self.clock() if now is None else now) - self.last >= self.interval_s

    def flushed(self, now: float | None = None) -> None:
        self.last = self.clock() if now is None else now
        self.dirty = False


class BufferedSink:
    """A sink writing to a buffered `_stream`, flushed by a FlushTimer `_timer`.

    Subclasses set both and call `self._timer.wrote()` after writing.
    """

    _stream: Any
    _timer: FlushTimer

    def maybe_flush(self, now: float | None = None) -> None:
        """Flush if something was written and the interval passed (so `tail -f`/pipes see it)."""
        if self._timer.due(now):
            self._stream.flush()
            self._timer.flushed(now)

    def flush(self) -> None:
        self._stream.flush()
        self._timer.flushed()

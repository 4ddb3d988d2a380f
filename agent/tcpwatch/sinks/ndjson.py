"""The NDJSON event log (docs/ndjson.md): one orjson object per line.

Writes go to a buffered binary stream and are flushed about once a second, so `tail -f`
keeps up without a write(2) per event.

>>> import io
>>> buf = io.BytesIO()
>>> sink = NdjsonSink(buf)
>>> sink.write({"event": "lost", "ts": "2026-11-21T05:13:00.000000Z", "count": 3, "total": 3})
>>> sink.flush(); buf.getvalue()
b'{"event":"lost","ts":"2026-11-21T05:13:00.000000Z","count":3,"total":3}\\n'
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

import orjson

from tcpwatch.sinks import FlushTimer

LOG_MODE = 0o640  # the log names processes and peers: not for every local user


class NdjsonSink:
    """Records -> NDJSON lines on `stream`.

    flush_interval_s bounds how long a record may sit in the buffer once maybe_flush() is
    called regularly; `clock` (seconds) is injectable for tests. close() flushes, and closes
    the stream only when close_stream is true (open_ndjson's file, not stdout).
    """

    def __init__(
        self,
        stream: BinaryIO,
        flush_interval_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        close_stream: bool = False,
    ) -> None:
        self._stream = stream
        self._timer = FlushTimer(flush_interval_s, clock)
        self._close_stream = close_stream

    def write(self, record: dict) -> None:
        # OPT_APPEND_NEWLINE: the same bytes as dumps(record) + b"\n" without the copy.
        self._stream.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        self._timer.wrote()

    def maybe_flush(self, now: float | None = None) -> None:
        """Flush if something was written and flush_interval_s passed since the last flush."""
        if self._timer.due(now):
            self._stream.flush()
            self._timer.flushed(now)

    def flush(self) -> None:
        self._stream.flush()
        self._timer.flushed()

    def close(self) -> None:
        self.flush()
        if self._close_stream:
            self._stream.close()


def open_ndjson(path: str, flush_interval_s: float = 1.0) -> NdjsonSink:
    """A sink writing a new log at `path`: created (or truncated) with mode 0640.

    >>> sink = open_ndjson("/var/log/tcpwatch.ndjson")   # doctest: +SKIP
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_MODE)
    try:
        # O_CREAT's mode only applies to a new file and is narrowed by the umask; set it on a
        # reused regular file too. Never on a device or FIFO (e.g. -o /dev/stdout).
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, LOG_MODE)
        stream = os.fdopen(fd, "wb", buffering=1 << 16)
    except BaseException:
        os.close(fd)
        raise
    return NdjsonSink(stream, flush_interval_s, close_stream=True)

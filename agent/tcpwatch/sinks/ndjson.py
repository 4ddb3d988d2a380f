"""The NDJSON event log (docs/ndjson.md): one orjson object per line.

Writes go to a buffered binary stream and are flushed about once a second, so `tail -f`
keeps up without a write(2) per event.

>>> import io
>>> buf = io.BytesIO()
>>> sink = NdjsonSink(buf)
>>> sink.write({"event": "lost", "ts": "2026-11-21T05:13:00.000000Z", "count": 3, "total": 3})
>>> sink.flush(); buf.getvalue()
b'{"event":"lost","ts":"2026-11-21T05:13:00.000000Z","count":3,"total":3}\\n'

A log file (`trace -o PATH`, open_ndjson) is a `LogFile`: it rotates by size and/or age,
compresses what it rotated, reopens PATH when asked (SIGHUP, for logrotate), never writes
part of a line, and counts the records it could not write instead of stopping the trace.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import re
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

import orjson

from tcpwatch.sinks import BufferedSink, FlushTimer

LOG_MODE = 0o640  # the log names processes and peers: not for every local user
BUFFER_BYTES = 1 << 16  # a LogFile writes out once this much is buffered (or on flush)
REOPEN_RETRY_S = 1.0  # how often a LogFile that cannot write tries to open PATH again
ROTATE_RETRY_S = 60.0  # after a rotation failed (rename refused), the next try

_DUMPS_OPT = orjson.OPT_APPEND_NEWLINE


class NdjsonSink(BufferedSink):
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
        self._stream.write(orjson.dumps(record, option=_DUMPS_OPT))
        self._timer.wrote()

    def write_lines(self, data: bytes, count: int) -> None:
        """`count` records already serialised as whole NDJSON lines (the trace's fast path:
        `state` and `close_wait` records, never `start` or `summary`)."""
        self._stream.write(data)
        self._timer.wrote()

    def request_reopen(self) -> None:
        """Nothing to reopen on a stream (stdout); see LogFile.request_reopen."""

    def close(self) -> None:
        self.flush()
        if self._close_stream:
            self._stream.close()


# ---------------------------------------------------------------------------- rotation settings


class Rotation(NamedTuple):
    """When a LogFile starts a new file, and what it does with the old ones.

    Rotation(size=100 << 20, age_s=3600.0, keep=24, compress=True): a new file once the
    current one would pass 100 MiB or is an hour old; rotated files are gzipped and only
    the newest 24 are kept. None means "no limit" (Rotation() never rotates by itself).
    """

    size: int | None = None
    age_s: float | None = None
    keep: int | None = None
    compress: bool = True

    @property
    def enabled(self) -> bool:
        return self.size is not None or self.age_s is not None


NO_ROTATION = Rotation()

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes from "100M", "512k", "1G", "1.5GiB" or a plain number (binary units).

    >>> parse_size("100M"), parse_size("512k"), parse_size("4096")
    (104857600, 524288, 4096)
    """
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size: use bytes or a number with k, M, G, e.g. 100M")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"{text!r}: a size must be at least 1 byte")
    return value


def parse_age(text: str) -> float:
    """Seconds from "90s", "15m", "1h", "1d", "1h30m" or a plain number of seconds.

    >>> parse_age("1h30m"), parse_age("90"), parse_age("1.5d")
    (5400.0, 90.0, 129600.0)
    """
    compact = text.replace(" ", "")
    parts = _AGE.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration: e.g. 30s, 15m, 1h, 1d, 1h30m or seconds")
    value = float(sum(float(n) * _AGE_UNITS[u.lower()] for n, u in parts))
    if value <= 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return value


def rotated_name(path: str, wall_s: float) -> str:
    """The name a rotated file gets: PATH plus the UTC time of its rotation, to the ms, so
    names sort by age; the compressed one adds ".gz".

    >>> rotated_name("/var/log/tcpwatch.ndjson", 1795237980.25)
    '/var/log/tcpwatch.ndjson.20261121T051300.250Z'
    """
    ms = int(round(wall_s * 1000))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000))
    return f"{path}.{stamp}.{ms % 1000:03d}Z"


def rotated_files(path: str) -> list[str]:
    """Rotated files of the log at `path` (compressed or not), oldest first.

    >>> rotated_files("/nonexistent/tcpwatch.ndjson")
    []
    """
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.\d{8}T\d{6}\.\d{3}Z(\.gz)?$")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = sorted(n for n in names if pattern.match(n))
    return [os.path.join(os.path.dirname(path), n) for n in found]


# -------------------------------------------------------------------------------- log file


def _warn_stderr(message: str) -> None:
    print(f"tcpwatch: warning: {message}", file=sys.stderr, flush=True)


def _why(exc: OSError) -> str:
    """An OSError as the one line a user needs: "No space left on device (disk full)"."""
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (disk full)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += " (not writable)"
    return text


def _open_fd(path: str, truncate: bool) -> int:
    """Open PATH for appending lines; a file this creates gets mode 0640 (umask aside, as
    for any new file); a reused regular file is set to 0640 only when truncate is true."""
    # O_APPEND even on a file we truncate: if someone truncates it under us (logrotate's
    # copytruncate), the next line goes to the new end, not after a hole of zeros.
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_APPEND
    if truncate:
        flags |= os.O_TRUNC
    try:
        fd = os.open(path, flags | os.O_EXCL, LOG_MODE)
        created = True
    except FileExistsError:
        fd = os.open(path, flags, LOG_MODE)
        created = False
    try:
        # O_CREAT's mode only applies to a new file and is narrowed by the umask; set it on a
        # reused regular file too when we own its content. Never on a device or FIFO.
        if (created or truncate) and stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, LOG_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LogFile(NdjsonSink):
    """An NDJSON log file at `path`, rotated by `rotation`, reopened on request.

    Lines are buffered here and written with os.write(); a write that fails half-way (disk
    full) is cut back to the last complete line, so the file only ever holds whole lines. A
    record that cannot be written is counted in `unwritten` (and in the `unwritten` field
    of the `summary` record, when that one can be written); the trace goes on, and writing
    resumes, with a warning, as soon as the disk or the directory allows it.

    Every file starts with the `start` record (`part` 1, 2, ... after a rotation or reopen),
    so each file can be read on its own.

    >>> log = LogFile("/var/log/tcpwatch.ndjson", rotation=Rotation(size=100 << 20, keep=9))
    ...                                                                 # doctest: +SKIP
    >>> log.write(record); log.maybe_flush()                            # doctest: +SKIP
    >>> log.request_reopen()    # from a SIGHUP handler: done at the next flush  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str,
        flush_interval_s: float = 1.0,
        *,
        rotation: Rotation = NO_ROTATION,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        warn: Callable[[str], None] = _warn_stderr,
    ) -> None:
        self.path = path
        self.rotation = rotation
        self._clock = clock
        self._wall = wall
        self._warn = warn
        self._timer = FlushTimer(flush_interval_s, clock)
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._header: dict | None = None  # the `start` record, repeated atop each new file
        self._part = 1
        self._reopen = False
        self._failing: str | None = None  # why the last write failed, until one succeeds
        self._next_retry = 0.0
        self._rotate_blocked_until = 0.0
        self._last_ms = 0  # the time in the name of the last rotated file
        self._compressor = _Compressor(rotation, warn) if rotation.enabled else None
        self.unwritten = 0  # records counted and dropped: could not be written
        self.rotations = 0
        self._fd: int | None = _open_fd(path, truncate=True)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        if rotation.enabled and not self._regular:
            warn(f"{path} is not a regular file: not rotating it")
        self._new_file_state()

    # ------------------------------------------------------------------ writing

    def _new_file_state(self) -> None:
        self._file_bytes = 0  # written to the current file (whole lines only)
        self._file_records = 0  # records in the current file, written or buffered
        self._opened_at = self._clock()

    def write(self, record: dict) -> None:
        event = record.get("event")
        if event == "start" and self._header is None:
            self._header = record
        elif event == "summary" and self.unwritten:
            record = {**record, "unwritten": self.unwritten}  # counted up to now
        line = orjson.dumps(record, option=_DUMPS_OPT)
        if self._due_for_size(len(line)):
            self._rotate()
        self._append(line)

    def write_lines(self, data: bytes, count: int) -> None:
        """`count` records already serialised as whole NDJSON lines (the trace's fast path:
        `state` and `close_wait` records, never `start` or `summary`), buffered as one piece
        unless a size rotation falls among them."""
        size = self.rotation.size
        if size is not None and self._regular and (
            self._file_bytes + self._buf_bytes + len(data) > size
        ):  # a rotation may fall among these lines: line by line, as write() does
            for line in data.split(b"\n")[:-1]:
                line += b"\n"
                if self._due_for_size(len(line)):
                    self._rotate()
                self._append(line)
            return
        self._buf.append(data)
        self._buf_bytes += len(data)
        self._file_records += count
        self._timer.wrote()
        if self._buf_bytes >= BUFFER_BYTES:
            self._write_out()

    def _append(self, line: bytes) -> None:
        self._buf.append(line)
        self._buf_bytes += len(line)
        self._file_records += 1
        self._timer.wrote()
        if self._buf_bytes >= BUFFER_BYTES:
            self._write_out()

    def _due_for_size(self, extra: int) -> bool:
        """True when `extra` more bytes would take the file past rotation.size. A file
        holding only its header is never rotated: a line longer than the limit gets a file
        of its own rather than being split or dropped."""
        size = self.rotation.size
        return (
            size is not None
            and self._regular
            and self._file_records > (1 if self._header is not None else 0)
            and self._file_bytes + self._buf_bytes + extra > size
        )

    def _due_for_age(self, now: float) -> bool:
        age = self.rotation.age_s
        return (
            age is not None
            and self._regular
            and self._file_records > (1 if self._header is not None else 0)
            and now - self._opened_at >= age
        )

    def _write_out(self) -> None:
        """Write the buffer with os.write(); on failure keep whole lines only, count the rest."""
        if self._fd is None and not self._try_reopen():
            # A buffered piece may hold many lines (write_lines): count lines, not pieces.
            self._drop(sum(piece.count(b"\n") for piece in self._buf))
            self._buf.clear()
            self._buf_bytes = 0
            return
        if not self._buf:
            return
        data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
        self._buf.clear()
        self._buf_bytes = 0
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            whole = data.rfind(b"\n", 0, done) + 1
            if whole < done:  # part of a line reached the file: take it back
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._file_bytes + whole)
            self._file_bytes += whole
            self._drop(data.count(b"\n", whole))  # the lines that did not make it
            self._failed(exc)
            return
        self._file_bytes += done
        if self._failing is not None:
            self._warn(f"writing {self.path} again; {self.unwritten} records could not be "
                       "written so far")
            self._failing = None

    def _drop(self, count: int) -> None:
        self.unwritten += count

    def _failed(self, exc: OSError) -> None:
        why = _why(exc)
        if self._failing != why:
            self._warn(f"cannot write {self.path}: {why}; tracing goes on, records that "
                       "cannot be written are counted")
            self._failing = why

    def _try_reopen(self) -> bool:
        """Open PATH again after it could not be opened; at most once per REOPEN_RETRY_S."""
        now = self._clock()
        if now < self._next_retry:
            return False
        self._next_retry = now + REOPEN_RETRY_S
        return self._open_next(truncate=False)

    # ------------------------------------------------------------- flush, close

    def maybe_flush(self, now: float | None = None) -> None:
        """Reopen if asked, rotate by age if due, and flush about once per interval."""
        now = self._clock() if now is None else now
        if self._reopen:
            self._do_reopen()
        elif self._due_for_age(now):
            self._rotate()
        if self._timer.due(now):
            self._write_out()
            self._timer.flushed(now)

    def flush(self) -> None:
        if self._reopen:
            self._do_reopen()
        self._write_out()
        self._timer.flushed()

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._compressor is not None:
            self._compressor.close()
        if self.unwritten:
            self._warn(f"{self.unwritten} records could not be written to {self.path}")

    # ---------------------------------------------------------- rotate, reopen

    def request_reopen(self) -> None:
        """Ask for PATH to be reopened at the next flush (safe to call from a signal handler:
        it only sets a flag). After `logrotate` renamed the file, writing goes on in a new
        file at PATH, which starts with the header."""
        self._reopen = True

    def _do_reopen(self) -> None:
        self._reopen = False
        self._write_out()
        self._close_fd()
        self._open_next(truncate=False)

    def _rotate(self) -> None:
        """Finish the current file, rename it with its rotation time, start a new one."""
        if self._clock() < self._rotate_blocked_until:
            return
        self._write_out()
        self._close_fd()
        # Names must sort in rotation order: never reuse or go below the last one's ms.
        ms = max(int(self._wall() * 1000), self._last_ms + 1)
        target = rotated_name(self.path, ms / 1000)
        while os.path.exists(target) or os.path.exists(target + ".gz"):
            ms += 1  # taken (e.g. by an earlier run): the next millisecond
            target = rotated_name(self.path, ms / 1000)
        self._last_ms = ms
        try:
            os.rename(self.path, target)
        except OSError as exc:
            self._warn(f"cannot rotate {self.path}: {_why(exc)}; writing on to it, "
                       f"next try in {ROTATE_RETRY_S:.0f}s")
            self._rotate_blocked_until = self._clock() + ROTATE_RETRY_S
            self._open_next(truncate=False)
            return
        self.rotations += 1
        self._open_next(truncate=False)
        if self._compressor is not None:
            self._compressor.submit(target, self.path)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open_next(self, truncate: bool) -> bool:
        """Open PATH for the next part; write the header if the file is new (or empty)."""
        try:
            self._fd = _open_fd(self.path, truncate)
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._fd = None
            self._failed(exc)
            self._new_file_state()
            return False
        self._new_file_state()
        self._file_bytes = size
        if size == 0 and self._header is not None:
            # First in the new file, before any line still buffered for it.
            self._part += 1
            line = orjson.dumps({**self._header, "part": self._part}, option=_DUMPS_OPT)
            self._buf.insert(0, line)
            self._buf_bytes += len(line)
            self._file_records += 1
            self._timer.wrote()
        return True


class _Compressor:
    """Compresses rotated files with gzip in a background thread (the trace loop must not
    stop for seconds), then deletes all but the newest `keep` rotated files.

    The .gz is written to a temporary name and renamed when complete, so a reader never
    sees half a file under its final name.
    """

    def __init__(self, rotation: Rotation, warn: Callable[[str], None]) -> None:
        self.rotation = rotation
        self._warn = warn
        self._lock = threading.Lock()
        self._jobs: list[tuple[str, str]] = []
        self._thread: threading.Thread | None = None

    def submit(self, rotated: str, path: str) -> None:
        with self._lock:
            self._jobs.append((rotated, path))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="tcpwatch-compress", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                rotated, path = self._jobs.pop(0)
            if self.rotation.compress:
                self._compress(rotated)
            self._prune(path)

    def _compress(self, rotated: str) -> None:
        tmp = rotated + ".gz.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_MODE)
            os.fchmod(fd, LOG_MODE)
            with open(rotated, "rb") as src, os.fdopen(fd, "wb") as raw, gzip.GzipFile(
                filename=os.path.basename(rotated), mode="wb", fileobj=raw, compresslevel=6
            ) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.rename(tmp, rotated + ".gz")
            os.unlink(rotated)
        except OSError as exc:
            self._warn(f"cannot compress {rotated}: {_why(exc)}; left as it is")
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _prune(self, path: str) -> None:
        keep = self.rotation.keep
        if keep is None:
            return
        old = rotated_files(path)
        # A file and its .gz are one rotation: count stems.
        stems = sorted({f[:-3] if f.endswith(".gz") else f for f in old})
        for stem in stems[: max(0, len(stems) - keep)]:
            for name in (stem, stem + ".gz"):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    self._warn(f"cannot remove old log {name}: {_why(exc)}")

    def close(self, timeout_s: float = 60.0) -> None:
        """Wait for pending compression (bounded: tcpwatch must still exit)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)


def open_ndjson(
    path: str,
    flush_interval_s: float = 1.0,
    *,
    rotation: Rotation = NO_ROTATION,
    warn: Callable[[str], None] = _warn_stderr,
) -> LogFile:
    """A sink writing a new log at `path`: created (or truncated) with mode 0640.

    Raises OSError when PATH cannot be opened at all (the caller says so and exits).

    >>> sink = open_ndjson("/var/log/tcpwatch.ndjson", rotation=Rotation(size=100 << 20))
    ...                                                                 # doctest: +SKIP
    """
    return LogFile(path, flush_interval_s, rotation=rotation, warn=warn)

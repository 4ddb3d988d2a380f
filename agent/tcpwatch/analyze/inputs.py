"""Where `analyze` reads from: files, globs, .gz and .zst files, `-` for stdin.

Lines come in batches (lists of bytes, split from 1 MiB reads): cheap to loop over, and the
caller knows each line's number from the batch's first one. A line longer than MAX_LINE is
never held whole: it is skipped as it streams past and handed over as OVERLONG; the last
line of a file without its newline comes in a batch of its own marked `unterminated`.

>>> import io
>>> list(batches(io.BytesIO(b'{"a":1}\\n{"b":2}\\n{"c"')))
[(1, [b'{"a":1}', b'{"b":2}'], False), (3, [b'{"c"'], True)]
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple

import orjson

CHUNK = 1 << 20
MAX_LINE = 1 << 20  # longer lines are corrupt by definition: no record is this long


class _Overlong(bytes):
    """A stand-in for a line that was too long to keep (compared by identity)."""


OVERLONG = _Overlong(b"\0 line too long")  # not empty (empty lines are skipped), not JSON


class InputError(Exception):
    """A problem with one input, said in one line: skipped, the rest is read."""


class Source(NamedTuple):
    """One input: its name for messages ("-" is stdin) and how to open it."""

    name: str
    path: str | None  # None: stdin


def expand(args: list[str]) -> tuple[list[Source], list[str]]:
    """Command-line LOG arguments -> sources, and a message per argument that names nothing.

    A quoted glob is expanded here (the shell did not); "-" is stdin.

    >>> expand(["-"])
    ([Source(name='-', path=None)], [])
    >>> expand(["/nonexistent/*.ndjson"])[1]
    ['no file matches /nonexistent/*.ndjson']
    """
    out: list[Source] = []
    problems: list[str] = []
    for arg in args:
        if arg == "-":
            out.append(Source("-", None))
        elif os.path.exists(arg) or not glob.has_magic(arg):
            out.append(Source(arg, arg))
        else:
            matches = sorted(glob.glob(arg))
            if not matches:
                problems.append(f"no file matches {arg}")
            out.extend(Source(m, m) for m in matches)
    return out, problems


def open_source(src: Source) -> BinaryIO:
    """A binary stream of the decompressed bytes of `src` (by magic number, not name).

    Raises InputError for a missing, unreadable or unsupported file.
    """
    if src.path is None:
        return sys.stdin.buffer
    try:
        raw = open(src.path, "rb")  # noqa: SIM115 - returned, closed by the caller
    except OSError as exc:
        raise InputError(f"cannot read {src.name}: {exc.strerror}") from None
    try:
        magic = raw.peek(4)[:4]
    except OSError as exc:  # e.g. a directory on some systems
        raw.close()
        raise InputError(f"cannot read {src.name}: {exc.strerror}") from None
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise InputError(
                f"{src.name} is zstd-compressed: install the 'zstd' extra "
                "(pip install 'tcpwatch[zstd]') or decompress it (zstd -dc FILE | tcpwatch "
                "analyze -)"
            ) from None
        # Buffered: order_key() needs readline(), which zstandard's readers do not have.
        if hasattr(zstandard.ZstdDecompressor().decompressobj(), "eof"):
            return io.BufferedReader(_ZstdFrames(raw, zstandard), CHUNK)  # type: ignore
        # An old zstandard (no `eof`): every frame is read, but a cut is not noticed.
        return io.BufferedReader(  # type: ignore[arg-type]
            zstandard.ZstdDecompressor().stream_reader(raw, closefd=True,
                                                      read_across_frames=True),
            CHUNK,
        )
    return raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame of `raw`, end to end (a .zst file may hold
    several: `cat a.zst b.zst`, pzstd). EOFError when the data ends inside a frame, as gzip
    does for a file cut short: the lines before are kept and the damage is named.
    (zstandard's stream_reader() returns a silent end of file there.)"""

    def __init__(self, raw: BinaryIO, zstandard: Any) -> None:
        super().__init__()
        self._raw, self._zstd = raw, zstandard
        self._dobj: Any = None  # the decompressor of the current frame
        self._out = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._out:
            data = self._raw.read(CHUNK)
            if not data:
                if self._dobj is not None and not self._dobj.eof:
                    raise EOFError("zstd data ends inside a frame")
                return 0
            out = []
            while data:
                if self._dobj is None or self._dobj.eof:
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                out.append(self._dobj.decompress(data))
                data = self._dobj.unused_data if self._dobj.eof else b""
            self._out = memoryview(b"".join(out))
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


# Errors a compressed stream raises when it is cut short or damaged.
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
try:  # pragma: no cover - depends on the optional extra
    import zstandard as _zstd

    DECOMPRESS_ERRORS += (_zstd.ZstdError,)
except ImportError:
    pass


def batches(
    stream: BinaryIO, chunk: int = CHUNK, max_line: int = MAX_LINE
) -> Iterator[tuple[int, list[bytes], bool]]:
    """(number of the first line, lines without their newline, unterminated) per read.

    Over-long lines come as OVERLONG, counted as one line each.

    >>> import io
    >>> data = b"ab\\n" + b"x" * 50 + b"\\ncd\\n"
    >>> [(n, [x is OVERLONG or x for x in ls], u) for n, ls, u in batches(io.BytesIO(data), 8, 10)]
    [(1, [b'ab'], False), (2, [True], False), (3, [b'cd'], False)]
    """
    carry = b""
    skipping = False  # inside a line longer than max_line, dropping it as it comes
    lineno = 1
    read = stream.read
    while True:
        data = read(chunk)
        if not data:
            break
        if skipping:
            nl = data.find(b"\n")
            if nl < 0:
                continue
            data = data[nl + 1 :]
            skipping = False
            yield lineno, [OVERLONG], False
            lineno += 1
        lines = data.split(b"\n")
        if carry:
            lines[0] = carry + lines[0]
        carry = lines.pop()
        if len(carry) > max_line:
            carry, skipping = b"", True
        if lines:
            if len(lines[0]) > max_line:
                lines[0] = OVERLONG
            yield lineno, lines, False
            lineno += len(lines)
    if skipping:
        yield lineno, [OVERLONG], True
    elif carry:
        yield lineno, [carry], True


def order_key(src: Source) -> tuple[str, int, str]:
    """How files are ordered, oldest first: by the `ts` of their first record, then by its
    `part` (the files of one rotated log all start with the same `start` record), then name.

    >>> order_key(Source("x", "/nonexistent"))
    ('', 0, 'x')
    """
    if src.path is None:
        return ("", 0, src.name)
    try:
        stream = open_source(src)
    except InputError:
        return ("", 0, src.name)
    try:
        with stream:
            line = stream.readline(MAX_LINE)
        rec = orjson.loads(line)
    except (OSError, ValueError, *DECOMPRESS_ERRORS):
        return ("", 0, src.name)
    if not isinstance(rec, dict):
        return ("", 0, src.name)
    ts, part = rec.get("ts"), rec.get("part", 1)
    return (ts if isinstance(ts, str) else "", part if isinstance(part, int) else 0, src.name)


def feed_source(src: Source, feed_lines: Callable[[str, int, list[bytes], bool], bool],
                bad: Callable[[str, int, str], None], notes: list[str],
                files: list[str]) -> bool:
    """Open one source and hand its lines, in batches, to feed_lines(name, first line number,
    lines, last one unterminated) until that returns True (the reader is done: True is
    returned). A source that cannot be opened or read goes to `notes`; damaged compressed
    data is one bad line (`bad`) after the lines read before it. Nothing is raised."""
    try:
        stream = open_source(src)
    except InputError as exc:
        notes.append(str(exc))
        return False
    files.append(src.name)
    nextline = 1
    try:
        for lineno, lines, unterminated in batches(stream):
            nextline = lineno + len(lines)
            if feed_lines(src.name, lineno, lines, unterminated):
                return True
    except DECOMPRESS_ERRORS as exc:
        bad(src.name, nextline, f"compressed data cut short or damaged ({exc}); "
            "the lines before were read")
    except OSError as exc:
        notes.append(f"cannot read {src.name}: {exc.strerror or exc}")
    finally:
        if src.path is not None:
            stream.close()
    return False

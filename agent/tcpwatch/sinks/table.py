"""The terminal view of `tcpwatch trace`: one line per socket record, for a person reading live.

Columns are fixed so the eye can run down them. DUR is the time spent in the old state (for
a CW line: in CLOSE_WAIT; for a LEAK line: its age). EVENT starts with an upper-case word that
greps well: OLD>NEW for a transition, CW (left CLOSE_WAIT: outcome and closer), LEAK,
EXISTING (in CLOSE_WAIT before tracing started), LOST. Times are UTC to the second, like the
NDJSON log (which has microseconds). No line is wider than `width` (at most 100): an address
too long for its column loses its middle, never its port, and the optional end of EVENT
(closer, notes) is dropped before anything is cut.

TIME_UTC     PID COMM         LOCAL                 REMOTE                   DUR EVENT
05:13:00    4242 server       10.0.0.1:8080         10.0.0.2:51234        1.500s ESTAB>CLOSE_WAIT
05:13:30    4250 worker       10.0.0.1:8080         10.0.0.2:51234        30.00s LEAK eof-read rx=6
05:13:41    4242 server       10.0.0.1:8080         10.0.0.2:51234        41.00s CW closed by 4250
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable
from typing import NamedTuple, TextIO

import click

from tcpwatch.classify import ended_cause
from tcpwatch.sinks import BufferedSink, FlushTimer

MAX_WIDTH = 100
MIN_LAYOUT_WIDTH = 70  # narrower: laid out for 70, and the end of each line is cut
# "05:13:00"; pid_max 4194304; "12m05s"
TIME_W, PID_W, DUR_W = 8, 7, 6
# With -o the log has every record and the table is for a person: at most this many
# transition rows (and routine close_wait rows) a second; the rest are counted once a second.
ROWS_PER_S = 50


class Columns(NamedTuple):
    """Widths of the columns that give way on narrow terminals (the rest are fixed)."""

    comm: int
    addr: int
    event: int


# At 100 columns: comms in full (12 of at most 15 characters), IPv4 endpoints in full
# ("255.255.255.255:65535"), room for "CLOSE_WAIT>LAST_ACK".
FULL = Columns(comm=12, addr=21, event=19)
EVENT_GIVES, COMM_GIVES = 3, 4  # "ESTAB>CLOSE_WAIT" still fits, and 8 characters of comm


def columns(width: int) -> Columns:
    """Column widths for a terminal `width` wide. Narrower than 100, EVENT gives way first,
    then COMM, then the addresses, which matter most.

    >>> columns(100), columns(80)
    (Columns(comm=12, addr=21, event=19), Columns(comm=8, addr=14, event=17))
    """
    deficit = MAX_WIDTH - max(min(width, MAX_WIDTH), MIN_LAYOUT_WIDTH)
    event_cut = min(deficit, EVENT_GIVES)
    comm_cut = min(deficit - event_cut, COMM_GIVES)
    rest = deficit - event_cut - comm_cut
    addr_cut = (rest + 1) // 2  # both address columns shrink alike; an odd column goes to EVENT
    return Columns(
        FULL.comm - comm_cut, FULL.addr - addr_cut, FULL.event - event_cut + 2 * addr_cut - rest
    )


_SHORT_STATES = {"ESTABLISHED": "ESTAB"}  # as ss(8) says it; the rest are short enough


def human_secs(s: float, width: int = DUR_W, prefix: str = "") -> str:
    """Seconds for people, in at most `width` characters: as precise as the room allows.

    >>> [human_secs(x) for x in (0.0123, 12.3456, 123.45, 725, 3725, 450000)]
    ['0.012s', '12.35s', '123.5s', '12m05s', '1h02m', '125h']
    >>> human_secs(30.0, prefix=">"), human_secs(725, prefix=">")
    ('>30.0s', '>12m')
    """
    whole = int(s)
    candidates = []
    if s < 600:
        candidates += [f"{s:.3f}s", f"{s:.2f}s", f"{s:.1f}s", f"{whole}s"]
    elif s < 3600:
        candidates += [f"{whole // 60}m{whole % 60:02d}s", f"{whole // 60}m"]
    candidates += [f"{whole // 3600}h{whole % 3600 // 60:02d}m", f"{whole // 3600}h"]
    for text in candidates:
        if len(prefix) + len(text) <= width:
            return prefix + text
    return (prefix + candidates[-1])[:width]


def clean(text: object) -> str:
    """Printable ASCII only: a comm or warning must not move the cursor or widen a column.

    >>> clean("evil\\x1b[2J"), clean(None)
    ('evil?[2J', '-')
    """
    if text is None:
        return "-"
    text = str(text)
    if text.isascii() and text.isprintable():  # the usual case, checked in C
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _elide(addr: str, room: int) -> str:
    """Keep whole groups from both ends of an address, joined by "..", within `room` chars.

    The host end is taken first: it tells machines in one subnet apart.

    >>> _elide("2001:db8:85a3::8a2e:370:7334", 18), _elide("192.168.100.200", 12)
    ('2001:db8..370:7334', '192..100.200')
    """
    sep = ":" if ":" in addr else "."
    parts = addr.split(sep)
    head: list[str] = []
    tail: list[str] = []
    used = 2  # ".."
    lo, hi = 0, len(parts) - 1
    take_tail = True
    while lo <= hi:
        side = tail if take_tail else head
        piece = parts[hi] if take_tail else parts[lo]
        need = len(piece) + (1 if side else 0)
        if used + need > room:
            break
        used += need
        if take_tail:
            tail.insert(0, piece)
            hi -= 1
        else:
            head.append(piece)
            lo += 1
        take_tail = not take_tail
    if not tail:  # not even one group fits: cut characters
        return addr[: max(room - 2, 0)] + ".."
    return sep.join(head) + ".." + sep.join(tail)


def endpoint(addr: object, port: object, width: int) -> str:
    """"addr:port" within `width` columns; IPv6 in brackets, v4-mapped shown as IPv4.

    The port always survives: with the program it is what an on-call engineer looks for.

    >>> endpoint("10.0.0.1", 8080, 21), endpoint("::ffff:10.0.0.1", 80, 21)
    ('10.0.0.1:8080', '10.0.0.1:80')
    >>> endpoint("2001:db8:85a3:8d3:1319:8a2e:370:7348", 443, 21)
    '[2001..370:7348]:443'
    """
    text, portx = clean(addr), f":{clean(port)}"
    if text.startswith("::ffff:") and "." in text:
        text = text[7:]
    v6 = ":" in text
    full = f"[{text}]{portx}" if v6 else f"{text}{portx}"
    if len(full) <= width:
        return full
    room = width - len(portx) - (2 if v6 else 0)
    short = _elide(text, room) if room >= 4 else ""
    return (f"[{short}]{portx}" if v6 else f"{short}{portx}")[-width:]


def fit(parts: list, room: int) -> str:
    """The first part, then each further part that still fits, within `room` columns.

    A part may be a tuple of alternatives, longest first: the first that fits is used.

    >>> fit(["CW closed", ("by 4250/worker", "by 4250"), "eof-read"], 19)
    'CW closed by 4250'
    """
    out = parts[0]
    for part in parts[1:]:
        for alt in part if isinstance(part, tuple) else (part,):
            if len(out) + 1 + len(alt) <= room:
                out += " " + alt
                break
    return out[:room]


class TableSink(BufferedSink):
    """Records -> aligned text lines on `stream` (a terminal, usually).

    color: leaks in bold red, pre-existing CLOSE_WAIT and lost events in yellow (click.style).
    width: the terminal width; capped at 100. Nothing is drawn for records it does not know.

    rows_per_s (with `trace -o`, where the log file has everything): show at most this many
    rows a second of transitions and of routine CLOSE_WAIT exits (cause `closed`, not
    leaked); the others are counted and said once a second ("... 1234 transitions not
    shown (all in `elsewhere`)"). Leaks, other CLOSE_WAIT exits, existing, lost, start and
    summary always show. Without it, every record is shown.

    >>> import io; out = io.StringIO()
    >>> TableSink(out, color=False).write({"event": "summary", "events": 9, "leaks": 1,
    ...     "lost": 0, "close_waits": 2, "elapsed_s": 31.0})
    >>> out.getvalue()
    '9 events, 1 leaks, 0 lost (2 left CLOSE_WAIT, 31.00s traced)\\n'
    """

    def __init__(
        self,
        stream: TextIO,
        color: bool,
        width: int = MAX_WIDTH,
        *,
        flush_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        rows_per_s: int | None = None,
        elsewhere: str | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
        self._color = color
        self.width = max(1, min(width, MAX_WIDTH))
        self._cols = columns(self.width)
        self._timer = FlushTimer(flush_interval_s, clock)
        self._header_done = False
        # Rate limit (rows_per_s): rows left in the current one-second window, and what was
        # not shown in it (transitions, routine closes).
        self.limited = rows_per_s is not None
        self._limit = rows_per_s or 0
        self._clock = clock
        self._wall = wall
        self._elsewhere = elsewhere
        self._window_end = clock() + 1.0
        self._room = self._limit
        self._hidden_states = 0
        self._hidden_closes = 0
        self._render = {
            "start": self._start,
            "state": self._state,
            "close_wait": self._close_wait,
            "leak": self._leak,
            "existing": self._existing,
            "lost": self._lost,
            "summary": self._summary,
        }

    # ------------------------------------------------------------- plumbing

    def write(self, record: dict) -> None:
        event = record.get("event")
        render = self._render.get(event)
        if render is None:
            return
        if self.limited and (
            event == "state" or (event == "close_wait" and routine_close(record))
        ):
            if self._room <= 0:
                self.not_shown(*((1, 0) if event == "state" else (0, 1)))
                return
            self._room -= 1
        render(record)

    def state_room(self, now: float | None = None) -> int:
        """How many more transition or routine-close rows this second shows (the trace's fast
        path builds records only for those); unlimited without rows_per_s."""
        if not self.limited:
            return sys.maxsize
        self._roll(self._clock() if now is None else now)
        return self._room

    def not_shown(self, states: int, closes: int = 0) -> None:
        """Rows the caller did not hand over because state_room() said there was no room."""
        self._hidden_states += states
        self._hidden_closes += closes

    def maybe_flush(self, now: float | None = None) -> None:
        if self.limited:
            self._roll(self._clock() if now is None else now)
        super().maybe_flush(now)

    def close(self) -> None:
        self._report_hidden()
        self.flush()  # never closes the stream: it is the terminal, owned by the caller

    def _roll(self, now: float) -> None:
        if now >= self._window_end:
            self._report_hidden()
            self._window_end = now + 1.0
            self._room = self._limit

    def _report_hidden(self) -> None:
        states, closes = self._hidden_states, self._hidden_closes
        if not (states or closes):
            return
        self._hidden_states = self._hidden_closes = 0
        what = [f"{states} transitions"] if states else []
        if closes:
            what.append(f"{closes} routine CLOSE_WAIT exits")
        where = f" (all in {clean(self._elsewhere)})" if self._elsewhere else ""
        self._ensure_header()
        stamp = time.strftime("%H:%M:%S", time.gmtime(self._wall()))
        self._emit(f"{stamp:<{TIME_W}} ... {' and '.join(what)} not shown{where}", dim=True)

    def _emit(self, line: str, **style: object) -> None:
        line = line[: self.width].rstrip()  # measured before styling: escapes take no columns
        if self._color and style:
            line = click.style(line, **style)
        self._stream.write(line + "\n")
        self._timer.wrote()

    # ---------------------------------------------------------------- lines

    def header(self) -> str:
        aw, cw = self._cols.addr, self._cols.comm
        return (
            f"{'TIME_UTC':<{TIME_W}} {'PID':>{PID_W}} {'COMM':<{cw}} "
            f"{'LOCAL':<{aw}} {'REMOTE':<{aw}} {'DUR':>{DUR_W}} EVENT"
        )

    def _ensure_header(self) -> None:
        if not self._header_done:
            self._header_done = True
            self._emit(self.header(), bold=True)

    def _row(self, rec: dict, dur: str, event_parts: list, **style: object) -> None:
        self._ensure_header()
        aw, cw = self._cols.addr, self._cols.comm
        pid = "-" if rec.get("pid") is None else str(rec["pid"])
        line = (
            f"{_clock(rec):<{TIME_W}} {pid:>{PID_W}} {clean(rec.get('comm'))[:cw]:<{cw}} "
            f"{endpoint(rec.get('laddr'), rec.get('lport'), aw):<{aw}} "
            f"{endpoint(rec.get('raddr'), rec.get('rport'), aw):<{aw}} "
            f"{dur:>{DUR_W}} {fit(event_parts, self._cols.event)}"
        )
        self._emit(line, **style)

    def _state(self, rec: dict) -> None:
        old = _SHORT_STATES.get(rec["old"], rec["old"])
        new = _SHORT_STATES.get(rec["new"], rec["new"])
        self._row(rec, _dur(rec.get("duration_s")), [clean(f"{old}>{new}")])

    def _close_wait(self, rec: dict) -> None:
        # The cause (e.g. slow_close) says more than the bare outcome when it is known.
        parts: list = [f"CW {clean(rec.get('cause') or rec['outcome'])}"]
        closer = rec.get("closer_pid")
        if closer is not None and closer != rec.get("pid"):
            # A different closer: typically a forked child that held the last descriptor.
            parts.append((f"by {closer}/{clean(rec.get('closer_comm'))}", f"by {closer}"))
        self._row(rec, _dur(rec.get("duration_s")), parts)

    def _leak(self, rec: dict) -> None:
        # A pre-existing socket is at least this old: it was in CLOSE_WAIT before we looked.
        age = human_secs(rec["age_s"], prefix=">" if rec.get("preexisting") else "")
        self._row(rec, age, ["LEAK", *_socket_notes(rec)], fg="red", bold=True)

    def _existing(self, rec: dict) -> None:
        self._row(rec, "", ["EXISTING CW", *_socket_notes(rec)], fg="yellow")

    def _lost(self, rec: dict) -> None:
        self._ensure_header()
        self._emit(
            f"{_clock(rec):<{TIME_W}} LOST {rec['count']} events ({rec['total']} total): "
            "the kernel buffer was full, this trace has gaps",
            fg="yellow",
            bold=True,
        )

    def _start(self, rec: dict) -> None:
        hooks = rec.get("hooks") or {}
        on = [clean(k) for k, v in hooks.items() if v]
        off = [clean(k) for k, v in hooks.items() if not v]
        lines = [
            f"tcpwatch {clean(rec.get('version'))} on {clean(rec.get('hostname'))} "
            f"(kernel {clean(rec.get('kernel'))}): LEAK after "
            f"{_setting_secs(rec.get('leak_after_s') or 0)} in CLOSE_WAIT; times are UTC",
            f"hooks: {' '.join(on) or 'none'}" + (f"; off: {' '.join(off)}" if off else ""),
        ]
        described = _describe(rec.get("filters") or {})
        if described:  # say nothing rather than an empty "filters:" line
            lines.append(f"filters: {described}")
        for line in lines:
            self._wrapped(line)
        for warning in rec.get("warnings") or []:
            self._wrapped(f"warning: {clean(warning)}", fg="yellow")
        self._ensure_header()

    def _wrapped(self, text: str, **style: object) -> None:
        for line in textwrap.wrap(text, self.width, subsequent_indent="  ") or [""]:
            self._emit(line, **style)

    def _summary(self, rec: dict) -> None:
        self._report_hidden()
        bad = rec["leaks"] or rec["lost"]
        peak = rec.get("buffer_peak_pct")
        self._emit(
            f"{rec['events']} events, {rec['leaks']} leaks, {rec['lost']} lost "
            f"({rec.get('close_waits', 0)} left CLOSE_WAIT, "
            f"{human_secs(rec.get('elapsed_s') or 0)} traced"
            + ("" if peak is None else f", kernel buffer at most {peak:g}% full") + ")",
            bold=True,
            fg="red" if bad else None,
        )


def routine_close(rec: dict) -> bool:
    """A `close_wait` record of a healthy close: cause `closed` (close() soon after the FIN),
    never leaked. With `trace -o` these are rate-limited on screen like transitions.

    >>> routine_close({"cause": "closed", "leaked": False}), routine_close({"cause": "reset"})
    (True, False)
    """
    if rec.get("leaked"):
        return False
    cause = rec.get("cause")
    if cause is None:
        cause = ended_cause(rec.get("outcome") or "unknown", rec.get("duration_s"))
    return cause == "closed"


def _clock(rec: dict) -> str:
    """"05:13:00" from the record's ts "2026-11-21T05:13:00.123456Z" (UTC, as logged)."""
    return clean(rec.get("ts"))[11:19]


def _setting_secs(seconds: float) -> str:
    """A setting as the user typed it: 30.0 -> "30s", 0.5 -> "0.500s"."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else human_secs(seconds)


def _dur(seconds: float | None) -> str:
    return "?" if seconds is None else human_secs(seconds)


def _socket_notes(rec: dict) -> list[str]:
    """What a LEAK or EXISTING line adds, most telling first."""
    notes = []
    if rec.get("cause"):
        notes.append(clean(rec["cause"]))  # classify.py's verdict, e.g. eof_ignored
    else:
        if rec.get("inode") == 0:
            notes.append("unaccepted")  # in the listener's accept queue: backlog too large
        if rec.get("eof_read"):
            notes.append("eof-read")  # the program saw EOF and still did not close
    if rec.get("rx_queue"):
        notes.append(f"rx={rec['rx_queue']}")  # unread bytes
    holders = rec.get("holders") or []
    if len(holders) > 1:
        notes.append(f"{len(holders)} holders")
    return notes


def _describe(filters: object) -> str:
    """{"pid": [812], "port": []} -> "pid=812"; a list or text is shown as it is."""
    if isinstance(filters, dict):
        shown = []
        for key, value in filters.items():
            if value in (None, [], (), "", False):
                continue
            if isinstance(value, (list, tuple, set)):
                value = ",".join(str(v) for v in value)
            shown.append(f"{key}={value}")
        return clean(" ".join(shown))
    if isinstance(filters, (list, tuple)):
        return clean(" ".join(str(f) for f in filters))
    return clean(filters)

"""`tcpwatch top --replay LOG... [--at TIME]`: the leaderboard as it was at a moment of a log.

A `Replayer` streams NDJSON records written by `tcpwatch trace -o` (read with analyze's
inputs: files, globs, .gz/.zst, stdin) up to the time T, and keeps only what a live top
would hold at T: the sockets in CLOSE_WAIT (`state` records entering it, `existing` records,
`leak` records adding holders, unread bytes and cause, `close_wait` records ending them), the
entries and exits of the window before T, state records per millisecond of that window, the
FIN_WAIT2 sockets, and the lost-event total. `sample()` then gives a `model.Sample` like the
live collectors', with ages relative to T, for model.build_rows and the view.

What the log does not have is left unknown (None, '-' on screen), never made up: host-wide
counts of states other than CLOSE_WAIT, ephemeral ports, port exhaustion, cgroups, and the
cause of a socket before its first `leak` (or `existing`) record, which is where the log
records the /proc signals.

>>> r = Replayer(window_s=10.0)
>>> r.feed_lines("demo", 1, [
...   b'{"event":"start","ts":"2026-11-21T05:13:00.000000Z","v":1,"hostname":"web-1",'
...   b'"pid":1,"leak_after_s":30.0}',
...   b'{"event":"state","ts":"2026-11-21T05:13:01.000000Z","sk":"0x1","laddr":"10.0.0.1",'
...   b'"lport":8080,"raddr":"10.0.0.2","rport":50000,"pid":7,"comm":"api",'
...   b'"old":"ESTABLISHED","new":"CLOSE_WAIT","owner":"socket"}',
...   b'{"event":"summary","ts":"2026-11-21T05:13:41.000000Z"}'], False)
False
>>> s = r.sample()
>>> [(x.pid, x.comm, x.age_s, x.leaked, x.cause) for x in s.sockets], s.ts, s.mode
([(7, 'api', 40.0, True, 'unknown')], '2026-11-21T05:13:41.000000Z', 'replay')
"""

from __future__ import annotations

import io
import os
import re
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from tcpwatch.analyze import inputs
from tcpwatch.analyze.engine import (
    CORRUPT_EXAMPLES,
    UNTIL_SLACK_S,
    IncompatibleLog,
    _is_json,
    _reason,
    check_version,
    run_of,
)
from tcpwatch.analyze.timeparse import epoch, parse_when, stamp
from tcpwatch.classify import SLOW_CLOSE_S, ended_cause, stuck_cause
from tcpwatch.top.hostinfo import PeerWait, endpoint
from tcpwatch.top.model import CwSock, Ended, Entered, Host, Sample

CW = "CLOSE_WAIT"
FW2 = "FIN_WAIT2"
DEFAULT_LEAK_AFTER_S = 30.0  # when neither --leak-after nor the log's start record says
NO_CGROUP = "?"  # the log does not record cgroups (and today's /proc is not the log's)
TAIL = 4 << 20  # bytes read from the end of a plain file to find its last record
SIGNALS = ["leak and existing records of the log; unknown before a socket's first one"]
NOT_IN_LOG = ["states other than CLOSE_WAIT", "ephemeral ports in use",
              "ip_local_port_range", "port_risk", "cgroup"]


class ReplayError(Exception):
    """Why the replay cannot be drawn, in one line (e.g. T outside the log)."""


class At(NamedTuple):
    """--at, parsed. kind: 'time' (value: epoch seconds), 'before_end' or 'after_start'
    (value: seconds from the end or the start of the log)."""

    kind: str
    value: float
    text: str


_AGE = re.compile(r"^([+-]?)(\d+(?:\.\d+)?[smhdw])$")


def parse_at(text: str) -> At:
    """--at TIME: RFC 3339 (no offset means UTC, as analyze --since/--until), an age before
    the end of the log ("30s", "5m"; "-5m" too), or "+AGE" after its start.
    ValueError with a message for the user.

    >>> parse_at("2026-11-21T05:13:00Z").value, parse_at("90s"), parse_at("+1m").value
    (1795237980.0, At(kind='before_end', value=90.0, text='90s'), 60.0)
    """
    text = text.strip()
    m = _AGE.match(text)
    if m:
        seconds = -parse_when(m.group(2), now=0.0)
        return At("after_start" if m.group(1) == "+" else "before_end", seconds, text)
    try:
        return At("time", parse_when(text), text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use RFC 3339 (2026-11-21T05:13:00Z), an age before the "
            "end of the log (30s, 5m, 2h) or +AGE after its start (+90s)"
        ) from None


def log_end(sources: Iterable[inputs.Source]) -> str | None:
    """The `ts` of the last record of the files (the newest of their last records), for an
    --at counted back from the end. Plain files: only their tail is read; compressed ones
    are decompressed once. Unreadable files are skipped (the replay itself names them)."""
    end = None
    for src in sources:
        if src.path is None:
            continue
        ts = _last_ts(src)
        if ts is not None and (end is None or ts > end):
            end = ts
    return end


def _last_ts(src: inputs.Source) -> str | None:
    try:
        stream = inputs.open_source(src)
    except inputs.InputError:
        return None
    try:
        with stream:
            if isinstance(getattr(stream, "raw", None), io.FileIO):  # plain: seek to the tail
                size = os.fstat(stream.fileno()).st_size
                if size > TAIL:
                    stream.seek(size - TAIL)
                    ts = _last_in(stream.read().split(b"\n")[1:])  # [0]: part of a line
                    if ts is not None:
                        return ts
                    stream.seek(0)
            found = None
            for _, lines, _ in inputs.batches(stream):
                found = _last_in(lines) or found
            return found
    except (OSError, *inputs.DECOMPRESS_ERRORS):
        return None


def _last_in(lines: list[bytes]) -> str | None:
    for line in reversed(lines):
        try:
            rec = orjson.loads(line)
        except (orjson.JSONDecodeError, TypeError):
            continue
        ts = rec.get("ts") if isinstance(rec, dict) else None
        if _good_ts(ts):
            return ts
    return None


def _good_ts(ts: Any) -> bool:
    """A record time as tcpwatch writes them: "2026-11-21T05:13:00.123456Z"."""
    return type(ts) is str and len(ts) == 27 and ts[10] == "T" and ts[26] == "Z"


def _number(x: Any) -> bool:
    return type(x) in (int, float)


class _Sock:
    """One socket in CLOSE_WAIT at the current point of the log."""

    __slots__ = ("host", "sk", "laddr", "lport", "raddr", "rport", "t0", "since", "seen",
                 "pid", "comm", "how", "unread", "cause")

    def __init__(self, host: str, rec: dict, ts: str, since: float | None, seen: float) -> None:
        self.host = host
        self.sk = rec.get("sk")
        self.laddr, self.lport = rec["laddr"], rec["lport"]
        self.raddr, self.rport = rec["raddr"], rec["rport"]
        self.t0 = ts  # the record it was first seen in (later ones about it are not late)
        self.since = since  # epoch seconds it entered CLOSE_WAIT; None: before tracing
        self.seen = seen  # first seen by the tracer: its age is at least T - seen
        self.pid, self.comm = rec.get("pid"), rec.get("comm")
        self.how = rec.get("owner")  # how the kernel learnt pid: "socket", "listener", None
        self.unread: int | None = None  # rx_queue of its last leak/existing record
        self.cause: str | None = None  # cause of its last leak/existing record

    def tuple_key(self) -> tuple:
        return (self.host, self.laddr, self.lport, self.raddr, self.rport)

    def learn(self, rec: dict) -> None:
        """What a `leak` or `existing` record says: the holder (else owner) trace named,
        unread bytes and the cause, as of that record."""
        if rec.get("pid") is not None:
            self.pid, self.comm = rec["pid"], rec.get("comm")
        if rec.get("sk") is not None:
            self.sk = rec["sk"]
        rx = rec.get("rx_queue")
        if type(rx) is int:
            self.unread = rx
        self.cause = rec.get("cause") or _recorded_cause(rec) or self.cause


def _recorded_cause(rec: dict) -> str | None:
    """The stuck cause from a record's /proc fields, for records without `cause` (`existing`
    records, older logs). rx_queue there is unread *data*: > 0 means the FIN is unread too;
    0 cannot tell a consumed FIN from an unread one, so it gives no verdict (None)."""
    rx = rec.get("rx_queue")
    raw = rx + 1 if type(rx) is int and rx > 0 else None
    cause = stuck_cause(inode=rec.get("inode"), rx_queue=raw, holders=None, owner=None,
                        eof_read=bool(rec.get("eof_read")))
    return None if cause == "unknown" else cause


class Replayer:
    """Feed it batches of lines (feed_lines) or sources (run); sample() gives the frame at T.

    at: T in epoch seconds; None with `after_start` None too: the end of the log (the last
    record read). after_start: T is this many seconds after the log's first record.
    leak_after_s: None for the log's own threshold (its start record's `leak_after_s`).
    """

    def __init__(self, at: float | None = None, *, after_start: float | None = None,
                 window_s: float = 10.0, leak_after_s: float | None = None,
                 slow_close_s: float = SLOW_CLOSE_S, label: str | None = None) -> None:
        self.window_s = window_s
        self.label = label  # --at as the user wrote it, for messages
        self.slow_close_s = slow_close_s
        self._leak_after_given = leak_after_s is not None
        self.leak_after = leak_after_s if leak_after_s is not None else DEFAULT_LEAK_AFTER_S
        self._after_start = after_start
        self.at: float | None = None
        self._at_ts: str | None = None
        self._stop_ts = ""
        self._lo_ts = ""  # records before T - window only build up state
        if at is not None:
            self._set_at(at)
        # reading
        self.files: list[str] = []
        self.notes: list[str] = []
        self.records = 0
        self.corrupt = 0
        self.corrupt_examples: list[str] = []
        self.first_ts: str | None = None
        self.last_ts: str | None = None  # the last record used (at or before T)
        self.max_ts: str | None = None  # the newest record seen, T or not
        # the runs of tcpwatch in the log
        self.runs = 0
        self._run: tuple | None = None
        self.host = ""
        self.hostnames: list[str] = []  # every host whose log was read
        self.run_start: str | None = None
        self.run_ended: str | None = None  # its summary record: tcpwatch stopped
        self.hooks: dict = {}
        self.log_warnings: list[str] = []
        self.fw2_known = True  # the log has FIN_WAIT2 transitions (no --state filter)
        # what top would hold at the current point of the log
        self.open: dict[tuple, _Sock] = {}  # (host, sk) -> socket in CLOSE_WAIT
        self.by_tuple: dict[tuple, _Sock] = {}  # `existing` sockets whose sk is not known yet
        self._gap: dict[tuple, _Sock] = {}  # open when a new run started: seen again?
        self.fw2: dict[tuple, tuple[str, str]] = {}  # (host, sk) -> (remote, since ts)
        self.entered: deque[tuple[str, tuple, Entered]] = deque()
        self.ended: deque[tuple[str, tuple, Ended]] = deque()
        self._per_ms: deque[list] = deque()  # [ts[:23], state records in that millisecond]
        self.lost = 0
        self.untracked = 0  # sockets whose exit from CLOSE_WAIT is not in the log
        self.partial: int | None = None  # the input starts with this part (> 1) of a run
        self._handlers = {
            "close_wait": self._close_wait, "leak": self._leak,
            "existing": self._existing, "start": self._start, "lost": self._lost,
            "summary": self._summary,
        }

    def _set_at(self, at: float) -> None:
        self.at = at
        self._at_ts = stamp(at)
        self._stop_ts = stamp(at + UNTIL_SLACK_S)  # records are time-ordered to within this
        self._lo_ts = stamp(at - self.window_s)

    # ---------------------------------------------------------------- reading

    def run(self, sources: Iterable[inputs.Source]) -> None:
        """Read every source in order, each until past T (unreadable ones are noted). Every
        source is opened: another host's log, or another run's, may cover T too."""
        for src in sources:
            self.read(src)

    def read(self, src: inputs.Source) -> bool:
        """Read one source; True when it was left unfinished (past T)."""
        return inputs.feed_source(src, self.feed_lines, self._bad, self.notes, self.files)

    def feed_lines(self, name: str, first: int, lines: list[bytes], unterminated: bool) -> bool:
        """One batch of lines (the first is line `first` of `name`); True when past T.

        Most records are `state` ones about sockets that are neither in CLOSE_WAIT nor in
        FIN_WAIT2: they are counted (events/s) and take no other path."""
        loads = orjson.loads
        handlers = self._handlers
        at_ts, stop_ts, lo_ts = self._at_ts, self._stop_ts, self._lo_ts
        open_socks, fw2, gap, per_ms = self.open, self.fw2, self._gap, self._per_ms
        host = self.host
        begun = self.first_ts is not None
        top, last, used = self.max_ts or "", self.last_ts or "", 0
        stop = False
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                rec = loads(line)
                event = rec["event"]
                ts = rec["ts"]
                if ts.__class__ is not str or len(ts) != 27 or ts[26] != "Z" or ts[10] != "T":
                    raise ValueError(f"'ts' is not an RFC 3339 UTC time: {ts!r}")
                if not begun:
                    part = rec.get("part") if event == "start" else None
                    if type(part) is int and part > 1 and self.partial is None:
                        # A later file of a rotated log without the earlier ones: its header
                        # repeats the run's start time; the log starts with its next record.
                        self.partial = part
                    else:
                        self._begin(ts)
                        begun = True
                        at_ts, stop_ts, lo_ts = self._at_ts, self._stop_ts, self._lo_ts
                if ts > top:
                    top = ts
                if at_ts is not None and ts > at_ts:
                    if ts > stop_ts:
                        stop = True
                        break
                    continue
                if event == "state":
                    old, new, sk = rec["old"], rec["new"], rec["sk"]
                    if ts >= lo_ts:  # events/s: state records per millisecond of the window
                        ms = ts[:23]
                        if per_ms and per_ms[-1][0] == ms:
                            per_ms[-1][1] += 1
                        else:
                            per_ms.append([ms, 1])
                    if gap:
                        self._end_gap()
                    key = (host, sk)
                    if new in (CW, FW2) or key in open_socks or key in fw2:
                        self._state(rec, ts, old, new, key)
                else:
                    handler = handlers.get(event)
                    if handler is not None:  # unknown kinds are ignored (docs/ndjson.md)
                        if gap and event != "start" and event != "existing":
                            self._end_gap()
                        handler(rec, ts, name, first + i)
                        host = self.host
                used += 1
                if ts > last:
                    last = ts
            except (IncompatibleLog, ReplayError):
                raise
            except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                self._bad(name, first + i, _reason(exc, line, rec_ok=_is_json(line),
                                                   unterminated=unterminated))
        self.records += used
        self.max_ts = top or None
        self.last_ts = last or None
        if self.at is None:
            self._prune()
        return stop

    def _begin(self, ts: str) -> None:
        """The first record: an --at relative to the start is resolved, and T checked."""
        self.first_ts = ts
        if self._after_start is not None:
            self._set_at(epoch(ts) + self._after_start)
        if self._at_ts is not None and self._at_ts < ts:
            raise ReplayError(f"{self._at_text()} is before the log starts ({ts})")

    def _at_text(self) -> str:
        if self.label and self.label != self._at_ts:
            return f"--at {self.label} ({self._at_ts})"
        return f"--at {self._at_ts}"

    def _prune(self) -> None:
        """T is the end of the log, not known yet: keep only the last window (and a second
        for records slightly out of order) of entries, exits and state counts."""
        if self.last_ts is None:
            return
        cutoff = stamp(epoch(self.last_ts) - self.window_s - 1.0)
        for window in (self.entered, self.ended):
            while window and window[0][0] < cutoff:
                window.popleft()
        ms = cutoff[:23]
        while self._per_ms and self._per_ms[0][0] < ms:
            self._per_ms.popleft()

    def _bad(self, name: str, lineno: int, reason: str) -> None:
        self.corrupt += 1
        if len(self.corrupt_examples) < CORRUPT_EXAMPLES:
            self.corrupt_examples.append(f"{name}:{lineno}: {reason}")

    # ---------------------------------------------------------------- records

    def _state(self, rec: dict, ts: str, old: str, new: str, key: tuple) -> None:
        """A transition entering CLOSE_WAIT or FIN_WAIT2, or of a socket tracked in one."""
        if new == CW:
            self._enter(rec, ts, key)
        elif old != CW and key in self.open and ts >= self.open[key].t0:
            # Moving between other states while tracked in CLOSE_WAIT: its exit was lost (or
            # the struct sock was reused). An *older* record is only late: left alone.
            del self.open[key]
            self.untracked += 1
        if self.fw2_known:
            if new == FW2:
                self.fw2[key] = (endpoint(rec["raddr"], rec["rport"]), ts)
            elif key in self.fw2 and ts >= self.fw2[key][1]:
                del self.fw2[key]

    def _enter(self, rec: dict, ts: str, key: tuple) -> None:
        t = epoch(ts)
        s = _Sock(self.host, rec, ts, t, t)
        if self.by_tuple:  # the kernel's report of a pre-existing socket: its time wins
            self.by_tuple.pop(s.tuple_key(), None)
        if key in self.open:
            self.untracked += 1
        self.open[key] = s
        if ts >= self._lo_ts:
            self.entered.append((ts, key, Entered(s.pid, s.comm, NO_CGROUP, s.lport, s.raddr,
                                                  s.rport)))

    def _find(self, rec: dict) -> _Sock | None:
        """The tracked socket a record is about (removed from where it was kept)."""
        sk = rec.get("sk")
        if sk is not None:
            s = self.open.pop((self.host, sk), None)
            if s is not None:
                return s
        if not self.by_tuple:
            return None
        return self.by_tuple.pop(
            (self.host, rec["laddr"], rec["lport"], rec["raddr"], rec["rport"]), None)

    def _keep(self, s: _Sock) -> None:
        if s.sk is not None:
            self.open[(s.host, s.sk)] = s
        else:
            self.by_tuple[s.tuple_key()] = s

    def _close_wait(self, rec: dict, ts: str, name: str, lineno: int) -> None:
        duration, outcome = rec["duration_s"], rec.get("outcome")
        lport, raddr, rport = rec["lport"], rec["raddr"], rec["rport"]
        if duration is not None and not _number(duration):
            raise TypeError(f"duration_s is {duration!r}")
        s = self._find(rec)
        if s is not None and s.pid is not None:  # the process it was charged to while stuck
            pid, comm = s.pid, s.comm
        else:
            pid, comm = rec["pid"], rec["comm"]
        if outcome is None:
            cause = rec.get("cause") or "unknown"
        else:  # as live top: judged with --slow-close and the leak threshold in use
            leaked = bool(rec.get("leaked")) or (duration is not None
                                                 and duration >= self.leak_after)
            cause = ended_cause(outcome, duration, leaked, self.slow_close_s)
        if ts >= self._lo_ts:
            key = (self.host, rec["sk"] if rec["sk"] is not None else (s.sk if s else None))
            self.ended.append((ts, key, Ended(pid, comm, NO_CGROUP, lport, raddr, rport,
                                              duration, cause)))

    def _leak(self, rec: dict, ts: str, name: str, lineno: int) -> None:
        age, since = rec.get("age_s"), rec.get("since")
        t = epoch(ts)
        since_s = epoch(since) if _good_ts(since) else None
        s = self._find(rec)
        if s is None:  # in CLOSE_WAIT since before the log (or its entry was lost)
            s = _Sock(self.host, rec, ts, since_s, t - age if _number(age) else t)
        s.learn(rec)
        self._keep(s)

    def _existing(self, rec: dict, ts: str, name: str, lineno: int) -> None:
        t = epoch(ts)
        s = _Sock(self.host, rec, ts, None, t)
        earlier = self._gap.pop(s.tuple_key(), None)
        if earlier is not None:  # still in CLOSE_WAIT across two runs: its age goes on
            s = earlier
        s.learn(rec)
        self._keep(s)

    def _start(self, rec: dict, ts: str, name: str, lineno: int) -> None:
        check_version(rec, name, lineno, "replay")
        ident = run_of(rec)
        if ident == self._run:
            return  # the same run: a rotated or reopened file's header
        self._run = ident
        host = ident[0]
        self.runs += 1
        self.host, self.run_start, self.run_ended = host, ts, None
        if host not in self.hostnames:
            self.hostnames.append(host)
        hooks = rec.get("hooks")
        self.hooks = hooks if isinstance(hooks, dict) else {}
        self.log_warnings = [str(w) for w in rec.get("warnings") or ()]
        la = rec.get("leak_after_s")
        if not self._leak_after_given and _number(la) and la > 0:
            self.leak_after = float(la)
        states = (rec.get("filters") or {}).get("state") or []
        self.fw2_known = not states or FW2 in states
        # Sockets still open from an earlier run of this host: its `existing` records (next)
        # say which are still in CLOSE_WAIT; the others ended while nobody watched.
        self._end_gap()
        for store in (self.open, self.by_tuple):
            for k, s in list(store.items()):
                if s.host == host:
                    self._gap[s.tuple_key()] = s
                    del store[k]
        for k in [k for k in self.fw2 if k[0] == host]:
            del self.fw2[k]  # in place: feed_lines holds the dict

    def _end_gap(self) -> None:
        self.untracked += len(self._gap)
        self._gap.clear()

    def _lost(self, rec: dict, ts: str, name: str, lineno: int) -> None:
        count = rec["count"]
        if type(count) is not int:
            raise TypeError(f"count is {count!r}")
        self.lost += count

    def _summary(self, rec: dict, ts: str, name: str, lineno: int) -> None:
        self.run_ended = ts

    # ----------------------------------------------------------------- result

    def resolved_at(self) -> float:
        """T: --at, else the last record read. ReplayError when it is outside the log."""
        if self.last_ts is None:
            raise ReplayError("no record in the log")
        if self.at is None:
            return epoch(self.last_ts)
        if self.max_ts is not None and self._at_ts is not None and self._at_ts > self.max_ts:
            raise ReplayError(f"{self._at_text()} is after the end of the log ({self.max_ts})")
        return self.at

    def sample(self) -> Sample:
        """The frame at T, as the live collector would have drawn it then."""
        at = self.resolved_at()
        at_ts = stamp(at)
        # The window starts no earlier than the run (as live top) nor than the input
        start = max(self.run_start or "", self.first_ts or "") or at_ts
        span = round(max(0.0, min(self.window_s, at - epoch(start))), 3)
        lo_ts = stamp(at - span)

        sockets = []
        who: dict[tuple, tuple] = {}
        for s in [*self.open.values(), *self.by_tuple.values(), *self._gap.values()]:
            age = max(0.0, at - (s.since if s.since is not None else s.seen))
            cause = s.cause or stuck_cause(
                inode=None, rx_queue=None, holders=None, eof_read=False,
                owner=(s.pid, s.how) if s.pid is not None and s.how else None)
            sockets.append(CwSock(s.pid, s.comm, NO_CGROUP, s.lport, s.raddr, s.rport,
                                  round(age, 3), s.unread, cause, age >= self.leak_after))
            if s.sk is not None:
                who[(s.host, s.sk)] = (s.pid, s.comm)
        ended = [(key, e) for ts, key, e in self.ended if lo_ts <= ts <= at_ts]
        gone = {key: (e.pid, e.comm) for key, e in ended}
        entered = []
        for ts, key, e in self.entered:
            if lo_ts <= ts <= at_ts:
                pid, comm = who.get(key) or gone.get(key) or (e.pid, e.comm)
                entered.append(Entered(pid, comm, NO_CGROUP, e.lport, e.raddr, e.rport))
        lo_ms = lo_ts[:23]
        transitions = sum(n for ms, n in self._per_ms if ms >= lo_ms)

        warnings = []
        if self.partial is not None:
            warnings.append(f"the log starts with part {self.partial} of a tcpwatch run (the "
                            "earlier files were not given): sockets that entered CLOSE_WAIT "
                            f"before {self.first_ts} are missing")
        if self.run_ended is not None and self.run_ended < at_ts:
            warnings.append(f"tcpwatch was not running at T: its run ended at "
                            f"{self.run_ended}; shown: the sockets in CLOSE_WAIT then")
        warnings += [f"log: {w}" for w in self.log_warnings]
        host = Host(
            hostname=",".join(self.hostnames), states={CW: len(sockets)}, ephemeral_used=None,
            events_per_s=round(transitions / span, 1) if span > 0 else None, lost=self.lost,
            hooks=[f"{k}: {v}" for k, v in self.hooks.items() if v], signals=list(SIGNALS),
            warnings=warnings, fin_wait2=self._fin_wait2(at) if self.fw2_known else [],
        )
        return Sample("replay", span, host, sockets, entered, [e for _, e in ended], at_ts)

    def _fin_wait2(self, at: float, top: int = 5) -> list[PeerWait]:
        """FIN_WAIT2 sockets per remote endpoint at T, ages from their entry (as hostinfo's)."""
        groups: dict[str, list[float]] = {}
        for remote, ts in self.fw2.values():
            groups.setdefault(remote, []).append(max(0.0, at - epoch(ts)))
        rows = [PeerWait(r, len(ages), round(max(ages), 3)) for r, ages in groups.items()]
        rows.sort(key=lambda r: (-r.count, -r.oldest_s, r.remote))
        return rows[:top]

    def info(self) -> dict:
        """The JSON frame's `replay` object: what was read and what the log does not say."""
        return {
            "at": stamp(self.resolved_at()),
            "files": self.files,
            "log_start": self.first_ts,
            "records": self.records,
            "corrupt": self.corrupt,
            "untracked": self.untracked,
            "runs": self.runs,
            "leak_after_s": self.leak_after,
            "not_in_log": NOT_IN_LOG + ([] if self.fw2_known else ["fin_wait2"]),
        }

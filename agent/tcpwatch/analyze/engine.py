"""The analysis: NDJSON records in, one `Result` out, in memory that does not grow with the log.

What is kept: one `_Sock` per socket in CLOSE_WAIT *at the current point of the stream*
(dropped when its `close_wait` record comes), per-group totals with a `Durations` sketch
each (at most MAX_GROUPS groups per table, the rest pooled as "(other)"), one timeline, a
transition table, and the first few corrupt lines. Nothing per record.

A socket counts once, when it leaves CLOSE_WAIT within the window (--since/--until) or, if
still in CLOSE_WAIT at the end, then: `cw` (sockets in CLOSE_WAIT), `closed`, `leaks` (a
`leak` record, or still in CLOSE_WAIT at the end for longer than the log's leak_after_s),
`open`. Records before --since still build up the sockets' state; records after --until
are not read.

>>> a = Analyzer(Options())
>>> a.feed_lines("demo", 1, [
...   b'{"event":"start","ts":"2026-11-21T05:13:00.000000Z","v":1,"leak_after_s":30.0}',
...   b'{"event":"state","ts":"2026-11-21T05:13:01.000000Z","sk":"0x1","laddr":"10.0.0.1",'
...   b'"lport":8080,"raddr":"10.0.0.2","rport":50000,"pid":7,"comm":"api",'
...   b'"old":"ESTABLISHED","new":"CLOSE_WAIT"}', b'not json'], False)
False
>>> r = a.finish(); r.totals["cw"], r.totals["open"], r.corrupt
(1, 1, 1)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from tcpwatch.analyze import inputs
from tcpwatch.analyze.sketch import Durations, Timeline
from tcpwatch.analyze.timeparse import epoch, stamp

SCHEMA_VERSIONS = (1,)  # what this reader understands (docs/ndjson.md)
MAX_GROUPS = 10_000  # per table; more distinct keys are pooled as OTHER
OTHER = "(other)"
CORRUPT_EXAMPLES = 5
DEFAULT_LEAK_AFTER_S = 30.0
UNTIL_SLACK_S = 60.0  # records are time-ordered to within this; past until+slack, stop reading
CW = "CLOSE_WAIT"


def check_version(start: dict, name: str, lineno: int, verb: str) -> None:
    """Refuse a log whose `start` record names a schema version this reader does not know."""
    v = start.get("v")
    if v not in SCHEMA_VERSIONS:
        raise IncompatibleLog(
            f"{name}:{lineno}: written with NDJSON schema version {v!r}; this tcpwatch "
            f"reads version {', '.join(map(str, SCHEMA_VERSIONS))}: {verb} it with a "
            "matching tcpwatch"
        )


def run_of(start: dict) -> tuple[str, object, object]:
    """What identifies the run a `start` record opens: (hostname, pid, ts). A rotated or
    reopened file repeats its run's `start`: same identity, same run."""
    return (str(start.get("hostname") or ""), start.get("pid"), start.get("ts"))


class IncompatibleLog(Exception):
    """A log written with a schema version this reader does not know."""


class Options(NamedTuple):
    """What to look at. since/until are epoch seconds; pids/ports/states empty: all.

    Options(ports=frozenset({8080}), since=1795237980.0)
    """

    pids: frozenset = frozenset()
    ports: frozenset = frozenset()
    states: frozenset = frozenset()  # state names ("CLOSE_WAIT")
    since: float | None = None
    until: float | None = None
    leak_after_s: float | None = None  # None: from the log's start record


class Group:
    """Totals of one process, remote endpoint or local port."""

    __slots__ = ("cw", "closed", "leaks", "open", "durations")

    def __init__(self) -> None:
        self.cw = 0
        self.closed = 0
        self.leaks = 0
        self.open = 0
        self.durations = Durations()

    def merge(self, other: Group) -> None:
        self.cw += other.cw
        self.closed += other.closed
        self.leaks += other.leaks
        self.open += other.open
        self.durations.merge(other.durations)

    def as_dict(self) -> dict[str, Any]:
        d = self.durations
        return {
            "cw": self.cw,
            "closed": self.closed,
            "leaks": self.leaks,
            "open": self.open,
            "p50_s": _r(d.quantile(0.5)),
            "p90_s": _r(d.quantile(0.9)),
            "p99_s": _r(d.quantile(0.99)),
            "max_s": _r(d.max) if d.n else None,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


class _Sock:
    """One socket in CLOSE_WAIT: the record it was first seen in, and what was learnt since.

    Kept lean (the record itself, not copies of its fields): there may be very many.
    """

    __slots__ = ("rec", "late", "since", "seen", "leaked", "counted", "host", "leak_after")

    def __init__(
        self, rec: dict, since: float | None, seen: float, leak_after: float, host: str = ""
    ) -> None:
        self.rec = rec
        self.late: dict | None = None  # fields from later records (leak, close_wait, ...)
        self.since = since  # epoch seconds it entered CLOSE_WAIT, None if before tracing
        self.seen = seen  # first seen by the tracer (age is at least now - seen)
        self.leaked = False
        self.counted = False  # in the timeline's level
        self.host = host
        self.leak_after = leak_after

    def get(self, field: str) -> Any:
        late = self.late
        if late is not None and field in late:
            return late[field]
        return self.rec.get(field)

    def learn(self, rec: dict, *fields: str) -> None:
        """Take the non-null `fields` of a later record."""
        if self.late is None:
            self.late = {}
        for f in fields:
            v = rec.get(f)
            if v is not None:
                self.late[f] = v

    def tuple_key(self) -> tuple:
        r = self.rec
        return (self.host, r.get("laddr"), r.get("lport"), r.get("raddr"), r.get("rport"))

    def pids(self) -> set:
        return {self.get("pid"), *(h.get("pid") for h in self.get("holders") or ())}


class Result(NamedTuple):
    """Everything the reports show; plain data (see report.as_json for the field list)."""

    files: list[str]
    records: int
    corrupt: int
    corrupt_examples: list[str]
    notes: list[str]
    sessions: list[dict]
    first_ts: str | None
    last_ts: str | None
    end: float | None
    lost: int
    unwritten: int
    totals: dict[str, Any]
    outcomes: dict[str, int]
    open: list[dict]
    by_process: dict[Any, Group]  # keys: see group_name()
    by_remote: dict[Any, Group]
    by_local_port: dict[Any, Group]
    transitions: dict[tuple[str, str], int]
    durations: Durations
    timeline: Timeline | None
    leak_after_s: float


EPHEMERAL = range(32768, 61000)  # Linux's default net.ipv4.ip_local_port_range


def is_client(lport: Any, rport: Any) -> bool:
    """Whether our end is the client (the remote port is the service's): our port is
    ephemeral and theirs is not, or, when both or neither are, ours is the higher.
    A guess (the log does not say who connected), right for services below 32768.

    >>> is_client(41996, 5432), is_client(8080, 51234), is_client(47000, 47123)
    (True, False, False)
    """
    if type(lport) is not int or type(rport) is not int:
        return False
    ours, theirs = lport in EPHEMERAL, rport in EPHEMERAL
    if ours != theirs:
        return ours
    return rport < lport


def group_name(table: str, key: Any) -> str:
    """A group key as text: ("api", 812) process -> "api[812]"; remote ("10.0.0.5", 5432)
    -> "10.0.0.5:5432", ("10.0.0.9", None) -> "10.0.0.9" (a server's clients: by host);
    local port None -> "ephemeral" (client sockets).

    >>> group_name("process", (812, "api")), group_name("process", (None, None))
    ('api[812]', '?')
    >>> group_name("remote", ("2001:db8::1", 443)), group_name("local", None)
    ('[2001:db8::1]:443', 'ephemeral')
    """
    if key == OTHER:
        return OTHER
    if table == "process":
        pid, comm = key
        if pid is None and comm is None:
            return "?"
        return f"{comm if comm is not None else '?'}[{pid if pid is not None else '?'}]"
    if table == "remote":
        addr, port = key
        if port is None:
            return str(addr)
        return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"
    return "ephemeral" if key is None else str(key)


class Analyzer:
    """Feed it batches of lines (feed_lines) or files (run); finish() gives the Result."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.files: list[str] = []
        self.records = 0
        self.corrupt = 0
        self.corrupt_examples: list[str] = []
        self.notes: list[str] = []
        self.sessions: list[dict] = []
        self.session_count = 0
        self._session_id: tuple | None = None
        self._host = ""
        self._suffix = ""  # added to sk keys of every host but the first
        self._hosts: dict[str, str] = {}
        self._saw_start = False
        self.leak_after = opts.leak_after_s or DEFAULT_LEAK_AFTER_S
        self.open: dict[str, _Sock] = {}
        self.by_tuple: dict[tuple, _Sock] = {}  # pre-existing sockets not yet seen with an sk
        self._gap: dict[tuple, _Sock] = {}  # open when a new session started: seen again?
        self.first_ts: str | None = None
        self.last_ts: str | None = None
        self.lost = 0
        self.unwritten = 0
        self.totals = {"cw": 0, "closed": 0, "leaks": 0, "open": 0, "untracked": 0}
        self.outcomes: dict[str, int] = {}
        self.by_process: dict[Any, Group] = {}
        self.by_remote: dict[Any, Group] = {}
        self.by_local_port: dict[Any, Group] = {}
        self.transitions: dict[tuple[str, str], int] = {}  # (old, new) -> count
        self.durations = Durations()
        self.timeline: Timeline | None = None
        self.level = 0  # sockets in CLOSE_WAIT now (matching the filters)
        self._since_ts = stamp(opts.since) if opts.since is not None else None
        self._until_ts = stamp(opts.until) if opts.until is not None else None
        self._stop_ts = (
            stamp(opts.until + UNTIL_SLACK_S) if opts.until is not None else None
        )
        self._cw_wanted = not opts.states or CW in opts.states
        self._head = ""  # _second()'s cache
        self._head_s = 0
        self._combos: dict[tuple, Group] = {}  # (process, remote, local) -> totals
        # The hot paths of _enter/_close apply: no --pid, no --since, one host, no gap.
        self._simple = not opts.pids and opts.since is None

    # ---------------------------------------------------------------- reading

    def run(self, sources: Iterable[inputs.Source]) -> Result:
        """Read every source (messages for unreadable ones go to notes) and finish."""
        for src in sources:
            self.read(src)
        return self.finish()

    def read(self, src: inputs.Source) -> None:
        inputs.feed_source(src, self.feed_lines, self._bad, self.notes, self.files)

    def feed_lines(self, name: str, first: int, lines: list[bytes], unterminated: bool) -> bool:
        """Analyse one batch; True when reading this input can stop (past --until)."""
        loads = orjson.loads
        opts = self.opts
        ports = opts.ports
        pids = opts.pids
        states = opts.states
        since_ts, until_ts, stop_ts = self._since_ts, self._until_ts, self._stop_ts
        transitions = self.transitions
        open_socks = self.open
        cw_wanted = self._cw_wanted
        need_first = self.first_ts is None
        last = ""
        bad = self.corrupt
        empty = 0
        err_at = -1  # where the last bad line was: finds the next one's number (see _bad)
        i = 0  # lines before the one that made reading stop (past --until)
        # Most records are `state` ones that neither enter nor end a CLOSE_WAIT: without
        # filters on them, they take the short path (read `new`, nothing else).
        plain = not ports and not states and until_ts is None
        rec: Any = None
        for line in lines:
            if not line:
                empty += 1
                continue
            try:
                rec = loads(line)
                event = rec["event"]
                if plain and event == "state":
                    new = rec["new"]
                    if new == CW:
                        self._enter(rec, rec["ts"])
                    elif new == "CLOSE" and open_socks and rec["old"] != CW:
                        self._state_closed(rec)
                    if need_first and self._first(rec["ts"]):
                        need_first = False
                    continue
                ts = rec["ts"]
                if until_ts is not None and ts > until_ts:
                    if ts > stop_ts:
                        i = _position(lines, line, err_at + 1)
                        self.records += i - empty - (self.corrupt - bad)
                        self._note_last(last)
                        return True
                    continue
                if event == "state":
                    if ports and rec["lport"] not in ports and rec["rport"] not in ports:
                        continue
                    old = rec["old"]
                    new = rec["new"]
                    if new == "CLOSE" and open_socks and old != CW:
                        self._state_closed(rec)
                    if new == CW and cw_wanted:
                        self._enter(rec, ts)
                    # With --state only: counting every transition costs a fifth of the time.
                    if states and (old in states or new in states) and (
                        (since_ts is None or ts >= since_ts) and (not pids or rec["pid"] in pids)
                    ):
                        tkey = (old, new)
                        transitions[tkey] = transitions.get(tkey, 0) + 1
                elif event == "close_wait":
                    if cw_wanted and (
                        not ports or rec["lport"] in ports or rec["rport"] in ports
                    ):
                        self._close(rec, ts)
                elif event == "leak":
                    if cw_wanted and (
                        not ports or rec["lport"] in ports or rec["rport"] in ports
                    ):
                        self._leak(rec, ts)
                elif event == "existing":
                    if cw_wanted and (
                        not ports or rec["lport"] in ports or rec["rport"] in ports
                    ):
                        self._existing(rec, ts)
                elif event == "start":
                    self._start(rec, name, first + _position(lines, line, err_at + 1))
                elif event == "lost":
                    self.lost += rec["count"]
                elif event == "summary":
                    self.unwritten += rec.get("unwritten") or 0
                else:
                    continue  # a newer kind of record: ignored, as the contract says
                if need_first and self._first(ts):
                    need_first = False
                last = ts
            except IncompatibleLog:
                raise
            except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                err_at = _position(lines, line, err_at + 1)
                self._bad(name, first + err_at, _reason(exc, line, rec_ok=_is_json(line),
                                                        unterminated=unterminated))
        self.records += len(lines) - empty - (self.corrupt - bad)
        if isinstance(rec, dict) and isinstance(rec.get("ts"), str):
            last = max(last, rec["ts"])  # the short path does not note times
        self._note_last(last)
        return False

    def _first(self, ts: str) -> bool:
        """The first record in the window: the timeline starts. True if `ts` is that one."""
        if self._since_ts is not None and ts < self._since_ts:
            return False
        self.first_ts = ts
        self._start_timeline(ts)
        return True

    def _state_closed(self, rec: dict) -> None:
        """A socket went to CLOSE: if it was still tracked in CLOSE_WAIT, its exit from
        CLOSE_WAIT was lost. (Checked only here, where every life ends: checking each record
        costs. An sk reused after that was lost too is caught when it enters CLOSE_WAIT.)"""
        key = rec["sk"] + self._suffix
        v = self.open.pop(key, None)
        if v is not None:
            self._untrack(v, rec["ts"])

    def _note_last(self, ts: str) -> None:
        """The end of the log so far: the last record of a batch (records are in time
        order to within milliseconds; comparing every one would cost more than it is worth)."""
        if ts and (self.last_ts is None or ts > self.last_ts):
            self.last_ts = ts

    def _bad(self, name: str, lineno: int, reason: str) -> None:
        self.corrupt += 1
        if len(self.corrupt_examples) < CORRUPT_EXAMPLES:
            self.corrupt_examples.append(f"{name}:{lineno}: {reason}")

    # ---------------------------------------------------------------- records

    def _start(self, rec: dict, name: str, lineno: int) -> None:
        check_version(rec, name, lineno, "analyse")
        ident = run_of(rec)
        if ident == self._session_id:
            return  # the same run: a rotated or reopened file's header
        self._session_id = ident
        host = ident[0]
        self.session_count += 1
        if len(self.sessions) < 100:
            self.sessions.append({
                "hostname": rec.get("hostname"), "version": rec.get("version"),
                "kernel": rec.get("kernel"), "pid": rec.get("pid"), "ts": rec.get("ts"),
                "leak_after_s": rec.get("leak_after_s"), "filters": rec.get("filters"),
                "warnings": rec.get("warnings") or [],
            })
        if self.opts.leak_after_s is None and isinstance(rec.get("leak_after_s"), (int, float)):
            self.leak_after = float(rec["leak_after_s"])
        self._host = host
        self._suffix = self._hosts.setdefault(host, "" if not self._hosts else "@" + host)
        # Sockets still open from an earlier run: the next run's `existing` records say
        # whether they are still in CLOSE_WAIT; those not named there ended in between.
        self._end_gap(rec["ts"])
        for k, v in list(self.open.items()):
            s = self._as_sock(v) if type(v) is dict else v
            if s.host == host:
                self._gap[s.tuple_key()] = s
                del self.open[k]
        for k, s in list(self.by_tuple.items()):
            if s.host == host:
                self._gap[k] = self.by_tuple.pop(k)
        self._update_simple()

    def _update_simple(self) -> None:
        self._simple = (
            not self.opts.pids and self.opts.since is None and not self._suffix and not self._gap
        )

    def _end_gap(self, ts: str) -> None:
        """Sockets open at the end of an earlier run and not found again: untracked."""
        for s in self._gap.values():
            self._untrack(s, ts)
        self._gap.clear()
        self._update_simple()

    def _enter(self, rec: dict, ts: str) -> None:
        """A socket entered CLOSE_WAIT. The hot path keeps the record itself as the
        socket's state; a _Sock is made only when more is learnt (see _as_sock)."""
        if not self._simple:
            self._enter_general(rec, ts)
            return
        sk = rec["sk"]
        open_socks = self.open
        if sk in open_socks:
            self._untrack(open_socks.pop(sk), ts)
        open_socks[sk] = rec
        self.level += 1
        if self.timeline is not None:
            head = ts[:19]  # _second(), inlined
            if head != self._head:
                self._head, self._head_s = head, int(epoch(head + "Z"))
            self.timeline.set(self._head_s, self.level)

    def _enter_general(self, rec: dict, ts: str) -> None:
        if self._gap:
            self._end_gap(ts)
        key = rec["sk"] + self._suffix
        old = self.open.get(key)
        if old is not None:
            self._untrack(old, ts)
        if self.opts.pids:  # whether it counts depends on who holds it: a full _Sock
            t = epoch(ts)
            s = _Sock(rec, t, t, self.leak_after, self._host)
            self.open[key] = s
            self._count_in(s, t)
            return
        self.open[key] = rec
        self.level += 1
        if self.timeline is not None:
            head = ts[:19]  # _second(), inlined
            if head != self._head:
                self._head, self._head_s = head, int(epoch(head + "Z"))
            self.timeline.set(self._head_s, self.level)

    def _second(self, ts: str) -> int:
        """Whole epoch second of a timestamp, converted once per distinct second."""
        head = ts[:19]
        if head != self._head:
            self._head = head
            self._head_s = int(epoch(head + "Z"))
        return self._head_s

    def _as_sock(self, v: dict | _Sock) -> _Sock:
        """The _Sock of an open socket kept as its entering record (counted in the level)."""
        if isinstance(v, _Sock):
            return v
        t = epoch(v["ts"])
        s = _Sock(v, t, t, self.leak_after, self._host)
        s.counted = True
        return s

    def _existing(self, rec: dict, ts: str) -> None:
        t = epoch(ts)
        s = _Sock(rec, None, t, self.leak_after, self._host)
        key = s.tuple_key()
        earlier = self._gap.pop(key, None)
        if earlier is not None:  # the same socket, still in CLOSE_WAIT across runs
            earlier.learn(rec, "pid", "comm", "holders", "rx_queue")
            s = earlier
        self.by_tuple[key] = s
        self._count_in(s, t)

    def _find(self, rec: dict) -> dict | _Sock | None:
        sk = rec.get("sk")
        if sk is not None:
            s = self.open.pop(sk + self._suffix, None)
            if s is not None:
                return s
        if not self.by_tuple:
            return None
        key = (self._host, rec.get("laddr"), rec.get("lport"), rec.get("raddr"),
               rec.get("rport"))
        return self.by_tuple.pop(key, None)

    def _leak(self, rec: dict, ts: str) -> None:
        if self._gap:
            self._end_gap(ts)
        t = epoch(ts)
        found = self._find(rec)
        s = None if found is None else self._as_sock(found)
        if s is None:  # entered CLOSE_WAIT before the log (or the window of the filter)
            since = rec.get("since")
            s = _Sock(rec, epoch(since) if since else None, t, self.leak_after, self._host)
            if since is None and isinstance(rec.get("age_s"), (int, float)):
                s.seen = t - rec["age_s"]
        s.leaked = True
        s.learn(rec, "sk", "pid", "comm", "holders", "rx_queue", "eof_read", "cause", "kstack",
                "ustack")
        if rec.get("sk") is not None:
            self.open[rec["sk"] + self._suffix] = s
        else:
            self.by_tuple[s.tuple_key()] = s
        self._count_in(s, t)

    def _close(self, rec: dict, ts: str) -> None:
        """A socket left CLOSE_WAIT: counted in one (process, remote, local) combination,
        folded into the three tables at the end (one dict lookup here instead of three).

        The hot path: no --pid/--since, one host, and the socket kept as its entering
        record (it was seen entering CLOSE_WAIT, nothing else was learnt about it)."""
        v = self.open.pop(rec["sk"], None) if self._simple and not self.by_tuple else None
        if v is None or type(v) is not dict:
            if v is not None:
                self.open[rec["sk"]] = v
            self._close_general(rec, ts)
            return
        self.level -= 1
        if self.timeline is not None:
            head = ts[:19]  # _second(), inlined
            if head != self._head:
                self._head, self._head_s = head, int(epoch(head + "Z"))
            self.timeline.set(self._head_s, self.level)
        lport, rport = rec["lport"], rec["rport"]
        if is_client(lport, rport):
            key = (rec["pid"], rec["comm"], rec["raddr"], rport, None)
        else:
            key = (rec["pid"], rec["comm"], rec["raddr"], None, lport)
        g = self._combos.get(key) or self._combo(key)
        g.cw += 1
        if rec["leaked"]:
            g.leaks += 1
        duration = rec["duration_s"]
        if duration is not None:
            g.durations.add(duration)
        outcome = rec["outcome"]
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _close_general(self, rec: dict, ts: str) -> None:
        if self._gap:
            self._end_gap(ts)
        sk = rec["sk"]
        v = self.open.pop(sk + self._suffix, None) if sk is not None else None
        if v is None:
            v = self._find(rec)
        s: _Sock | None = None
        if v is None:
            counted = False
        elif type(v) is dict:
            counted = True  # a plain entry: counted, and nothing more learnt
        else:
            s = v
            counted = s.counted
            s.counted = False
        if counted:
            self.level -= 1
            if self.timeline is not None:
                head = ts[:19]  # _second(), inlined
                if head != self._head:
                    self._head, self._head_s = head, int(epoch(head + "Z"))
                self.timeline.set(self._head_s, self.level)
        if self._since_ts is not None and ts < self._since_ts:
            return  # left CLOSE_WAIT before the window
        pid, comm = rec["pid"], rec["comm"]
        if pid is None and comm is None and s is not None:
            pid, comm = s.get("pid"), s.get("comm")
        pids = self.opts.pids
        if pids and not ((s.pids() if s else set()) | {pid, rec.get("closer_pid")}) & pids:
            return
        leaked = 1 if rec["leaked"] or (s is not None and s.leaked) else 0
        outcome = rec["outcome"]
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        lport, rport = rec["lport"], rec["rport"]
        if is_client(lport, rport):
            key = (pid, comm, rec["raddr"], rport, None)  # a client: keep the server's port
        else:
            key = (pid, comm, rec["raddr"], None, lport)
        g = self._combos.get(key) or self._combo(key)
        g.cw += 1
        g.leaks += leaked
        duration = rec["duration_s"]
        if duration is not None:
            g.durations.add(duration)

    def _fold_combos(self) -> None:
        """(process, remote, local) totals -> the three tables, the totals, the histogram."""
        totals = self.totals
        for (pid, comm, raddr, rport, lport), g in self._combos.items():
            if pid == OTHER:
                keys: tuple = (OTHER, OTHER, OTHER)
            else:
                keys = ((pid, comm), (raddr, rport), lport)
            g.closed = g.cw  # combinations count sockets that left CLOSE_WAIT only
            for table, key in zip((self.by_process, self.by_remote, self.by_local_port), keys):
                _group(table, key).merge(g)
            totals["cw"] += g.cw
            totals["closed"] += g.closed
            totals["leaks"] += g.leaks
            self.durations.merge(g.durations)
        self._combos.clear()

    def _combo(self, key: tuple) -> Group:
        if len(self._combos) >= MAX_GROUPS:
            key = (OTHER, OTHER, OTHER, OTHER, OTHER)
            g = self._combos.get(key)
            if g is not None:
                return g
        g = self._combos[key] = Group()
        return g

    def _untrack(self, v: dict | _Sock, ts: str) -> None:
        """A socket we lost track of (its exit from CLOSE_WAIT was not logged)."""
        self._count_out(self._as_sock(v), epoch(ts))
        self.totals["untracked"] += 1

    # --------------------------------------------------------------- grouping

    def _groups(self, pid: Any, comm: Any, lport: Any, raddr: Any, rport: Any) -> tuple:
        """The Group of the process, the remote endpoint and the local port (keys: tuples,
        turned into text only by the report)."""
        if is_client(lport, rport):
            remote, local = (raddr, rport), None  # we are the client: keep the server's port
        else:
            remote, local = (raddr, None), lport
        return (
            _group(self.by_process, (pid, comm)),
            _group(self.by_remote, remote),
            _group(self.by_local_port, local),
        )

    def _sock_groups(self, s: _Sock) -> tuple:
        g = s.get
        return self._groups(g("pid"), g("comm"), g("lport"), g("raddr"), g("rport"))

    def _matches(self, s: _Sock) -> bool:
        return not self.opts.pids or bool(s.pids() & self.opts.pids)

    def _count_in(self, s: _Sock, t: float) -> None:
        if not s.counted and self._matches(s):
            s.counted = True
            self.level += 1
            if self.timeline is not None:
                self.timeline.set(t, self.level)

    def _count_out(self, s: _Sock, t: float) -> None:
        if s.counted:
            s.counted = False
            self.level -= 1
            if self.timeline is not None:
                self.timeline.set(t, self.level)

    def _start_timeline(self, ts: str) -> None:
        start = self.opts.since if self.opts.since is not None else epoch(ts)
        self.timeline = Timeline(start, level=self.level)

    # ----------------------------------------------------------------- finish

    def finish(self) -> Result:
        """Sockets still in CLOSE_WAIT at the end are counted; the Result is built."""
        if self.opts.until is not None:
            end: float | None = self.opts.until
        else:
            end = epoch(self.last_ts) if self.last_ts else None
        self._fold_combos()
        still = [*self.open.values(), *self.by_tuple.values(), *self._gap.values()]
        opened = []
        for v in still:
            s = self._as_sock(v)
            if not self._matches(s) or end is None:
                continue
            age = end - (s.since if s.since is not None else s.seen)
            leaked = s.leaked or age >= s.leak_after
            self.totals["cw"] += 1
            self.totals["open"] += 1
            self.totals["leaks"] += leaked
            for group in self._sock_groups(s):
                group.cw += 1
                group.open += 1
                group.leaks += leaked
            opened.append(_open_record(s, age, leaked))
        opened.sort(key=lambda r: (not r["leaked"], -r["age_s"]))
        if self.timeline is not None and end is not None:
            self.timeline.finish(end)
        return Result(
            files=self.files, records=self.records, corrupt=self.corrupt,
            corrupt_examples=self.corrupt_examples, notes=self.notes,
            sessions=self.sessions, first_ts=self.first_ts, last_ts=self.last_ts, end=end,
            lost=self.lost, unwritten=self.unwritten, totals=self.totals,
            outcomes=self.outcomes, open=opened, by_process=self.by_process,
            by_remote=self.by_remote, by_local_port=self.by_local_port,
            transitions=self.transitions, durations=self.durations, timeline=self.timeline,
            leak_after_s=self.leak_after,
        )


def _group(table: dict[Any, Group], key: Any) -> Group:
    g = table.get(key)
    if g is None:
        if len(table) >= MAX_GROUPS:
            key = OTHER
            g = table.get(key)
        if g is None:
            g = table[key] = Group()
    return g


def _open_record(s: _Sock, age: float, leaked: bool) -> dict:
    g = s.get
    rec = {
        "leaked": leaked,
        "age_s": round(age, 6),
        "at_least": s.since is None,
        "since": stamp(s.since) if s.since is not None else None,
        "pid": g("pid"),
        "comm": g("comm"),
        "laddr": g("laddr"),
        "lport": g("lport"),
        "raddr": g("raddr"),
        "rport": g("rport"),
        "sk": g("sk"),
        "holders": g("holders") or [],
        "rx_queue": g("rx_queue"),
        "eof_read": bool(g("eof_read")),
        "cause": g("cause"),
        "preexisting": s.since is None,
    }
    for stack in ("kstack", "ustack"):
        if g(stack):
            rec[stack] = g(stack)
    return rec


def _position(lines: list[bytes], line: bytes, start: int) -> int:
    """Index of `line` in `lines` from `start`: the loop does not count lines (it costs).
    Exact for bad lines searched in order: a line equal to a bad one is bad too, so none
    is skipped between two of them.

    >>> _position([b"a", b"x", b"b", b"x"], b"x", 2)
    3
    """
    for k in range(start, len(lines)):
        if lines[k] is line:
            return k
    return lines.index(line, start) if line in lines[start:] else start


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except (orjson.JSONDecodeError, TypeError):
        return False
    return True


def _reason(exc: Exception, line: bytes, rec_ok: bool, unterminated: bool) -> str:
    """Why a line is unusable, in a few words."""
    if line is inputs.OVERLONG:
        return f"line longer than {inputs.MAX_LINE >> 20} MiB"
    if not rec_ok:
        if unterminated:
            return "truncated: the last line has no newline and is not complete JSON"
        return f"not JSON ({exc})"
    if isinstance(exc, KeyError):
        return f"record without {exc.args[0]!r}"
    return f"not a tcpwatch record ({type(exc).__name__}: {exc})"

"""CLOSE_WAIT tracking and leak detection: decoded kernel events in, records out.

Pure: no I/O, no bcc, no /proc, no clock reads. Time comes from the events (`ts_ns`,
CLOCK_MONOTONIC) and from the caller (`now_mono_ns`); who holds a socket comes from the
`resolve` callable the caller passes (procnet.Resolver.resolve in the agent, a fake in tests).
Records are plain dicts with keys in the order of docs/ndjson.md.

>>> def ev(**kw):  # a decoded event for one IPv4 socket, as the loader hands them over
...     sock = dict(kind=1, sk=0xFFFF888105B5DC80, laddr="10.0.0.1", lport=8080,
...                 raddr="10.0.0.2", rport=51234)
...     return schema.decode(schema.encode({**sock, **kw}))
>>> agg = Aggregator(leak_after_s=30, mono_to_wall_ns=1_795_236_980 * 10**9)
>>> [r["event"] for r in agg.feed(ev(ts_ns=1_000 * 10**9, old=1, new=8))]  # FIN received
['state']
>>> agg.tick(1_029 * 10**9), agg.tick(1_030 * 10**9)[0]["age_s"]
([], 30.0)
>>> closed = agg.feed(ev(ts_ns=1_031 * 10**9, old=8, new=9, cw_ns=31 * 10**9))  # close()
>>> [(r["event"], r["ts"]) for r in closed]
[('state', '2026-11-21T05:13:31.000000Z'), ('close_wait', '2026-11-21T05:13:31.000000Z')]
>>> closed[1]["duration_s"], closed[1]["outcome"], closed[1]["leaked"]
(31.0, 'closed', True)
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple

from tcpwatch import schema
from tcpwatch.classify import Causes, ended_cause, stuck_cause
from tcpwatch.timefmt import rfc3339

CLOSE_WAIT = schema.CLOSE_WAIT
_STATE_NAMES = schema.TCP_STATES
LAST_ACK = schema.STATE_NUMBERS["LAST_ACK"]

# resolve(keys) -> {key: (entry or None, [holder, ...])}; key = (netns, family, laddr, lport,
# raddr, rport). Entries have rx_queue, inode, netns; holders have pid, comm, fd.
Resolve = Callable[[list], dict]
# symbolize(event) -> {"kstack": [...], "ustack": [...]} or {}
Symbolize = Callable[[dict], dict]
# (pid, tid, comm) of a record, each None when unknown
Who = tuple


class Owner(NamedTuple):
    """The owner the kernel hooks reported: Owner(pid=812, tid=812, comm='server', how='socket').

    `how` is "socket" (seen in process context on this socket) or "listener" (inherited from
    the listening socket of the port), as the `owner` field of `state` records.
    """

    pid: int
    tid: int
    comm: str
    how: str


class CloseWaitSocket(NamedTuple):
    """A snapshot of one socket in CLOSE_WAIT, for `tcpwatch top`.

    CloseWaitSocket(sk=0xffff888105b5dc80, tuple=(4, '10.0.0.1', 8080, '10.0.0.2', 51234),
                    netns=4026531833, since_ns=1_000_000_000_000, owner=Owner(...),
                    eof_read=False, leaked=True, preexisting=False)

    sk is None for a pre-existing socket the kernel has not reported yet; since_ns is
    CLOCK_MONOTONIC (for a pre-existing socket: when it was first seen); netns 0 is unknown.
    """

    sk: int | None
    tuple: tuple  # (family 4/6, laddr, lport, raddr, rport)
    netns: int
    since_ns: int
    owner: Owner | None
    eof_read: bool
    leaked: bool
    preexisting: bool


class _Tracked:
    """Mutable state of one socket in CLOSE_WAIT (slots: there may be very many)."""

    __slots__ = (
        "sk", "family", "laddr", "lport", "raddr", "rport", "netns", "since_ns",
        "owner", "holder", "eof_read", "leaked", "preexisting", "rx_queue", "inode",
        "fin_raw", "resolving",
    )

    def __init__(
        self,
        sk: int | None,
        family: int,
        laddr: str,
        lport: int,
        raddr: str,
        rport: int,
        netns: int,
        since_ns: int,
        owner: Owner | None = None,
        preexisting: bool = False,
    ) -> None:
        self.sk = sk
        self.family = family
        self.laddr = laddr
        self.lport = lport
        self.raddr = raddr
        self.rport = rport
        self.netns = netns
        self.since_ns = since_ns
        self.owner = owner
        self.holder: tuple[int, str] | None = None  # (pid, comm) of the first holder at leak time
        self.eof_read = False
        self.leaked = False
        self.preexisting = preexisting
        self.rx_queue: int | None = None  # last known, from /proc (seed) for pre-existing ones
        self.inode: int | None = None
        self.fin_raw: int | None = None  # /proc's raw rx_queue (FIN included), for the cause
        self.resolving = False  # due: its holders are being looked up (take_due/leak_records)

    def key(self) -> tuple:
        """The resolver's key: (netns, family, laddr, lport, raddr, rport)."""
        return (self.netns, self.family, self.laddr, self.lport, self.raddr, self.rport)

    def match_key(self) -> tuple:
        return _match_key(self.laddr, self.lport, self.raddr, self.rport)


def outcome_name(outcome: int, new: int) -> str:
    """schema.OUTCOMES name of a CLOSE_WAIT exit, "unknown" without a verdict; but CLOSE_WAIT
    -> LAST_ACK without one still means "closed": only close() or shutdown() send our FIN."""
    name = schema.OUTCOMES.get(outcome)
    if name is not None:
        return name
    if outcome == 0 and new == LAST_ACK:
        return "closed"
    return "unknown"


def _since(t: _Tracked) -> int:
    return t.since_ns


def _secs(ns: int) -> float:
    """Nanoseconds -> seconds rounded to 6 decimals: _secs(1_500_000_123) == 1.5."""
    return round(ns / 1e9, 6)


@lru_cache(maxsize=4096)
def _canonical(addr: str) -> str:
    """Address text as the kernel's inet_ntop prints it, v4-mapped IPv6 as plain IPv4
    (as procnet.canonical): "0:0:0:0:0:0:0:1" -> "::1", "::ffff:10.0.0.1" -> "10.0.0.1".

    /proc text and event text may differ for one socket, and a dual-stack listener's
    children are IPv6 sockets carrying IPv4 peers.
    """
    try:
        raw = socket.inet_pton(socket.AF_INET6, addr)
    except (OSError, ValueError):
        return addr
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _match_key(laddr: str, lport: int, raddr: str, rport: int) -> tuple:
    """How a /proc entry and a kernel event are recognised as one socket (netns aside)."""
    return (_canonical(laddr), lport, _canonical(raddr), rport)


def _netns_match(a: int, b: int) -> bool:
    """0 is "unknown" and matches anything: _netns_match(0, 4026531833) is True."""
    return not a or not b or a == b


def _family(value: Any) -> int:
    """4 or 6 from what a /proc entry may carry: 4/6, AF_INET/AF_INET6 or "ipv4"/"ipv6"."""
    return 6 if value in (6, socket.AF_INET6, "ipv6") else 4


def _family_name(family: int) -> str:
    return "ipv6" if family == 6 else "ipv4"


class Aggregator:
    """Turns decoded kernel events into `state`, `close_wait`, `leak`, `existing`, `lost`
    and `summary` records (docs/ndjson.md) and remembers which sockets sit in CLOSE_WAIT.

    >>> resolve = procnet.Resolver().resolve                            # doctest: +SKIP
    >>> agg = Aggregator(30.0, wall_ns - mono_ns, resolve=resolve)      # doctest: +SKIP
    >>> for ev in events: write_all(agg.feed(ev))                       # doctest: +SKIP
    >>> write_all(agg.tick(now_mono_ns))           # about once a second # doctest: +SKIP

    Counters (ints): events (all fed), transitions (`state` records), close_waits
    (`close_wait` records: sockets that left CLOSE_WAIT), leaks (`leak` records), lost (the
    last total passed to note_lost()).

    With `causes` (classify.Causes: which signals the kernel offers), `leak` and `close_wait`
    records end with a `cause` field (docs/ndjson.md); without it they are as before.
    """

    def __init__(
        self,
        leak_after_s: float,
        mono_to_wall_ns: int,
        resolve: Resolve | None = None,
        symbolize: Symbolize | None = None,
        *,
        start_mono_ns: int | None = None,
        causes: Causes | None = None,
    ) -> None:
        c = schema.layout().consts
        self._KIND_STATE = c["TW_KIND_STATE"]
        self._KIND_SOCK = (c["TW_KIND_EOF"], c["TW_KIND_OWNER"])
        self._F_OWNER = c["TW_F_OWNER"]
        self._F_OWNER_LISTENER = c["TW_F_OWNER_LISTENER"]
        self._F_PREV_UNKNOWN = c["TW_F_PREV_UNKNOWN"]
        self._F_ACTOR = c["TW_F_ACTOR"]
        self._F_EOF_READ = c["TW_F_EOF_READ"]
        self._F_CW_UNKNOWN = c["TW_F_CW_UNKNOWN"]

        self.leak_after_ns = int(round(leak_after_s * 1e9))
        self.mono_to_wall_ns = mono_to_wall_ns
        self._resolve = resolve
        self._symbolize = symbolize
        self.causes = causes
        # elapsed_s is measured from here; unless given, the first time the aggregator sees.
        self._start_ns = start_mono_ns

        self._by_sk: dict[int, _Tracked] = {}
        # Pre-existing sockets the kernel has not reported yet: match key -> [tracked].
        self._unbound: dict[tuple, list[_Tracked]] = {}
        # Sockets with no leak record yet, oldest first. Sockets enter CLOSE_WAIT in time order,
        # so tick() only looks at the head (O(number due)); an OrderedDict rather than a deque
        # so a socket that leaves CLOSE_WAIT is dropped at once, not kept until its due time.
        self._pending: OrderedDict[_Tracked, None] = OrderedDict()
        # Sockets in CLOSE_WAIT kept elsewhere (fastpath: the compiled formatter holds those
        # of its runs): held(limit_ns) hands over those that entered by limit_ns, all with
        # None, oldest first. Asked whenever the pending ones or all sockets are looked at.
        self._held: Callable[[int | None], list[_Tracked]] | None = None

        self.events = 0
        self.transitions = 0
        self.close_waits = 0
        self.leaks = 0
        self.lost = 0
        self.missed = 0

    @property
    def resolve_fn(self) -> Resolve | None:
        """The resolve callable given at construction (None: leaks name the kernel's owner)."""
        return self._resolve

    # ----------------------------------------------------------------- events

    def feed(self, ev: dict) -> list[dict]:
        """One decoded kernel event (schema.decode output) -> the records it causes.

        A state event gives a `state` record, plus a `close_wait` record when it leaves
        CLOSE_WAIT; EOF and owner events give none (they update the tracked socket).
        """
        self.events += 1
        if self._start_ns is None:
            self._start_ns = ev["ts_ns"]
        kind = ev["kind"]
        if kind == self._KIND_STATE:
            self.transitions += 1
            return self._on_state(ev)
        if kind in self._KIND_SOCK:
            self._on_sock_event(ev)
        return []  # EOF/owner news, or a kind from a newer kernel side: nothing to say

    def _on_state(self, ev: dict) -> list[dict]:
        out = [self._state_record(ev)]
        old, new = ev["old"], ev["new"]
        tracked = self._by_sk.get(ev["sk"])
        if old == CLOSE_WAIT:
            if tracked is None:
                tracked = self._bind(ev)
            if tracked is not None and tracked.resolving:
                # Due, its holders still being looked up: it leaked, and that comes first.
                tracked.resolving = False
                out.insert(0, self._leak_record(tracked, None, ev["ts_ns"]))
            out.append(self._close_wait_record(ev, tracked))
            self.close_waits += 1
            if tracked is not None:
                self._forget(tracked)
        elif tracked is not None and ev["ts_ns"] >= tracked.since_ns:
            # A tracked sk moving between other states: we missed it leaving CLOSE_WAIT (lost
            # events), or the struct sock was freed and reused by a new connection. Either
            # way the old tracking is stale and must not leak into the new socket. (An
            # *older* event is just late: per-CPU perf buffers do not keep global order.)
            self._forget(tracked)
        if new == CLOSE_WAIT:
            self._track(ev)
        return out

    def _on_sock_event(self, ev: dict) -> None:
        """EOF read, or the owner learnt after the FIN: news about a socket, no record."""
        tracked = self._by_sk.get(ev["sk"]) or self._bind(ev)
        if tracked is None:
            return  # not in CLOSE_WAIT as far as we know: nothing to mark
        if ev["flags"] & self._F_EOF_READ:
            tracked.eof_read = True
        owner = self._event_owner(ev)
        if owner is not None:
            tracked.owner = owner

    def _event_owner(self, ev: dict) -> Owner | None:
        """The owner an event carries, None when its flags say the kernel did not know."""
        flags = ev["flags"]
        if flags & self._F_OWNER:
            return Owner(ev["pid"], ev["tid"], ev["comm"], "socket")
        if flags & self._F_OWNER_LISTENER:
            return Owner(ev["pid"], ev["tid"], ev["comm"], "listener")
        return None

    # --------------------------------------------------------------- tracking

    def _track(self, ev: dict) -> None:
        # The /proc snapshot at start-up races with the kernel: a socket that entered
        # CLOSE_WAIT after attach but before the snapshot is seeded *and* reported here.
        # The kernel's report has the true entry time, so it replaces the seeded one.
        seeded = self._bind(ev)
        if seeded is not None:
            self._pending.pop(seeded, None)
        tracked = _Tracked(
            ev["sk"], ev["family"], ev["laddr"], ev["lport"], ev["raddr"], ev["rport"],
            ev["netns"], ev["ts_ns"], self._event_owner(ev),
        )
        self._by_sk[ev["sk"]] = tracked
        self._insert_pending(tracked)

    def _insert_pending(self, t: _Tracked) -> None:
        """Add to the pending sockets, kept in order of entry time (take_due() stops at the
        first one not due): at the end, unless a late event (per-CPU buffers) or a socket
        handed over from `_held` has an older one; then before the younger ones."""
        pending = self._pending
        if pending and next(reversed(pending)).since_ns > t.since_ns:
            younger = [pending.popitem()[0]]
            while pending and next(reversed(pending)).since_ns > t.since_ns:
                younger.append(pending.popitem()[0])
            pending[t] = None
            for y in reversed(younger):
                pending[y] = None
            return
        pending[t] = None

    def _adopt(self, t: _Tracked) -> None:
        """A socket kept elsewhere until now (see `_held`), tracked here from now on."""
        self._by_sk[t.sk] = t
        self._insert_pending(t)

    def _adopt_held(self) -> None:
        """Every socket `_held` keeps, tracked here from now on."""
        if self._held is not None:
            for t in self._held(None):
                self._adopt(t)

    def _forget(self, tracked: _Tracked) -> None:
        if tracked.sk is not None and self._by_sk.get(tracked.sk) is tracked:
            del self._by_sk[tracked.sk]
        self._pending.pop(tracked, None)

    def _bind(self, ev: dict) -> _Tracked | None:
        """Attach a pre-existing socket (seen in /proc, sk unknown) to the sk of this event.

        Same 4-tuple, and same netns unless either side does not know its netns.
        """
        if not self._unbound:
            return None  # the common case: no pre-existing socket left to attach
        key = _match_key(ev["laddr"], ev["lport"], ev["raddr"], ev["rport"])
        candidates = self._unbound.get(key)
        if not candidates:
            return None
        for i, tracked in enumerate(candidates):
            if _netns_match(tracked.netns, ev["netns"]):
                del candidates[i]
                if not candidates:
                    del self._unbound[key]
                tracked.sk = ev["sk"]
                tracked.netns = tracked.netns or ev["netns"]
                self._by_sk[tracked.sk] = tracked
                return tracked
        return None

    def in_close_wait(self) -> list[CloseWaitSocket]:
        """Every socket tracked in CLOSE_WAIT now, as snapshots (for `tcpwatch top`).

        >>> [(s.tuple, s.leaked) for s in agg.in_close_wait()]            # doctest: +SKIP
        [((4, '10.0.0.1', 8080, '10.0.0.2', 51234), True)]
        """
        self._adopt_held()
        unbound = [t for ts in self._unbound.values() for t in ts]
        return [
            CloseWaitSocket(
                t.sk, (t.family, t.laddr, t.lport, t.raddr, t.rport), t.netns, t.since_ns,
                t.owner, t.eof_read, t.leaked, t.preexisting,
            )
            for t in [*self._by_sk.values(), *unbound]
        ]

    # ---------------------------------------------------------------- records

    def _ts(self, mono_ns: int) -> str:
        return rfc3339(mono_ns + self.mono_to_wall_ns)

    def _head(
        self,
        event: str,
        mono_ns: int,
        sk: int | None,
        family: int,
        laddr: str,
        lport: int,
        raddr: str,
        rport: int,
        netns: int,
        who: Who,
    ) -> dict:
        """The fields every socket record starts with, in docs/ndjson.md order."""
        return {
            "event": event,
            "ts": self._ts(mono_ns),
            "sk": None if sk is None else f"{sk:#x}",
            "family": _family_name(family),
            "laddr": laddr,
            "lport": lport,
            "raddr": raddr,
            "rport": rport,
            "netns": netns or None,
            "pid": who[0],
            "tid": who[1],
            "comm": who[2],
        }

    def _ev_head(self, event: str, ev: dict, netns: int, who: Who) -> dict:
        return self._head(
            event, ev["ts_ns"], ev["sk"], ev["family"], ev["laddr"], ev["lport"],
            ev["raddr"], ev["rport"], netns, who,
        )

    def _tracked_head(self, event: str, mono_ns: int, t: _Tracked, who: Who) -> dict:
        return self._head(
            event, mono_ns, t.sk, t.family, t.laddr, t.lport, t.raddr, t.rport, t.netns, who
        )

    def _state_record(self, ev: dict) -> dict:
        # The per-event hot path: one dict literal, no helper calls besides the time format.
        flags = ev["flags"]
        if flags & self._F_OWNER:
            how: str | None = "socket"
        elif flags & self._F_OWNER_LISTENER:
            how = "listener"
        else:
            how = None
        sk, family = ev["sk"], ev["family"]
        rec = {
            "event": "state",
            "ts": rfc3339(ev["ts_ns"] + self.mono_to_wall_ns),
            "sk": f"{sk:#x}",
            "family": "ipv6" if family == 6 else "ipv4",
            "laddr": ev["laddr"],
            "lport": ev["lport"],
            "raddr": ev["raddr"],
            "rport": ev["rport"],
            "netns": ev["netns"] or None,
            "pid": ev["pid"] if how else None,
            "tid": ev["tid"] if how else None,
            "comm": ev["comm"] if how else None,
            "old": _STATE_NAMES.get(ev["old"]) or schema.state_name(ev["old"]),
            "new": _STATE_NAMES.get(ev["new"]) or schema.state_name(ev["new"]),
            "duration_s": None if flags & self._F_PREV_UNKNOWN else round(ev["prev_ns"] / 1e9, 6),
            "owner": how,
        }
        if self._symbolize is not None and (ev["kstack_id"] >= 0 or ev["ustack_id"] >= 0):
            rec.update(self._symbolize(ev))
        return rec

    def _close_wait_record(self, ev: dict, t: _Tracked | None) -> dict:
        flags, ts = ev["flags"], ev["ts_ns"]
        cw_unknown = bool(flags & self._F_CW_UNKNOWN)
        # We saw it enter CLOSE_WAIT ourselves: our own `since` holds even if the kernel lost it.
        saw_entry = t is not None and not t.preexisting
        if saw_entry:
            since_ns: int | None = t.since_ns
        else:
            since_ns = None if cw_unknown else ts - ev["cw_ns"]
        if not cw_unknown:
            duration: float | None = _secs(ev["cw_ns"])
        else:
            duration = None if since_ns is None else _secs(ts - since_ns)
        actor = flags & self._F_ACTOR
        netns = ev["netns"] or (t.netns if t is not None else 0)
        rec = self._ev_head("close_wait", ev, netns, self._closing_owner(ev, t))
        rec["duration_s"] = duration
        rec["since"] = None if since_ns is None else self._ts(since_ns)
        rec["new"] = schema.state_name(ev["new"])
        rec["outcome"] = outcome_name(ev["outcome"], ev["new"])
        rec["closer_pid"] = ev["actor_pid"] if actor else None
        rec["closer_tid"] = ev["actor_tid"] if actor else None
        rec["closer_comm"] = ev["actor_comm"] if actor else None
        rec["eof_read"] = bool(flags & self._F_EOF_READ) or (t is not None and t.eof_read)
        rec["leaked"] = t is not None and t.leaked
        rec["preexisting"] = t.preexisting if t is not None else cw_unknown
        if self.causes is not None:
            rec["cause"] = ended_cause(
                rec["outcome"], duration, rec["leaked"], self.causes.slow_close_s
            )
        return rec

    def _closing_owner(self, ev: dict, t: _Tracked | None) -> Who:
        """pid, tid, comm of a close_wait record: the event's owner, else the owner seen on an
        earlier event, else the holder found at leak time, else the closer itself."""
        owner = self._event_owner(ev) or (t.owner if t is not None else None)
        if owner is not None:
            return (owner.pid, owner.tid, owner.comm)
        if t is not None and t.holder is not None:
            return (t.holder[0], None, t.holder[1])  # /proc names processes, not threads
        if ev["flags"] & self._F_ACTOR:
            return (ev["actor_pid"], ev["actor_tid"], ev["actor_comm"])
        return (None, None, None)


    # ------------------------------------------------------------------ leaks

    def tick(self, now_mono_ns: int) -> list[dict]:
        """`leak` records for sockets whose age reached leak_after_s: once per socket.

        Looks only at the oldest pending sockets, and calls resolve() once with all of them.
        If resolve() raises, nothing is consumed: the next tick tries again.
        (take_due() and leak_records() are the same in two steps, for a caller that
        resolves elsewhere, e.g. on another thread.)
        """
        due = self.take_due(now_mono_ns)
        if not due:
            return []
        try:
            found = self._resolve(self.keys(due)) if self._resolve else {}
        except BaseException:
            self.requeue(due)
            raise
        return self.leak_records(due, found, now_mono_ns)

    def take_due(self, now_mono_ns: int) -> list[_Tracked]:
        """The sockets whose age reached leak_after_s, taken out of the pending ones.

        Until leak_records() reports them they are `resolving`: if one leaves CLOSE_WAIT
        meanwhile, its leak record comes at once, before its close_wait record.
        """
        if self._start_ns is None:
            self._start_ns = now_mono_ns
        limit = now_mono_ns - self.leak_after_ns
        due = []
        for tracked in self._pending:
            if tracked.since_ns > limit:
                break
            due.append(tracked)
        for tracked in due:
            del self._pending[tracked]
            tracked.resolving = True
        held = self._held(limit) if self._held is not None else ()
        if held:
            for tracked in held:
                self._by_sk[tracked.sk] = tracked
                tracked.resolving = True
            due = sorted([*due, *held], key=_since) if due else held
        return due

    @staticmethod
    def keys(due: list[_Tracked]) -> list[tuple]:
        """The resolver's keys for sockets from take_due(), each once."""
        return list(dict.fromkeys(t.key() for t in due))

    def requeue(self, due: list[_Tracked]) -> None:
        """Sockets from take_due() whose lookup failed: due again at the next take_due()."""
        back = [t for t in due if t.resolving]
        for t in back:
            t.resolving = False
        if back:
            rest = list(self._pending)
            self._pending.clear()
            for t in [*back, *rest]:
                self._pending[t] = None

    def leak_records(self, due: list[_Tracked], found: dict, now_mono_ns: int) -> list[dict]:
        """`leak` records for sockets from take_due(), with what resolve() found for their
        keys; those that left CLOSE_WAIT meanwhile were reported already and are skipped."""
        return list(self.iter_leak_records(due, found, now_mono_ns))

    def iter_leak_records(self, due: list[_Tracked], found: dict, now_mono_ns: int
                          ) -> Iterator[dict]:
        """leak_records() one at a time, taking each socket's entry out of `found` as its
        record is made: a batch of 100,000 is never all in memory at once, as records or as
        what resolve() found."""
        for t in due:
            if t.resolving:
                t.resolving = False
                yield self._leak_record(t, found.pop(t.key(), None), now_mono_ns)

    def _leak_record(self, t: _Tracked, hit: tuple | None, now_ns: int) -> dict:
        entry, holders = hit if hit is not None else (None, [])
        if entry is not None:
            t.netns = t.netns or entry.netns
            t.rx_queue, t.inode, t.fin_raw = entry.unread, entry.inode, entry.rx_queue
        if holders:
            t.holder = (holders[0].pid, holders[0].comm)
            who: Who = (holders[0].pid, None, holders[0].comm)
        elif t.owner is not None:
            who = (t.owner.pid, t.owner.tid, t.owner.comm)
        else:
            who = (None, None, None)
        t.leaked = True
        self.leaks += 1
        rec = self._tracked_head("leak", now_ns, t, who)
        rec["age_s"] = _secs(now_ns - t.since_ns)
        rec["since"] = None if t.preexisting else self._ts(t.since_ns)
        rec["holders"] = [{"pid": h.pid, "comm": h.comm, "fd": h.fd} for h in holders]
        rec["owner_pid"] = t.owner.pid if t.owner else None
        rec["owner_comm"] = t.owner.comm if t.owner else None
        rec["rx_queue"] = t.rx_queue  # from now, else as last seen in /proc (pre-existing)
        rec["inode"] = t.inode
        rec["eof_read"] = t.eof_read
        rec["preexisting"] = t.preexisting
        if self.causes is not None:
            rec["cause"] = self.stuck_cause(t, [h.pid for h in holders] if entry else None)
        return rec

    def stuck_cause(self, t: _Tracked, holders: list[int] | None) -> str:
        """classify.stuck_cause() from what is known of a tracked socket and its holders."""
        owner = (t.owner.pid, t.owner.how) if t.owner is not None else None
        return stuck_cause(
            inode=t.inode, rx_queue=t.fin_raw, holders=holders, owner=owner,
            eof_read=t.eof_read, recv_eof=bool(self.causes and self.causes.recv_eof),
        )

    # ------------------------------------------------------------ pre-existing

    def seed_existing(self, entries: list, holders: dict, now_mono_ns: int) -> list[dict]:
        """`existing` records for sockets already in CLOSE_WAIT, tracked from now on.

        entries: procnet.TcpEntry-like (netns, family, laddr, lport, raddr, rport, state,
        rx_queue, inode); entries in other states are skipped. holders: inode -> [holder].
        Their age counts from now (flagged preexisting) and their sk stays unknown until a
        kernel event for the same tuple arrives. A socket the kernel already reported
        entering CLOSE_WAIT is not pre-existing and is skipped.

        >>> e = TcpEntry(0, 4, "10.0.0.1", 80, "10.0.0.9", 4000, 8, 0, 1, 0, 92)  # doctest: +SKIP
        >>> held = {92: [Holder(812, "server", 5)]}                   # doctest: +SKIP
        >>> agg.seed_existing([e], held, now)[0]["pid"]               # doctest: +SKIP
        812
        """
        return list(self.iter_existing(entries, holders, now_mono_ns))

    def iter_existing(self, entries: list, holders: dict, now_mono_ns: int,
                      consume: bool = False) -> Iterator[dict]:
        """seed_existing(), one record at a time: with 100,000 sockets already in CLOSE_WAIT,
        a list of their records alone would take ~150 MB. Each socket is tracked as its
        record is taken. consume: empty `entries` and `holders` on the way (for a caller done
        with them: at 100,000 sockets they are ~55 MB, freed while the tracked sockets grow
        instead of on top of them)."""
        if self._start_ns is None:
            self._start_ns = now_mono_ns
        known = self._known_tuples()
        for i, e in enumerate(entries):
            if consume:
                entries[i] = None
            if e.state not in (CLOSE_WAIT, "CLOSE_WAIT"):
                continue
            key = _match_key(e.laddr, e.lport, e.raddr, e.rport)
            if any(_netns_match(ns, e.netns) for ns in known.get(key, ())):
                continue
            known.setdefault(key, []).append(e.netns)
            t = _Tracked(
                None, _family(e.family), e.laddr, e.lport, e.raddr, e.rport, e.netns,
                now_mono_ns, preexisting=True,
            )
            t.rx_queue, t.inode, t.fin_raw = e.unread, e.inode, e.rx_queue
            # inode 0: still in the accept queue, nobody can hold it yet.
            held = ((holders.pop if consume else holders.get)(e.inode, [])
                    if e.inode else [])
            if held:
                t.holder = (held[0].pid, held[0].comm)
            self._unbound.setdefault(key, []).append(t)
            self._insert_pending(t)
            yield self._existing_record(t, held, now_mono_ns)

    def _known_tuples(self) -> dict[tuple, list[int]]:
        """match key -> netns of every socket tracked now (built once per seed)."""
        self._adopt_held()
        known: dict[tuple, list[int]] = {}
        for t in self._by_sk.values():
            known.setdefault(t.match_key(), []).append(t.netns)
        for key, ts in self._unbound.items():
            known.setdefault(key, []).extend(t.netns for t in ts)
        return known

    def _existing_record(self, t: _Tracked, held: list, now_ns: int) -> dict:
        who = (held[0].pid, None, held[0].comm) if held else (None, None, None)
        rec = self._tracked_head("existing", now_ns, t, who)
        rec["state"] = "CLOSE_WAIT"
        rec["holders"] = [{"pid": h.pid, "comm": h.comm, "fd": h.fd} for h in held]
        rec["owner_pid"] = None  # the kernel hooks have not seen it yet
        rec["owner_comm"] = None
        rec["rx_queue"] = t.rx_queue
        rec["inode"] = t.inode
        rec["eof_read"] = False
        rec["preexisting"] = True
        return rec

    # ----------------------------------------------------------- bookkeeping

    def note_lost(self, dropped: int, now_mono_ns: int, missed: int = 0) -> list[dict]:
        """A `lost` record when the kernel's lost-event totals grew, else [].

        dropped: events the buffer had no room for; missed: transitions the kernel skipped
        our program for. `total` counts both: every transition we did not see.

        >>> agg.note_lost(12, now, missed=1), agg.note_lost(12, now, missed=1)  # doctest: +SKIP
        ([{'event': 'lost', 'ts': '...', 'count': 13, 'total': 13, 'dropped': 12,
           'missed': 1}], [])
        """
        total = dropped + missed
        if total <= self.lost:
            return []
        count, self.lost, self.missed = total - self.lost, total, missed
        return [{"event": "lost", "ts": self._ts(now_mono_ns), "count": count, "total": total,
                 "dropped": dropped, "missed": missed}]

    def summary(self, now_mono_ns: int) -> dict:
        """The last record of a log.

        >>> agg.summary(1_030 * 10**9)                                  # doctest: +SKIP
        {'event': 'summary', 'ts': '2026-11-21T05:13:30.000000Z', 'events': 5,
         'transitions': 4, 'close_waits': 1, 'leaks': 1, 'lost': 0, 'elapsed_s': 30.0}
        """
        start = now_mono_ns if self._start_ns is None else self._start_ns
        return {
            "event": "summary",
            "ts": self._ts(now_mono_ns),
            "events": self.events,
            "transitions": self.transitions,
            "close_waits": self.close_waits,
            "leaks": self.leaks,
            "lost": self.lost,
            "missed": self.missed,
            "elapsed_s": _secs(now_mono_ns - start),
        }

"""The hot path of `tcpwatch trace`: raw kernel events to NDJSON lines, without dicts.

Under a connection churn the agent gets ~12 kernel events per connection, hundreds of
thousands a second. The general path (schema.decode -> Aggregator.feed -> one dict per
record -> orjson per sink) costs several microseconds an event. FastPath handles the events
that make up almost all of such a load straight from the raw bytes, with one
struct.unpack_from per event and cached text for what repeats (addresses, sk, comm, state
names, durations, the date and time to the second):

* a transition of a socket the aggregator does not track, not into or out of CLOSE_WAIT:
  its `state` line;
* a socket entering CLOSE_WAIT: its `state` line, and the aggregator tracks it from now on;
* EOF and owner news about a tracked socket (the tracked socket is updated), or about a
  socket it does not track (nothing to do, as in Aggregator.feed);
* a tracked socket leaving CLOSE_WAIT: its `state` and `close_wait` lines; tracking ends.

Everything else (an event for a tracked socket that is not a CLOSE_WAIT exit, a socket that
may be a pre-existing one, an unknown kind) goes through Aggregator.feed as before, in
order with the rest. The lines are byte for byte what orjson writes for the records of the
general path (tests/unit/test_fastpath.py runs both on random streams), and the
aggregator's counters and tracked sockets end up exactly as feed() would leave them.

Most of a churn's events are transitions of untracked sockets, neither into nor out of
CLOSE_WAIT: with the compiled module tcpwatch._fastlines (built at install when a C compiler
is there) those lines are written in C, straight from the ring buffer's memory, and only the
other events reach the loop below, in order (see _fastlines.c for what it hands back).

Sinks that take lines (`write_lines`: the NDJSON sinks) get them in chunks. Other sinks
(the table) must be rate-limited (`state_room`/`not_shown`): a record is built for them
only while they have room, since building records is what this path avoids.

>>> fast = FastPath.build(agg, sinks, keep=None)          # doctest: +SKIP
>>> fast.process(source.poll(0.1))                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson

from tcpwatch import schema
from tcpwatch.aggregate import LAST_ACK, Aggregator, Owner, _match_key, _Tracked, outcome_name
from tcpwatch.classify import SLOW_CLOSE_S, ended_cause

try:
    from tcpwatch import _fastlines
except ImportError:  # built without a C compiler: the pure-Python path does it all
    _fastlines = None

# The fields the fast path reads for every event, and those it reads only when a socket
# leaves CLOSE_WAIT; each tuple in the order of struct tw_event (checked when building: with
# another order the general path is used). saddr and daddr are read as one 32 bytes.
FIELDS = ("ts_ns", "sk", "prev_ns", "saddr", "daddr", "pid", "tid", "netns", "family", "sport",
          "dport", "kind", "oldstate", "newstate", "flags", "comm")
EXIT_FIELDS = ("cw_ns", "actor_pid", "actor_tid", "outcome", "actor_comm")
CHUNK = 1024  # events per chunk: lines go to the sinks once per chunk
CACHE_MAX = 16384  # entries per text cache; a full cache starts again
_NS = 1_000_000_000
# Below 1000 s, rounding the integer ns to microseconds gives round(ns / 1e9, 6) (the float's
# error is far below the 1 ns that separates a value from a half-microsecond tie).
_EXACT_BELOW_NS = 10**12
_DUMPS_OPT = orjson.OPT_APPEND_NEWLINE
_DIGITS3 = tuple(f"{i:03d}" for i in range(1000))
_NULL_WHO = '"pid":null,"tid":null,"comm":null'
_STATE_NAMES = tuple(schema.state_name(n) for n in range(256))
_NULL_CLOSER = '"closer_pid":null,"closer_tid":null,"closer_comm":null'
# Use tcpwatch._fastlines when it is there; tests turn it off to compare, and so does
# TCPWATCH_FASTLINES=0 in the environment (scripts/bench's trace-py mode).
COMPILED = True
# With it, sockets that enter CLOSE_WAIT in its runs are held there until Python must see
# them (see "held sockets" in _fastlines.c); TCPWATCH_HOLD=0 turns that off. At most
# HELD_MAX at once (~90 bytes each, twice that in its table): the others go to Python.
HOLD = True
HELD_MAX = 65536
# Durations (in microseconds) the compiled formatter must write as orjson does before it is
# used: every form orjson's float output takes (0.0, 1e-6, 0.000012, 1.5, 100000.0, ...).
_SECS_PROBES = (0, 1, 7, 12, 120, 999, 1_000, 1_500, 10_000, 123_456, 1_000_000, 1_500_000,
                12_345_678, 100_000_000, 999_999_999_999, 10**11, 3 * 10**11 + 1)


@lru_cache(maxsize=1)
def _ports() -> tuple[str, ...]:
    """Every port number as text, made once (a tuple index is cheaper than str())."""
    return tuple(map(str, range(65536)))


def unpacker(lay: schema.Layout, names: tuple[str, ...]) -> Callable[[bytes], tuple] | None:
    """struct.unpack_from for `names` of `lay` (other fields skipped), or None if the layout
    does not have them in that order, or has saddr without daddr right after it."""
    where = {name: (off, size) for name, off, size in lay.fields}
    if any(name not in where for name in names):
        return None
    if tuple(sorted(names, key=lambda n: where[n][0])) != names:
        return None
    if "saddr" in names and (
        where["saddr"][1] != 16 or where.get("daddr") != (where["saddr"][0] + 16, 16)
        or "daddr" not in names
    ):
        return None
    fmt, pos = "=", 0
    for name in names:
        if name == "daddr":
            continue
        off, size = where[name]
        code = lay.codes[name]
        if name == "saddr":
            code, size = "32s", 32
        if off < pos:
            return None
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        pos = off + size
    return struct.Struct(fmt).unpack_from


def secs_text(ns: int, cache: dict) -> tuple[float, str]:
    """(round(ns / 1e9, 6), its orjson text), as Aggregator's records have them.

    Rounding the integer to microseconds gives the same float as round() except on an exact
    half microsecond or far above 1000 s (float precision): those take round() itself.

    >>> secs_text(1_500_000_499, {}), secs_text(12_345, {}), secs_text(1_000, {})
    ((1.5, '1.5'), (1.2e-05, '0.000012'), (1e-06, '1e-6'))
    """
    if 0 <= ns < _EXACT_BELOW_NS:
        q, rem = divmod(ns, 1000)
        if rem != 500:
            if rem > 500:
                q += 1
            text = cache.get(q)
            if text is None:
                if len(cache) >= CACHE_MAX:
                    cache.clear()
                text = cache[q] = orjson.dumps(q / 1e6).decode()
            return q / 1e6, text
    value = round(ns / 1e9, 6)
    return value, orjson.dumps(value).decode()


class FastPath:
    """Processes raw event batches for a TraceLoop: lines to line sinks, records (rarely)
    to rate-limited record sinks, the rest through the aggregator."""

    def __init__(self, agg: Aggregator, line_sinks: list, record_sinks: list,
                 unpack: Callable[[bytes], tuple], unpack_exit: Callable[[bytes], tuple]) -> None:
        self.agg = agg
        self.line_sinks = line_sinks
        self.record_sinks = record_sinks
        self._unpack = unpack
        self._unpack_exit = unpack_exit
        c = schema.layout().consts
        self._k = (c["TW_KIND_STATE"], c["TW_KIND_EOF"], c["TW_KIND_OWNER"])
        self._f = (c["TW_F_OWNER"], c["TW_F_OWNER_LISTENER"], c["TW_F_PREV_UNKNOWN"],
                   c["TW_F_ACTOR"], c["TW_F_EOF_READ"], c["TW_F_CW_UNKNOWN"])
        # The wall-clock second of the last line: its start as CLOCK_MONOTONIC ns, the start
        # of a `state` line for each of its milliseconds, its date and time.
        self._second: tuple[int, tuple[str, ...], str] = (-(1 << 80), (), "")  # none yet
        self._sk: dict[int, str] = {}
        self._addrs: tuple[dict, dict] = ({}, {})  # v4, v6: 32 raw bytes -> texts
        # (netns, pid, tid, raw comm, old, new, flags) -> the `state` line from "netns" to
        # "duration_s":, from "owner" to the end, and the owner's fields (None if unknown)
        self._mid: dict[tuple, tuple[str, str, str | None]] = {}
        self._who_text: dict[tuple, str] = {}  # (pid, tid, comm or None) -> '"pid":..,..'
        self._comm: dict[bytes, str] = {}
        self._owners: dict[tuple, Owner] = {}  # (pid, tid, raw comm, owner flags) -> Owner
        self._closers: dict[tuple, str] = {}  # (actor pid, tid, raw comm) -> closer fields
        self._secs: dict[int, str] = {}  # microseconds -> duration text
        self.fast = 0  # events handled here (the rest went through Aggregator.feed)
        self.in_c = 0  # of those, handled by the compiled formatter
        self.adopted = 0  # sockets held in C handed over for an event C did not handle
        self.handed = 0  # ... and handed over when due or all asked for (_take_held)
        self._c = self._compiled()
        self.compiled = self._c is not None  # plain transitions are written in C

    def _compiled(self) -> Any:
        """The compiled formatter, or None: not built, turned off, built for another event
        layout, or writing numbers otherwise than this orjson does."""
        if _fastlines is None or not COMPILED or os.environ.get("TCPWATCH_FASTLINES") == "0":
            return None
        lay = schema.layout()
        size, fields = _fastlines.LAYOUT  # as the module was built: (size, (name, off, size)s)
        where = {name: (off, n) for name, off, n in lay.fields}
        if size != lay.size or any(where.get(name) != (off, n) for name, off, n in fields):
            return None
        fmt = _fastlines.Formatter(_STATE_NAMES, self.agg.mono_to_wall_ns)
        if any(fmt.secs(q) != secs_text(q * 1000, {})[1] for q in _SECS_PROBES):
            return None
        if HOLD and os.environ.get("TCPWATCH_HOLD") != "0":
            causes = self.agg.causes
            names = tuple(tuple(outcome_name(o, new) for o in range(256))
                          for new in (schema.STATE_NUMBERS["CLOSE"], LAST_ACK))
            fmt.configure(names, tuple(tuple(ended_cause(n, None) for n in ns) for ns in names),
                          causes is not None, causes.slow_close_s if causes else SLOW_CLOSE_S,
                          HELD_MAX)
            self.agg._held = self._take_held
        return fmt

    @classmethod
    def build(cls, agg: Aggregator, sinks: list, keep: Callable | None = None) -> FastPath | None:
        """A FastPath for these sinks, or None when the general path must run: a record
        filter (--pid), stacks to symbolize, no line sink, a record sink without a rate
        limit (the table as the only output shows every row), or an unexpected layout."""
        if keep is not None or agg._symbolize is not None:
            return None
        lines = [s for s in sinks if hasattr(s, "write_lines")]
        records = [s for s in sinks if not hasattr(s, "write_lines")]
        if not lines or not all(getattr(s, "limited", False) for s in records):
            return None
        unpack = unpacker(schema.layout(), FIELDS)
        unpack_exit = unpacker(schema.layout(), EXIT_FIELDS)
        if unpack is None or unpack_exit is None:
            return None
        return cls(agg, lines, records, unpack, unpack_exit)

    # ------------------------------------------------------------------- batches

    def process(self, batch: list[bytes]) -> None:
        """All events of one poll, in order; lines reach the sinks at the end of each chunk."""
        if not batch:
            return
        agg = self.agg
        if agg._start_ns is None:
            agg._start_ns = self._unpack(batch[0])[0]
        if self._c is not None:
            batch = self._c.scan_list(batch, agg._by_sk, bool(agg._unbound), self._room(),
                                      bool(self.record_sinks))[0]
        self.process_items(batch)

    def ring_scanner(self) -> Callable[[Any, int, int, int], tuple[list, int]] | None:
        """For a ring buffer read in place (ringbuf.MmapRing.drain_with): a function that
        walks the records between offsets of its memory and writes the plain ones,
        returning (items for process_items, the offset reached); None without the
        compiled module."""
        if self._c is None:
            return None
        scan_ring = self._c.scan_ring
        agg = self.agg
        records = bool(self.record_sinks)

        def scan(buf: Any, start: int, end: int, stop: int) -> tuple[list, int]:
            items, reached, first_ts = scan_ring(buf, start, end, agg._by_sk,
                                                 bool(agg._unbound), self._room(), records,
                                                 stop)
            if agg._start_ns is None and first_ts is not None:
                agg._start_ns = first_ts
            return items, reached

        return scan

    def process_items(self, items: list) -> None:
        """Raw events and runs of lines the compiled formatter wrote, in order."""
        for i in range(0, len(items), CHUNK):
            lines: list[bytes] = []
            extra = self._chunk(items[i:i + CHUNK] if len(items) > CHUNK else items, lines)
            self._write(lines, extra)

    def _write(self, lines: list[bytes], extra: int) -> None:
        """lines (holding len(lines) + extra lines) to every line sink."""
        if lines:
            data = b"".join(lines)
            for sink in self.line_sinks:
                sink.write_lines(data, len(lines) + extra)

    def _room(self) -> int:
        if not self.record_sinks:
            return 0
        return min(s.state_room() for s in self.record_sinks)

    def _general(self, raw: bytes, lines: list[bytes]) -> None:
        """One event through decode() and Aggregator.feed(), its records to every sink."""
        for rec in self.agg.feed(schema.decode(raw)):
            lines.append(orjson.dumps(rec, option=_DUMPS_OPT))
            for sink in self.record_sinks:
                sink.write(rec)

    def _new_second(self, ts: int) -> tuple[int, tuple[str, ...], str]:
        """The second `ts` falls in: its start (CLOCK_MONOTONIC ns), the start of a `state`
        line for each of its milliseconds, its date and time."""
        wall = ts + self.agg.mono_to_wall_ns
        sec = wall // _NS
        date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        head = f'{{"event":"state","ts":"{date}.'
        self._second = (sec * _NS - self.agg.mono_to_wall_ns,
                        tuple([head + ms for ms in _DIGITS3]), date)
        return self._second

    def _chunk(self, batch: list, lines: list[bytes]) -> int:  # noqa: C901
        """Events of `batch` (raw bytes, or (lines, count, events) runs from the compiled
        formatter) to `lines`; returns how many lines more than len(lines) there are."""
        agg = self.agg
        by_sk = agg._by_sk
        get = by_sk.get
        pending = agg._pending
        unbound = agg._unbound
        unpack = self._unpack
        append = lines.append
        k_state, k_eof, k_owner = self._k
        f_owner, f_listener, f_prev_unknown, _, f_eof_read, _ = self._f
        f_known = f_owner | f_listener
        cw_state = schema.CLOSE_WAIT
        af6 = socket.AF_INET6
        ns = _NS
        exact_below = _EXACT_BELOW_NS
        digits = _DIGITS3
        ports = _ports()
        sk_cache, mid_cache, secs_cache = self._sk, self._mid, self._secs
        owner_cache = self._owners
        addr4, addr6 = self._addrs
        base, prefix, date = self._second
        room = self._room()
        hidden = hidden_closes = closes = 0
        general = not_state = 0  # events that went through feed(); fast ones not transitions
        extra = in_c = 0  # lines in runs beyond the one item each adds to `lines`
        run_more = 0  # events in runs beyond the one item each is in `batch`
        for raw in batch:
            if raw.__class__ is tuple:
                if len(raw) != 6:  # a socket held in C: tracked here from now on
                    self._adopt(raw)
                    run_more -= 1  # not an event
                    continue
                # a run of events written in C: lines, events, transitions, close_wait
                # lines, and of those the routine closes
                data, n, evs, trans, cws, routine = raw
                if n:
                    append(data)
                    extra += n - 1
                    if extra >= CHUNK:  # long runs: out now, so that memory stays bounded
                        self._write(lines, extra)
                        lines.clear()
                        extra = 0
                hidden += trans
                hidden_closes += routine
                closes += cws
                not_state += evs - trans
                run_more += evs - 1
                in_c += evs
                continue
            ts, sk, prev, addrs, pid, tid, netns, fam, sport, dport, kind, old, new, flags, comm = (
                unpack(raw)
            )
            if kind != k_state:
                if kind in (k_eof, k_owner):
                    t = get(sk)
                    if t is None:
                        if unbound and self._may_bind(addrs, fam, sport, dport):
                            self._general(raw, lines)
                            general += 1
                            continue
                    else:
                        if flags & f_eof_read:
                            t.eof_read = True
                        if flags & f_known:
                            owner = owner_cache.get((pid, tid, comm, flags & f_known))
                            t.owner = owner or self._owner(pid, tid, comm, flags & f_known)
                # An EOF or owner event, or a kind from a newer kernel side: no record.
                not_state += 1
                continue
            t = get(sk)
            if old == cw_state:
                if t is None or new == cw_state or t.preexisting or t.resolving:
                    self._general(raw, lines)
                    general += 1
                    continue
            elif t is not None:
                self._general(raw, lines)  # stale tracking or a late event: feed() decides
                general += 1
                continue
            elif new == cw_state and unbound and self._may_bind(addrs, fam, sport, dport):
                self._general(raw, lines)
                general += 1
                continue

            # --- the `state` line
            d = ts - base
            if d >= ns or d < 0:
                base, prefix, date = self._new_second(ts)
                d = ts - base
            skx = sk_cache.get(sk)
            if skx is None:
                if len(sk_cache) >= CACHE_MAX:
                    sk_cache.clear()
                skx = sk_cache[sk] = f"{sk:#x}"
            texts = (addr6 if fam == af6 else addr4).get(addrs)
            if texts is None:
                texts = self._addr_texts(addrs, fam)
            mid = mid_cache.get((netns, pid, tid, comm, old, new, flags))
            if mid is None:
                mid = self._mid_texts(netns, pid, tid, comm, old, new, flags)
            if flags & f_prev_unknown:
                dur = "null"
            elif prev < exact_below and prev % 1000 != 500:
                dur = secs_cache.get((prev + 500) // 1000)
                if dur is None:
                    dur = secs_text(prev, secs_cache)[1]
            else:
                dur = secs_text(prev, secs_cache)[1]
            append(
                f'{prefix[d // 1000000]}{digits[d // 1000 % 1000]}Z","sk":"{skx}",'
                f'{texts[0]},"lport":{ports[sport]},"raddr":"{texts[2]}","rport":{ports[dport]},'
                f"{mid[0]}{dur}{mid[1]}".encode()
            )
            ev = None
            if room > 0:  # the table shows this transition: it needs the record
                room -= 1
                ev = schema.decode(raw)
                rec = agg._state_record(ev)
                for sink in self.record_sinks:
                    sink.write(rec)
            else:
                hidden += 1

            if old == cw_state:
                # A tracked socket leaves CLOSE_WAIT (not a pre-existing one: see above).
                routine = self._close_wait(raw, t, ts, d, skx, texts, sport, dport, netns,
                                           mid[2], new, flags, lines)
                if self.record_sinks:
                    if routine and room <= 0:
                        hidden_closes += 1
                    else:
                        if routine:
                            room -= 1
                        rec = agg._close_wait_record(ev or schema.decode(raw), t)
                        for sink in self.record_sinks:
                            sink.write(rec)
                agg.close_waits += 1
                if by_sk.get(sk) is t:
                    del by_sk[sk]
                pending.pop(t, None)
            elif new == cw_state:
                owner = None
                if flags & f_known:
                    owner = owner_cache.get((pid, tid, comm, flags & f_known))
                    if owner is None:
                        owner = self._owner(pid, tid, comm, flags & f_known)
                t = _Tracked(sk, 6 if fam == af6 else 4, texts[1], sport, texts[2], dport,
                             netns, ts, owner)
                by_sk[sk] = t
                agg._insert_pending(t)
        self._second = (base, prefix, date)
        fast = len(batch) + run_more - general
        agg.events += fast
        agg.transitions += fast - not_state
        agg.close_waits += closes
        self.fast += fast
        self.in_c += in_c
        if (hidden or hidden_closes) and self.record_sinks:
            for sink in self.record_sinks:
                sink.not_shown(hidden, hidden_closes)
        return extra

    # ------------------------------------------------------------------- records

    def _close_wait(self, raw: bytes, t: _Tracked, ts: int, d: int, skx: str, texts: tuple,
                    sport: int, dport: int, netns: int, who: str | None, new: int, flags: int,
                    lines: list[bytes]) -> bool:
        """The `close_wait` line of a tracked socket that saw its own entry (as
        Aggregator._close_wait_record does it); True for a routine close (cause `closed`).
        d: ts less the start of its second; who: the event's owner fields, None if unknown."""
        agg = self.agg
        cw, apid, atid, outcome, acomm = self._unpack_exit(raw)
        _, _, _, f_actor, f_eof_read, f_cw_unknown = self._f
        since_ns = t.since_ns
        duration, dur = secs_text(ts - since_ns if flags & f_cw_unknown else cw, self._secs)
        if who is None:  # no owner on the event: as Aggregator._closing_owner
            if t.owner is not None:
                who = self._who_of(t.owner.pid, t.owner.tid, t.owner.comm)
            elif t.holder is not None:
                who = self._who_of(t.holder[0], None, t.holder[1])
            elif flags & f_actor:
                who = self._who_of(apid, atid, self._comm_text(acomm))
            else:
                who = _NULL_WHO
        name = outcome_name(outcome, new)
        if flags & f_actor:
            closer = self._closers.get((apid, atid, acomm)) or self._closer(apid, atid, acomm)
        else:
            closer = _NULL_CLOSER
        leaked = t.leaked
        causes = agg.causes
        cause = ended_cause(name, duration, leaked,
                            causes.slow_close_s if causes else SLOW_CLOSE_S)
        base, _, date = self._second
        ds = since_ns - base
        since = (f"{date}.{_DIGITS3[ds // 1000000]}{_DIGITS3[ds // 1000 % 1000]}Z"
                 if 0 <= ds < _NS else agg._ts(since_ns))
        lines.append((
            f'{{"event":"close_wait","ts":"{date}.{_DIGITS3[d // 1000000]}'
            f'{_DIGITS3[d // 1000 % 1000]}Z","sk":"{skx}",{texts[0]},"lport":{sport},'
            f'"raddr":"{texts[2]}","rport":{dport},"netns":{netns or t.netns or "null"},{who},'
            f'"duration_s":{dur},"since":"{since}","new":"{_STATE_NAMES[new]}",'
            f'"outcome":"{name}",{closer},'
            f'"eof_read":{"true" if flags & f_eof_read or t.eof_read else "false"},'
            f'"leaked":{"true" if leaked else "false"},"preexisting":false'
            + (f',"cause":"{cause}"}}\n' if causes is not None else "}\n")
        ).encode())
        return cause == "closed"

    # ------------------------------------------------------------------ held sockets

    def _tracked_of(self, row: tuple) -> _Tracked:
        """The _Tracked of a socket held in C (_fastlines.c's held_tuple()), as the Python
        path would have made it at its entry and updated it since."""
        sk, since, v6, addrs, sport, dport, netns, pid, tid, comm, known, eof_read = row
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        texts = self._addrs[1 if v6 else 0].get(addrs) or self._addr_texts(addrs, fam)
        owner = None
        if known:
            owner = self._owners.get((pid, tid, comm, known)) or self._owner(pid, tid, comm,
                                                                             known)
        t = _Tracked(sk, 6 if v6 else 4, texts[1], sport, texts[2], dport, netns, since, owner)
        t.eof_read = bool(eof_read)
        return t

    def _adopt(self, row: tuple) -> None:
        """A socket held in C that an event about to come here is about."""
        t = self._tracked_of(row)
        self.adopted += 1
        self.agg._adopt(t)

    def _take_held(self, limit_ns: int | None) -> list[_Tracked]:
        """Aggregator._held: the sockets held in C that entered CLOSE_WAIT by limit_ns (all
        with None), oldest first, as _Tracked; C holds them no more."""
        out = [self._tracked_of(row) for row in self._c.take(limit_ns)]
        self.handed += len(out)
        return out

    # ------------------------------------------------------------------ text caches

    def _addr_texts(self, addrs: bytes, fam: int) -> tuple[str, str, str]:
        """('"family":"ipv4","laddr":"10.0.0.1"', "10.0.0.1", "10.0.0.2"), as decode() reads
        the two addresses (IPv4 from the first 4 of each 16 bytes)."""
        v6 = fam == socket.AF_INET6
        if v6:
            laddr = socket.inet_ntop(socket.AF_INET6, addrs[:16])
            raddr = socket.inet_ntop(socket.AF_INET6, addrs[16:])
        else:
            laddr = socket.inet_ntop(socket.AF_INET, addrs[:4])
            raddr = socket.inet_ntop(socket.AF_INET, addrs[16:20])
        cache = self._addrs[1 if v6 else 0]
        if len(cache) >= CACHE_MAX:
            cache.clear()
        texts = cache[addrs] = (
            f'"family":"{"ipv6" if v6 else "ipv4"}","laddr":"{laddr}"', laddr, raddr
        )
        return texts

    def _may_bind(self, addrs: bytes, fam: int, sport: int, dport: int) -> bool:
        """Whether Aggregator._bind could attach a pre-existing socket to this event."""
        texts = self._addrs[1 if fam == socket.AF_INET6 else 0].get(addrs)
        if texts is None:
            texts = self._addr_texts(addrs, fam)
        return _match_key(texts[1], sport, texts[2], dport) in self.agg._unbound

    def _comm_text(self, raw: bytes) -> str:
        text = self._comm.get(raw)
        if text is None:
            if len(self._comm) >= CACHE_MAX:
                self._comm.clear()
            text = self._comm[raw] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return text

    def _mid_texts(self, netns: int, pid: int, tid: int, comm: bytes, old: int, new: int,
                   flags: int) -> tuple[str, str, str | None]:
        """The `state` line from "netns" up to the duration's value, and after it."""
        f_owner, f_listener = self._f[:2]
        known: str | None = None
        if flags & (f_owner | f_listener):
            known = who = self._who_of(pid, tid, self._comm_text(comm))
            how = '"socket"' if flags & f_owner else '"listener"'
        else:
            who, how = _NULL_WHO, "null"
        if len(self._mid) >= CACHE_MAX:
            self._mid.clear()
        texts = self._mid[(netns, pid, tid, comm, old, new, flags)] = (
            f'"netns":{netns or "null"},{who},"old":"{_STATE_NAMES[old]}",'
            f'"new":"{_STATE_NAMES[new]}","duration_s":',
            f',"owner":{how}}}\n',
            known,  # the owner's fields, for a close_wait line
        )
        return texts

    def _owner(self, pid: int, tid: int, comm: bytes, known: int) -> Owner:
        """The Owner an event with these flags carries (shared: Owner is immutable)."""
        if len(self._owners) >= CACHE_MAX:
            self._owners.clear()
        owner = self._owners[(pid, tid, comm, known)] = Owner(
            pid, tid, self._comm_text(comm), "socket" if known & self._f[0] else "listener"
        )
        return owner

    def _closer(self, pid: int, tid: int, comm: bytes) -> str:
        if len(self._closers) >= CACHE_MAX:
            self._closers.clear()
        text = self._closers[(pid, tid, comm)] = (
            f'"closer_pid":{pid},"closer_tid":{tid},'
            f'"closer_comm":{orjson.dumps(self._comm_text(comm)).decode()}'
        )
        return text

    def _who_of(self, pid: Any, tid: Any, comm: Any) -> str:
        key = (pid, tid, comm)
        text = self._who_text.get(key)
        if text is None:
            if len(self._who_text) >= CACHE_MAX:
                self._who_text.clear()
            dumps = orjson.dumps
            text = self._who_text[key] = (
                f'"pid":{dumps(pid).decode()},"tid":{dumps(tid).decode()},'
                f'"comm":{dumps(comm).decode()}'
            )
        return text



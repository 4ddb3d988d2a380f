"""Where top's data comes from: the kernel programs (root) or /proc snapshots (no root).

Collecting and drawing are kept apart: a collector is pumped by the loop (`pump`) and asked
for a `model.Sample` when a frame is due (`sample`). Neither imports rich.

- KernelCollector: loader.KernelSource with only CLOSE_WAIT transitions sent
  (Options(states=(CLOSE_WAIT,))), fed through aggregate.Aggregator like `trace`; the sockets
  in CLOSE_WAIT come from Aggregator.in_close_wait(), their /proc details (inode, rx_queue,
  holders) and the host-wide figures from one procnet snapshot per frame (~10-40 ms).
- SnapshotCollector: /proc only, for users without root: ages from first sight, owners only
  for processes whose descriptors the user may read, causes only from /proc signals.

>>> col = SnapshotCollector(window_s=5.0)          # doctest: +SKIP
>>> col.pump(1.0); sample = col.sample()            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import compress
from typing import Any

from tcpwatch import procnet, schema
from tcpwatch.aggregate import outcome_name
from tcpwatch.classify import Causes, ended_cause, stuck_cause
from tcpwatch.procnet import Each, Tally, TcpEntry, canonical
from tcpwatch.timefmt import rfc3339
from tcpwatch.top import hostinfo
from tcpwatch.top.model import CwSock, Ended, Entered, Host, Sample, SockRef

CLOSE_WAIT = schema.CLOSE_WAIT
_C = schema.layout().consts
_KIND_STATE = _C["TW_KIND_STATE"]
_F_OWNER, _F_OWNER_LISTENER = _C["TW_F_OWNER"], _C["TW_F_OWNER_LISTENER"]
_F_ACTOR, _F_EOF_READ, _F_CW_UNKNOWN = _C["TW_F_ACTOR"], _C["TW_F_EOF_READ"], _C["TW_F_CW_UNKNOWN"]
Snapshot = Callable[[], list]  # a test's table, in place of procnet.snapshot()
HoldersOf = Callable[[Iterable[int]], dict]  # procnet.holders_of()


@lru_cache(maxsize=1)
def _exit_unpacker() -> Callable[[bytes], tuple]:
    """struct.unpack_from of what a CLOSE_WAIT exit needs (saddr+daddr as one 32 bytes)."""
    from tcpwatch.fastpath import unpacker

    names = ("ts_ns", "sk", "cw_ns", "saddr", "daddr", "pid", "actor_pid", "family", "sport",
             "dport", "kind", "oldstate", "newstate", "outcome", "flags", "comm", "actor_comm")
    unpack = unpacker(schema.layout(), names)
    if unpack is None:
        raise RuntimeError("tcpwatch.h: struct tw_event no longer has the exit fields in order")
    return unpack


class _ProcIndex:
    """The /proc CLOSE_WAIT entries by 4-tuple, for finding tracked sockets among them.

    Keyed by the address texts as given: sock_diag and the kernel map both spell an address
    with inet_ntop for the socket's own family, so they agree without canonical() per socket.
    A miss is looked up again by canonical 4-tuple (an index built on the first miss), so an
    IPv4 key still finds a dual-stack socket listed as ::ffff:a.b.c.d and vice versa. One
    4-tuple may be in several namespaces: the socket's own netns decides (0: the first).
    The dict is keyed by the 4-tuple's hash, an int (looking 100,000 sockets up by tuple
    took 3 times as long), and the entry found is checked field by field. Entries found
    are marked (a byte each, not a set of 100,000 ids): unused() is the rest.
    find_at() looks where a socket was in the last frame's table first: the dict (11 MB
    with its keys and positions at 100,000 sockets) is only built if one is elsewhere.
    """

    def __init__(self, cw: list[TcpEntry]) -> None:
        self.cw = cw
        self._exact: dict[int, int] | None = None  # hash(key) -> position, on first find
        self.more: dict[int, list[int]] = {}  # hashes of more than one entry
        self._canonical: dict[tuple, list[int]] | None = None
        self.used = bytearray(len(cw))
        self.at = -1  # the position of the entry the last find returned (-1: none)

    def exact(self) -> dict[int, int]:
        """hash(key) -> the position of the one entry with that hash (see `more`)."""
        if self._exact is None:
            exact: dict[int, int] = {}
            more = self.more
            for i, e in enumerate(self.cw):
                h = hash((e[2], e[3], e[4], e[5]))
                first = exact.setdefault(h, i)
                if first != i:
                    more.setdefault(h, [first]).append(i)
            self._exact = exact
        return self._exact

    def find_at(self, pos: int, key: tuple, netns: int) -> TcpEntry | None:
        """find(), looking first at position `pos`: where the socket was in the last frame
        (a dump lists the sockets that stayed in the same order). Only with a namespace:
        with 0, find() gives the first entry with the key, which `pos` may not be."""
        cw = self.cw
        if netns and 0 <= pos < len(cw):
            e = cw[pos]
            if (e[3] == key[1] and e[5] == key[3] and e[2] == key[0] and e[4] == key[2]
                    and e[0] == netns):
                self.used[pos] = 1
                self.at = pos
                return e
        return self.find(key, netns)

    def find(self, key: tuple, netns: int) -> TcpEntry | None:
        """The entry of a tracked socket: key (laddr, lport, raddr, rport)."""
        exact, cw = self.exact(), self.cw
        h = hash(key)
        i = exact.get(h)
        if i is None:
            return self._found(self._by_canonical(key), netns)
        if not self.more or h not in self.more:
            e = cw[i]
            if e[3] == key[1] and e[5] == key[3] and e[2] == key[0] and e[4] == key[2]:
                if netns and netns != e[0]:
                    self.at = -1
                    return None
                self.used[i] = 1
                self.at = i
                return e
            return self._found(self._by_canonical(key), netns)  # only its hash was the same
        # several entries with this hash: those with this very key (one per namespace), or
        # none (a collision of hashes alone)
        alike = [j for j in self.more[h] if cw[j][2:6] == key]
        return self._found(alike if alike else self._by_canonical(key), netns)

    def _by_canonical(self, key: tuple) -> Sequence[int]:
        if self._canonical is None:
            self._canonical = {}
            for j, c in enumerate(self.cw):
                self._canonical.setdefault(_tuple4(c[2], c[3], c[4], c[5]), []).append(j)
        return self._canonical.get(_tuple4(*key), ())

    def _found(self, cands: Iterable[int], netns: int) -> TcpEntry | None:
        """The first of these positions in the namespace (any, for netns 0), marked."""
        i = next((j for j in cands if not netns or netns == self.cw[j][0]), None)
        if i is None:
            self.at = -1
            return None
        self.used[i] = 1
        self.at = i
        return self.cw[i]

    def unused(self) -> list[TcpEntry]:
        """The entries find() never returned, in order."""
        if 0 not in self.used:
            return []
        return list(compress(self.cw, self.used.translate(_NOT)))


_NOT = bytes([1]) + bytes(255)  # bytes.translate table: 0 -> 1, anything else -> 0


def _tuple4(laddr: str, lport: int, raddr: str, rport: int) -> tuple:
    return (canonical(laddr), lport, canonical(raddr), rport)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection while a frame is built: a frame makes 100,000s of
    acyclic objects, and each full collection would walk all of them (seen: 1-2 s of a
    4.5 s frame with 100,000 sockets). Collections resume afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def age_seconds(age_ns: int) -> float:
    """round(age_ns / 1e9, 3), as ages were always rounded, in half the time: 100,000
    sockets' ages are worked out every frame.

    >>> age_seconds(1_234_567_890), age_seconds(2_000_500_001), age_seconds(-400_000)
    (1.235, 2.001, -0.0)
    """
    ms, rest = divmod(age_ns, 1_000_000)
    # Within 1 us of a tie the float age_ns / 1e9 may fall either side of it, negative
    # ages round to -0.0, and past 2**62 ns the float loses the microseconds: round() then.
    if -1000 < rest - 500_000 < 1000 or not 0 <= age_ns < 1 << 62:
        return round(age_ns / 1e9, 3)
    return (ms + (rest > 500_000)) / 1000


class _Known:
    """A socket in the `cw` map as the last frame showed it: its CwSock and what it was
    made from. h: the hash of the map entry's bytes (an int instead of the ~120-byte value
    per socket; a changed entry goes unnoticed with odds of ~1 in 2**64, as with seen_key());
    laddr, netns, owner, eof_read: what the entry says (the ports and the peer are the
    CwSock's); inode and rx_queue: those of its accepted /proc entry (None: not found, or
    not accepted); held: its holders; pos: where its /proc entry was in the last frame's
    table (-1: nowhere)."""

    __slots__ = ("h", "laddr", "netns", "owner", "eof_read", "inode", "rx_queue", "held",
                 "sock", "frame", "pos")

    def __init__(self, h: int, facts: tuple, e: TcpEntry | None, held: Sequence,
                 sock: CwSock, frame: int, pos: int) -> None:
        self.h, self.held, self.sock, self.pos = h, held, sock, pos
        (_, self.laddr, _, _, _), self.netns, _, self.owner, self.eof_read = facts
        accepted = e is not None and e.inode != 0
        self.inode = e.inode if accepted else None
        self.rx_queue = e.rx_queue if accepted else None
        self.frame = frame  # the last frame that saw it in the map (a byte: wraps)


class _Frame:
    """One frame's matching of tracked sockets: what it needs, and what it gives (the
    CwSocks in `sockets`, those that entered in the window also in `fresh`; the /proc
    entries matched are marked in the index)."""

    __slots__ = ("index", "holders", "listeners", "now_ns", "window_ns", "causes",
                 "sockets", "fresh")

    def __init__(self, index: _ProcIndex, holders: dict, listeners: dict, now_ns: int,
                 window_ns: float) -> None:
        self.index, self.holders, self.listeners = index, holders, listeners
        self.now_ns, self.window_ns = now_ns, window_ns
        self.causes: dict[tuple, str] = {}  # facts -> stuck_cause()
        self.sockets: list[CwSock] = []
        self.fresh: list[CwSock] = []

    def add(self, sock: CwSock, since_ns: int) -> None:
        self.sockets.append(sock)
        if since_ns >= self.window_ns:
            self.fresh.append(sock)  # entered in the window: the socket stands for its entry


def _since_reader(lay: schema.Layout) -> Callable[[bytes, int], tuple[int]]:
    """unpack_from of a `cw` value's ts_ns (entry into CLOSE_WAIT), at an offset."""
    off = next(off for name, off, _ in lay.fields if name == "ts_ns")
    reader = struct.Struct("=" + "x" * off + lay.codes["ts_ns"])
    return reader.unpack_from


def listener_inodes(entries: Iterable[TcpEntry]) -> dict[tuple[int, int, str], int]:
    """(netns, port, local address) -> inode of each LISTEN socket; "*" for a wildcard bind.

    A socket still in the accept queue (inode 0) has no holder of its own: the process
    holding its listener is the one that has not accepted it.
    """
    out = {}
    for e in entries:
        if e.state == hostinfo.LISTEN and e.inode:
            wild = canonical(e.laddr) in ("0.0.0.0", "::")
            out[(e.netns, e.lport, "*" if wild else canonical(e.laddr))] = e.inode
    return out


def listener_of(e: TcpEntry, listeners: dict[tuple[int, int, str], int]) -> int:
    """The inode of the listener an accept-queue socket waits on, 0 if not found."""
    return (listeners.get((e.netns, e.lport, canonical(e.laddr)))
            or listeners.get((e.netns, e.lport, "*")) or 0)


def _without_0(inodes: set[int]) -> set[int]:
    """inodes less 0 (not found), in place: `inodes - {0}` would copy 100,000 of them."""
    inodes.discard(0)
    return inodes


class HolderCache:
    """Who holds which socket inode, from /proc/*/fd scans reused across frames.

    A scan reads every descriptor on the host (about 4 us each: 0.8 s with 200,000 sockets
    open). A scan is reused for up to ten times what it cost, at most 10 s: on a small host
    (scans under REUSE_FROM_S) every frame scans, on a big one scanning takes at most a
    tenth of a core. A scan that costs more than SYNC_S runs on a worker thread while frames
    use the last result; the very first one is always waited for. Inodes a reused scan did
    not look for have no holders until the next one (the kernel's owner is shown meanwhile).
    """

    SYNC_S = 0.1
    REUSE_FROM_S = 0.02  # cheaper scans are never reused
    REUSE_MAX_S = 10.0

    def __init__(self, holders_of: HoldersOf) -> None:
        self._holders_of = holders_of
        self._found: dict[int, list] = {}
        self._at = -1e18  # time.monotonic() of the last scan's start
        self._cost = 0.0
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.scans = 0

    def get(self, inodes: set[int] | Callable[[], set[int]]) -> dict[int, list]:
        """Holders by inode; `inodes` (or what it returns: worked out only when a scan is
        due) are those to look for."""
        now = time.monotonic()
        with self._lock:
            busy = self._worker is not None and self._worker.is_alive()
            fresh = (self._cost >= self.REUSE_FROM_S
                     and now - self._at < min(self.REUSE_MAX_S, 10 * self._cost))
            found = self._found
        if busy or fresh:
            # Looked up by inode, never 0: without inodes to look for, all lookups miss.
            return found
        # A scan keeps the set it looks for: one made for it is handed over as is (a copy of
        # 100,000 inodes is 4 MB more while the scan runs), a caller's own is copied.
        inodes = inodes() if callable(inodes) else set(inodes)
        if not inodes:
            return {}
        if self.scans == 0 or self._cost < self.SYNC_S:
            self._scan(inodes, now)
            return self._found
        self._worker = threading.Thread(target=self._scan, args=(inodes, now),
                                        name="tcpwatch-holders", daemon=True)
        self._worker.start()
        return found

    def _scan(self, inodes: set[int], start: float) -> None:
        try:
            found = self._holders_of(inodes)
        except OSError:
            found = None
        cost = time.monotonic() - start
        with self._lock:
            self.scans += 1
            self._cost = cost
            self._at = start
            if found is not None:
                self._found = found


class _HostView:
    """The parts both collectors share: host figures from a snapshot, first-sight times."""

    def __init__(self, window_s: float, ports: tuple[int, ...], snapshot: Snapshot,
                 holders_of: HoldersOf, clock: Callable[[], int]) -> None:
        self.window_s = window_s
        self.ports = set(ports)
        # Looked up at call time (not bound as defaults) so tests can replace procnet's.
        if snapshot is None:
            self._snapshot: Callable[[Each | Tally], list] = (
                lambda each: procnet.snapshot(each=each))
        else:  # a test's table: counted in one batch, as the /proc text would be
            self._snapshot = lambda each: (each.take if isinstance(each, Tally) else each)(
                snapshot())
        self._holders_of = holders_of or (lambda inodes: procnet.holders_of(inodes, fds=False))
        self.holders = HolderCache(lambda inodes: self._holders_of(inodes))
        self._cgroups: dict[int | None, str] = {}  # per frame: one /proc lookup per process
        self.clock = clock
        # hostinfo.seen_key() -> first sight (monotonic seconds): FIN_WAIT2 sockets (the
        # tally's), and the CLOSE_WAIT sockets shown from /proc alone (cw_socks())
        self.first_seen: dict[int, float] = {}
        self.cw_seen: dict[int, float] = {}
        self.started_s: float | None = None  # the first sample: nothing was watched before
        self.hostname = socket.gethostname()

    def wanted(self, lport: int, rport: int) -> bool:
        return not self.ports or lport in self.ports or rport in self.ports

    def cgroup_of(self, pid: int | None) -> str:
        cgroup = self._cgroups.get(pid)
        if cgroup is None:
            cgroup = self._cgroups[pid] = hostinfo.cgroup_of(pid)
        return cgroup

    def read(self) -> tuple[list[TcpEntry], hostinfo.HostTally]:
        """The CLOSE_WAIT and LISTEN sockets of every namespace, and the tally of all of them
        (its now_s: when the snapshot began)."""
        self._cgroups.clear()
        tally = hostinfo.HostTally(hostinfo.read_port_range(), self.first_seen,
                                   self.clock() / 1e9)
        try:
            entries = self._snapshot(tally)
        except BaseException:  # the tally took sightings over: the next frame needs them
            self.first_seen.update(tally.first_seen)
            raise
        tally.counted()
        self.first_seen = tally.first_seen
        if self.started_s is None:
            self.started_s = tally.now_s
        return entries, tally

    def span(self, now_s: float) -> float:
        """The window actually covered: `window_s`, or less while top has run for less.
        (`--once` collects for one interval: its window is exactly that collection.)"""
        return min(self.window_s, now_s - (self.started_s or now_s))

    def host(self, tally: hostinfo.HostTally, **extra: Any) -> Host:
        return Host(
            hostname=self.hostname,
            states=tally.state_names(),
            ephemeral_used=tally.ephemeral_used(),
            port_range=tally.port_range,
            fin_wait2=tally.fin_wait2(),
            port_risk=tally.port_risk(hostinfo.read_reserved_ports()),
            **extra,
        )

    def cw_socks(self, entries: Iterable[TcpEntry], holders: dict, now_s: float,
                 listeners: dict, leak_after_s: float | None = None) -> list[CwSock]:
        """CLOSE_WAIT sockets known only from /proc (first-sight age, /proc-only cause).
        Called once a frame: the first sightings of these sockets are kept for the next
        (cw_seen), those of others forgotten.

        One loop for all of them: on a host with 100,000 such sockets this is most of a frame.
        leaked: age >= leak_after_s (never when None: the caller knows no better).
        """
        before, seen = self.cw_seen.get, {}
        cgroup_of, seen_key = self.cgroup_of, hostinfo.seen_key
        # Without a kernel owner the cause depends only on inode 0 and rx_queue: one
        # stuck_cause() call per distinct pair, not per socket.
        causes: dict[tuple[bool, int], str] = {}
        out = []
        never = leak_after_s is None
        append = out.append
        for e in entries:
            _, _, _, lport, raddr, rport, _, _, rx_queue, _, inode = e
            # A socket in the accept queue (inode 0) is charged to its listener's holder.
            held = holders.get(inode) if inode else holders.get(listener_of(e, listeners))
            if held:
                pid, comm = held[0].pid, held[0].comm
            else:
                pid = comm = None
            cause = causes.get((inode == 0, rx_queue))
            if cause is None:
                cause = causes[(inode == 0, rx_queue)] = stuck_cause(
                    inode=inode, rx_queue=rx_queue, holders=None, owner=None, eof_read=False)
            key = seen_key(e)
            age = now_s - seen.setdefault(key, before(key, now_s))
            append(CwSock(pid, comm, cgroup_of(pid), lport, raddr, rport, round(age, 3),
                          e.unread, cause, not never and age >= leak_after_s))
        self.cw_seen = seen
        return out


class SnapshotCollector:
    """/proc/net/tcp{,6} (every namespace the user can read) every frame; no kernel programs.

    Sockets that appear in CLOSE_WAIT between two snapshots count as entries; those that
    disappear count as exits with an unknown duration and cause (only the kernel can tell).
    """

    mode = "snapshot"

    def __init__(self, window_s: float = 10.0, ports: tuple[int, ...] = (),
                 leak_after_s: float = 30.0, warnings: Iterable[str] = (), *,
                 snapshot: Snapshot | None = None, holders_of: HoldersOf | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.view = _HostView(window_s, ports, snapshot, holders_of, clock)
        self.leak_after_s = leak_after_s
        self.warnings = list(warnings)
        self._previous: dict[tuple, tuple[TcpEntry, CwSock]] | None = None
        self._entered: deque[tuple[float, Entered]] = deque()
        self._ended: deque[tuple[float, Ended]] = deque()

    def pump(self, timeout_s: float, wake_fd: int | None = None) -> None:
        """Nothing to drain: wait up to timeout_s (returning early if wake_fd is readable)."""
        if wake_fd is None:
            time.sleep(timeout_s)
        else:
            select.select([wake_fd], [], [], timeout_s)

    def counters(self) -> dict[str, int]:
        return {}

    def sample(self) -> Sample:
        with _no_gc():
            return self._sample()

    def _sample(self) -> Sample:
        v = self.view
        entries, tally = v.read()
        now_s = tally.now_s
        cw = [e for e in entries if e.state == CLOSE_WAIT and v.wanted(e.lport, e.rport)]
        listeners = listener_inodes(entries)
        holders = v.holders.get(lambda: _without_0({e.inode or listener_of(e, listeners)
                                                    for e in cw}))
        current = {e[:6]: (e, s) for e, s in zip(
            cw, v.cw_socks(cw, holders, now_s, listeners, self.leak_after_s))}
        if self._previous is not None:
            for key, (_, s) in current.items():
                if key not in self._previous:
                    self._entered.append((now_s, _entered(s)))
            for key, (_, s) in self._previous.items():
                if key not in current:
                    self._ended.append((now_s, Ended(s.pid, s.comm, s.cgroup, s.lport, s.raddr,
                                                     s.rport, None, "unknown")))
        self._previous = current
        span = v.span(now_s)
        _prune(self._entered, now_s - span)
        _prune(self._ended, now_s - span)
        host = v.host(tally, hooks=["/proc/net/tcp{,6} snapshots"],
                      signals=["accept queue (/proc inode)", "FIN consumed (/proc rx_queue)",
                               "holders (/proc/*/fd, own processes only)"],
                      warnings=self.warnings)
        return Sample(self.mode, span, host, [s for _, s in current.values()],
                      [e for _, e in self._entered], [e for _, e in self._ended],
                      rfc3339(time.time_ns()))

    def close(self) -> None:
        pass


def _entered(s: CwSock) -> Entered:
    return Entered(s.pid, s.comm, s.cgroup, s.lport, s.raddr, s.rport)


def _prune(window: deque, limit_s: float) -> None:
    while window and window[0][0] < limit_s:
        window.popleft()


class KernelCollector:
    """Live CLOSE_WAIT entries and exits from the kernel.

    `source` is an opened loader.KernelSource (or anything with poll()/counters());
    `hooks` the Opened.hooks it reported. Call seed() once before the first pump().

    Two ways to get them, same Sample out:
    - cw_map=True (what `tcpwatch top` uses): the kernel keeps the sockets in CLOSE_WAIT in its
      `cw` map (Options(cw_map=True)), read once per frame with source.read_cw(); exits travel
      as events, one per socket, decoded straight into `Ended`, except short stays the kernel
      counts in its `exits` map on top's raw path (read once per frame with read_exits(): one
      weighted `Ended` per key and duration bucket). Entries in the window are told from the
      exits' durations and the map's entry times.
    - cw_map=False: every CLOSE_WAIT entry, exit, EOF and owner event goes through the trace
      Aggregator (sources without a `cw` map, e.g. recorded event streams).
    """

    mode = "kernel"

    def __init__(self, source: Any, hooks: dict, window_s: float = 10.0,
                 ports: tuple[int, ...] = (), leak_after_s: float = 30.0,
                 slow_close_s: float | None = None, warnings: Iterable[str] = (), *,
                 mono_to_wall_ns: int = 0, snapshot: Snapshot | None = None,
                 holders_of: HoldersOf | None = None,
                 clock: Callable[[], int] = time.monotonic_ns, cw_map: bool = False) -> None:
        from tcpwatch.aggregate import Aggregator

        self.source = source
        self.cw_map = cw_map
        self.view = _HostView(window_s, ports, snapshot, holders_of, clock)
        self.causes = (Causes.from_hooks(hooks) if slow_close_s is None
                       else Causes.from_hooks(hooks, slow_close_s))
        self.hooks = [f"{k}: {v}" for k, v in hooks.items() if v]
        self.warnings = list(warnings)
        self.agg = Aggregator(leak_after_s, mono_to_wall_ns, resolve=None, causes=self.causes,
                              start_mono_ns=clock())
        # sk -> the CwSock it was last shown as (its group), so an exit is counted
        # under the process that held it, not only the owner the kernel last saw: _who
        # without the cw map, _known (the CwSock and what it was made from) with it.
        self._who: dict[int, CwSock] = {}
        self._known: dict[int, _Known] = {}
        self._frame = 0
        self._holders: dict | None = None  # the holders the last frame's _known were told from
        self._entered: deque[tuple[float, int, Entered]] = deque()
        # (entry time, sk, its Ended): the exit's own object stands for its entry (one object
        # per exit instead of two: a churn makes tens of thousands a second).
        self._map_entered: list[tuple[float, int, SockRef]] = []
        self._ended: deque[tuple[float, int, Ended]] = deque()
        self._last_events = (0, clock())
        # (outcome, new state, leaked, slow) -> cause of an exit: a handful of distinct cases
        self._exit_causes: dict[tuple, str] = {}
        # `exits` map key -> (count, histogram) at the last sample: exits counted in the
        # kernel (top's raw path) are the differences.
        self._counted: dict[tuple, tuple[int, bytes]] = {}

    def seed(self) -> None:
        """Track the sockets already in CLOSE_WAIT (ages from now, flagged pre-existing).
        (With the cw map they are the /proc sockets the map does not have: same result.)"""
        if self.cw_map:
            return
        v = self.view
        entries = v._snapshot(lambda batch: [
            e for e in batch if e.state == CLOSE_WAIT and v.wanted(e.lport, e.rport)])
        holders = v._holders_of({e.inode for e in entries if e.inode})
        self.agg.seed_existing(entries, holders, v.clock())

    def pump(self, timeout_s: float, wake_fd: int | None = None) -> None:
        """Drain what the kernel sent (waiting up to timeout_s) into the aggregator."""
        decode, feed = schema.decode, self.agg.feed
        if self.cw_map:
            self._on_map_exits(self.source.poll(timeout_s))
            return
        for raw in self.source.poll(timeout_s):
            ev = decode(raw)
            for rec in feed(ev):
                if rec["event"] == "state":
                    if ev["new"] == CLOSE_WAIT:
                        self._on_entry(ev, rec)
                elif rec["event"] == "close_wait":
                    self._on_exit(ev, rec)

    def _on_entry(self, ev: dict, rec: dict) -> None:
        if not self.view.wanted(ev["lport"], ev["rport"]):
            return
        pid, comm = rec["pid"], rec["comm"]
        self._entered.append((ev["ts_ns"] / 1e9, ev["sk"], Entered(
            pid, comm, "", ev["lport"], ev["raddr"], ev["rport"])))

    def _on_exit(self, ev: dict, rec: dict) -> None:
        if not self.view.wanted(ev["lport"], ev["rport"]):
            return
        now = self._who.pop(ev["sk"], None)
        pid, comm = (now.pid, now.comm) if now is not None else (rec["pid"], rec["comm"])
        self._ended.append((ev["ts_ns"] / 1e9, ev["sk"], Ended(
            pid, comm, self.view.cgroup_of(pid), ev["lport"], ev["raddr"], ev["rport"],
            rec["duration_s"], rec["cause"])))

    def _on_map_exits(self, batch: list[bytes]) -> None:
        """CLOSE_WAIT exits from the kernel (cw map mode): the only events that travel (one
        per connection in a churn without the raw path), each read with one unpack and cached
        texts."""
        if not batch:
            return
        unpack = _exit_unpacker()
        ports = self.view.ports
        known_of = self._known.pop
        cgroup_of = self.view.cgroup_of
        addr, comm_text = schema.addr_text, schema.comm_text
        leak_after_s = self.agg.leak_after_ns / 1e9
        slow_close_s = self.causes.slow_close_s
        causes = self._exit_causes
        ended_out, entered_out = self._ended.append, self._map_entered.append
        for raw in batch:
            (ts, sk, cw_ns, addrs, pid, apid, family, sport, dport, kind, old, new, outcome,
             flags, comm, acomm) = unpack(raw)
            if kind != _KIND_STATE or old != CLOSE_WAIT:
                continue
            if ports and sport not in ports and dport not in ports:
                continue
            ts_s = ts / 1e9
            duration = None if flags & _F_CW_UNKNOWN else round(cw_ns / 1e9, 6)
            now = known_of(sk, None)  # what it was shown as
            if now is not None:
                who = (now.sock.pid, now.sock.comm)
            elif flags & (_F_OWNER | _F_OWNER_LISTENER):
                who = (pid, comm_text(comm))
            elif flags & _F_ACTOR:
                who = (apid, comm_text(acomm))
            else:
                who = (None, None)
            leaked = duration is not None and duration >= leak_after_s
            slow = duration is not None and duration > slow_close_s
            cause = causes.get((outcome, new, leaked, slow))
            if cause is None:  # ended_cause() per distinct case, not per exit
                cause = causes[(outcome, new, leaked, slow)] = ended_cause(
                    outcome_name(outcome, new), duration, leaked, slow_close_s)
            pid, comm = who
            ended = Ended(pid, comm, cgroup_of(pid), sport, addr(addrs[16:], family), dport,
                          duration, cause)
            ended_out((ts_s, sk, ended))
            if duration is not None:
                entered_out((ts_s - duration, sk, ended))

    def _on_counted_exits(self, now_s: float, port_range: tuple[int, int]) -> None:
        """Short CLOSE_WAIT stays the kernel counted since the last sample (top's raw path):
        one Ended per key and duration bucket, standing for `count` exits and their entries.
        Timed at this sample (they happened since the last one, within one stay of it)."""
        read = getattr(self.source, "read_exits", None)
        if read is None:
            return
        addr, comm_text = schema.addr_text, schema.comm_text
        rport_any = port_range[0]  # any ephemeral port: remote_group drops it
        for key, count, hist in read():
            before = self._counted.get(key)
            if before is not None and before[0] == count:
                continue
            self._counted[key] = (count, hist)
            daddr, pid, _netns, family, sport, dport, outcome, new, _who, _pad, comm = key
            now = array("I", hist)
            old = array("I", before[1]) if before is not None else None
            cause = self._exit_causes.get((outcome, new, False, False))
            if cause is None:
                cause = self._exit_causes[(outcome, new, False, False)] = ended_cause(
                    outcome_name(outcome, new), 0.0, False, self.causes.slow_close_s)
            comm_s = comm_text(comm)
            raddr = addr(daddr, family)
            for b, n in enumerate(now):
                if old is not None:
                    n -= old[b]
                if n <= 0:
                    continue
                duration = round(schema.exit_bucket_ns(b) / 1e9, 6)
                ended = Ended(pid, comm_s, self.view.cgroup_of(pid), sport, raddr,
                              dport or rport_any, duration, cause, n)
                self._ended.append((now_s, 0, ended))
                self._map_entered.append((now_s - duration, 0, ended))

    def _decoder(self) -> Callable[[bytes], tuple | None]:
        """A `cw` map value's facts, as _make() takes them: (tup (family, laddr, lport,
        raddr, rport), netns, since_ns, owner, eof_read); None for a port not watched. One
        Owner per process and frame, not per socket; one int per namespace and port."""
        from tcpwatch.aggregate import Owner

        wanted = self.view.wanted
        unpack = schema.layout_of("tw_cw").struct.unpack
        addr = schema.addr_text
        known = _F_OWNER | _F_OWNER_LISTENER
        owners: dict[tuple, Owner] = {}
        namespaces: dict[int, int] = {}
        port = procnet.port_ints()

        def decode(raw: bytes) -> tuple | None:
            (ts_ns, _fin, saddr, daddr, pid, tid, netns, family, sport, dport, flags, _rst,
             comm) = unpack(raw)
            if not wanted(sport, dport):
                return None
            owner = None
            if flags & known:
                owner = owners.get((pid, tid, comm, flags & known))
                if owner is None:
                    owner = owners[(pid, tid, comm, flags & known)] = Owner(
                        pid, tid, schema.comm_text(comm),
                        "socket" if flags & _F_OWNER else "listener")
            fam = 6 if family == socket.AF_INET6 else 4
            netns = namespaces.setdefault(netns, netns)
            return ((fam, addr(saddr, family), port[sport], addr(daddr, family), port[dport]),
                    netns, ts_ns, owner, bool(flags & _F_EOF_READ))

        return decode

    def _make(self, f: _Frame, tup: tuple, since_ns: int, owner: Any, eof_read: bool,
              e: TcpEntry | None, held: Sequence | None = None) -> tuple[CwSock, Sequence]:
        """A tracked socket's CwSock from its facts and its /proc entry (None: not found),
        and the holders its cause was told from (held: those, if already looked up)."""
        if e is None:
            inode = rx_queue = unread = None
            held = ()
        else:
            inode, rx_queue = e[10], e[8]
            unread = rx_queue - 1 if rx_queue > 0 else rx_queue  # TcpEntry.unread in CW
            if held is None:
                held = f.holders.get(inode, ()) if inode else ()
        seen = (owner.pid, owner.how) if owner is not None else None
        key = (e is None, inode == 0, rx_queue,
               held if held.__class__ is tuple else tuple(held), seen, eof_read)
        cause = f.causes.get(key)
        if cause is None:  # once per distinct set of facts: the same for most of a process's
            cause = f.causes[key] = stuck_cause(
                inode=inode, rx_queue=rx_queue,
                holders=None if e is None else [h.pid for h in held], owner=seen,
                eof_read=eof_read, recv_eof=self.causes.recv_eof)
        # accept queue: the listener's holder
        shown = f.holders.get(listener_of(e, f.listeners), ()) if inode == 0 else held
        if shown:
            pid, comm = shown[0].pid, shown[0].comm
        elif owner is not None:
            pid, comm = owner.pid, owner.comm
        else:
            pid = comm = None
        age_ns = f.now_ns - since_ns
        _, _, lport, raddr, rport = tup
        return CwSock(pid, comm, self.view.cgroup_of(pid), lport, raddr, rport,
                      age_seconds(age_ns),
                      unread, cause, age_ns >= self.agg.leak_after_ns), held

    def _map_socks(self, f: _Frame) -> None:
        """Each socket in the `cw` map, matched to /proc, into f.

        A socket whose map entry is the same bytes as last frame, whose /proc entry is still
        accepted with the same inode and receive queue and whose holders are the same keeps
        its CwSock (_Known): only its age, leak flag and cgroup are brought up to date. Any
        other is made again (from the facts kept, if its map entry is the same; decoded
        otherwise). An entry older than a second whose socket /proc no
        longer shows in CLOSE_WAIT is forgotten: its exit was never seen (a transition the
        kernel skipped our program for). A younger one may have entered after /proc was
        read."""
        # _known is kept in place (100,000 inserts into a new dict cost more than the rest of
        # an unchanged socket): entries the map no longer has are dropped at the end.
        known = self._known
        frame = self._frame = (self._frame + 1) & 0xFF
        seen = 0
        index = f.index
        find, find_at, holders, add = index.find, index.find_at, f.holders, f.add
        same_scan = holders is self._holders  # then an unchanged inode has the same holders
        cgroup_of, cgroups, decode = self.view.cgroup_of, {}, self._decoder()
        now_ns, leak_ns = f.now_ns, self.agg.leak_after_ns
        lay = schema.layout_of("tw_cw")
        size, since_of = lay.size, _since_reader(lay)
        stale: list[int] = []
        for keys, values in self.source.read_cw_chunks():
            for sk, off in zip(array("Q", keys), range(0, len(values), size)):
                raw = values[off:off + size]
                h = hash(raw)
                k = known.get(sk)
                if k is not None and k.h == h:  # the same entry: its facts stand
                    s = k.sock
                    key = (k.laddr, s.lport, s.raddr, s.rport)
                    since_ns = since_of(values, off)[0]
                    e = find_at(k.pos, key, k.netns)
                    if index.at != k.pos:
                        k.pos = index.at
                    held = None
                    if e is not None and e[8] == k.rx_queue and e[10] == k.inode:
                        held = k.held if same_scan else holders.get(k.inode, ())
                        if held is k.held or held == k.held:  # nothing changed: kept
                            k.held = held  # (a new scan's equal tuple: compared by identity)
                            age_ns = now_ns - since_ns
                            s.age_s, s.leaked = age_seconds(age_ns), age_ns >= leak_ns
                            cgroup = cgroups.get(s.pid)
                            if cgroup is None:
                                cgroup = cgroups[s.pid] = cgroup_of(s.pid)
                            if cgroup != s.cgroup:
                                s.cgroup = cgroup
                            k.frame = frame
                            seen += 1
                            add(s, since_ns)
                            continue
                    facts = ((0, *key), k.netns, since_ns, k.owner, k.eof_read)
                else:
                    facts = decode(raw)
                    if facts is None:
                        continue
                    e, held = find(facts[0][1:], facts[1]), None
                if e is None and facts[2] < now_ns - 1_000_000_000:
                    stale.append(sk)
                    continue
                s, held = self._make(f, facts[0], facts[2], facts[3], facts[4], e, held)
                known[sk] = _Known(h, facts, e, held, s, frame, index.at)
                seen += 1
                add(s, facts[2])
        if seen < len(known):  # gone from the map (their exits are popped as they come)
            for sk in [sk for sk, k in known.items() if k.frame != frame]:
                del known[sk]
        self._holders = holders  # what every entry of known was told from, from now on
        if stale:
            self.source.forget_cw(stale)

    def _agg_socks(self, f: _Frame) -> None:
        """Each of the aggregator's sockets in CLOSE_WAIT (no cw map), matched to /proc,
        into f."""
        wanted, find, who = self.view.wanted, f.index.find, {}
        for t in self.agg.in_close_wait():
            if not wanted(t.tuple[2], t.tuple[4]):
                continue
            e = find(t.tuple[1:], t.netns)
            s, _ = self._make(f, t.tuple, t.since_ns, t.owner, t.eof_read, e)
            if t.sk is not None:
                who[t.sk] = s
            f.add(s, t.since_ns)
        self._who = who

    def _shown(self, sk: int) -> CwSock | None:
        """The CwSock a tracked socket was last shown as."""
        if self.cw_map:
            k = self._known.get(sk)
            return k.sock if k is not None else None
        return self._who.get(sk)

    def counters(self) -> dict[str, int]:
        return self.source.counters()

    def sample(self) -> Sample:
        """The frame now. With the cw map, a tracked socket's CwSock is kept from frame to
        frame while nothing it was made from changed: the next sample() moves its age, leak
        flag and cgroup in place (a caller keeping an older Sample sees them move)."""
        with _no_gc():
            return self._sample()

    def _sample(self) -> Sample:
        v = self.view
        now_ns = v.clock()
        if not self.cw_map:
            self.agg.tick(now_ns)
        entries, tally = v.read()
        if self.cw_map:
            self._on_counted_exits(tally.now_s, tally.port_range)
        return self._build(entries, tally, now_ns)

    def _build(self, entries: list[TcpEntry], tally: hostinfo.HostTally, now_ns: int
               ) -> Sample:
        """entries: the CLOSE_WAIT and LISTEN sockets of the snapshot.

        One pass over the tracked sockets finds each one's /proc entry and makes (or keeps)
        its CwSock; the /proc sockets no tracked one matched are shown from /proc alone."""
        v = self.view
        now_s = tally.now_s
        wanted = v.wanted
        cw = [e for e in entries if e[6] == CLOSE_WAIT]
        listeners = listener_inodes(entries)
        # The inodes to look for, only worked out when a scan is due (100,000s of them).
        holders = v.holders.get(lambda: _without_0({e.inode or listener_of(e, listeners)
                                                    for e in cw if wanted(e.lport, e.rport)}))
        span = v.span(now_s)
        window_ns = (now_s - span) * 1e9 if self.cw_map else float("inf")
        f = _Frame(_ProcIndex(cw), holders, listeners, now_ns, window_ns)
        if self.cw_map:
            self._map_socks(f)
        else:
            self._agg_socks(f)
        sockets, fresh = f.sockets, f.fresh
        # In CLOSE_WAIT per /proc but not tracked: its entry event is not drained yet, or was
        # lost. Shown anyway (first-sight age, /proc-only cause) so counts agree with `ss`.
        untracked = [e for e in f.index.unused() if wanted(e.lport, e.rport)]
        sockets.extend(v.cw_socks(untracked, holders, now_s, listeners))

        _prune(self._entered, now_s - span)
        _prune(self._ended, now_s - span)
        gone = {sk: (e.pid, e.comm) for _, sk, e in self._ended if sk}
        entered: list[SockRef] = []
        if self.cw_map:
            limit = now_s - span
            self._map_entered = [x for x in self._map_entered if x[0] >= limit]
            window_entries: list = self._map_entered
            entered.extend(fresh)
        else:
            window_entries = list(self._entered)
        shown = self._shown
        for _, sk, e in window_entries:
            # sk 0: exits the kernel counted (attributed there already)
            now = shown(sk) if sk else None
            pid, comm = ((now.pid, now.comm) if now is not None
                         else (sk and gone.get(sk)) or (e.pid, e.comm))
            cgroup = v.cgroup_of(pid)
            if pid == e.pid and comm == e.comm and cgroup == e.cgroup:
                entered.append(e)  # already attributed so (an exit standing for its entry)
            else:
                entered.append(Entered(pid, comm, cgroup, e.lport, e.raddr, e.rport, e.count))
        counts = self.counters()
        # Kernel transitions per second: with the cw map only exits reach us, so the rate is
        # the kernel's own count of every transition it saw.
        seen = counts.get("transitions", 0) if self.cw_map else self.agg.events
        events, then = self._last_events
        dt = (now_ns - then) / 1e9
        rate = (seen - events) / dt if dt > 0 else 0.0
        self._last_events = (seen, now_ns)
        self.agg.note_lost(counts.get("lost", 0), now_ns, counts.get("missed", 0))
        lost = self.agg.lost
        warnings = list(self.warnings)
        if counts.get("sock_evicted_min"):
            warnings.append(f"the kernel's socket map (LRU) forgot at least "
                            f"{counts['sock_evicted_min']} sockets: their owners may be unknown")
        if counts.get("cw_full"):
            # Bounded map: the rest are still counted and shown, from /proc only.
            warnings.append(f"{counts['cw_full']} sockets entered CLOSE_WAIT while the kernel's "
                            "cw map was full: shown from /proc (first-sight age)")
        host = v.host(tally, events_per_s=round(rate, 1), lost=lost, hooks=self.hooks,
                      signals=self.causes.signals(), warnings=warnings)
        return Sample(self.mode, span, host, sockets, entered,
                      [e for _, _, e in self._ended], rfc3339(time.time_ns()))

    def close(self) -> None:
        self.source.close()


def is_root() -> bool:
    return os.geteuid() == 0

"""top's data model: sockets in CLOSE_WAIT and the window's entries/exits in, grouped rows out.

Fed by a collector (collect.py) with a `Sample`: what is in CLOSE_WAIT now (`CwSock`, from the
aggregator's tracked sockets or /proc snapshots), which sockets entered and left CLOSE_WAIT
during the window (`Entered`, `Ended`), and host-wide figures (`Host`). It never sees
individual transitions, so the kernel side is free to send top only CLOSE_WAIT entries and
exits and to keep other counters in maps. Pure: no I/O, no clock.

>>> s = Sample("kernel", window_s=10.0, host=Host(),
...            sockets=[CwSock(812, "server", "/", 8080, "10.0.0.2", 51234, 40.0, 5,
...                            "not_reading", True)],
...            entered=[Entered(812, "server", "/", 8080, "10.0.0.2", 51234)],
...            ended=[Ended(812, "server", "/", 8080, "10.0.0.2", 51200, 0.002, "closed")])
>>> r = build_rows(s, by="process")[0]
>>> (r.group, r.close_wait, r.oldest_age_s, r.leaks, r.new_per_s, r.cause, r.p99_s)
('server[812]', 1, 40.0, 1, 0.1, 'not_reading', 40.0)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from tcpwatch.classify import dominant
from tcpwatch.procnet import canonical
from tcpwatch.top.hostinfo import PeerWait, PortRisk, endpoint

GROUPINGS = ("process", "remote", "port", "cgroup")
SORTS = ("count", "age", "leaks", "rate", "p99", "unread")


@dataclass(slots=True)
class SockRef:
    """Who a socket belongs to and where it goes: all that grouping needs."""

    pid: int | None
    comm: str | None
    cgroup: str
    lport: int
    raddr: str
    rport: int


@dataclass(slots=True)
class CwSock(SockRef):
    """A socket in CLOSE_WAIT now. pid/comm: the first holder, else the kernel's owner (None if
    neither is known); age_s from entry into CLOSE_WAIT (or from first sight); unread bytes
    from /proc (None if not found)."""

    age_s: float
    unread: int | None
    cause: str
    leaked: bool

    # One socket: a CwSock that entered during the window stands for its own entry.
    count = 1


@dataclass(slots=True)
class Entered(SockRef):
    """A socket that entered CLOSE_WAIT during the window, attributed as well as known
    (`count` alike ones: the kernel counts short stays instead of sending each)."""

    count: int = 1


@dataclass(slots=True)
class Ended(SockRef):
    """A socket that left CLOSE_WAIT during the window: how long it stayed and why it left
    (`count` alike ones: short stays counted in the kernel, their duration to within 1/16)."""

    duration_s: float | None
    cause: str
    count: int = 1


@dataclass
class Host:
    """Header figures. None means "not measured in this mode"."""

    hostname: str = ""
    states: dict[str, int] = field(default_factory=dict)
    ephemeral_used: int | None = None
    port_range: tuple[int, int] = (32768, 60999)
    events_per_s: float | None = None
    lost: int | None = None
    hooks: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fin_wait2: list[PeerWait] = field(default_factory=list)
    port_risk: list[PortRisk] = field(default_factory=list)


@dataclass
class Sample:
    """Everything one frame is drawn from. mode: 'kernel' or 'snapshot'."""

    mode: str
    window_s: float
    host: Host
    sockets: list[CwSock] = field(default_factory=list)
    entered: list[SockRef] = field(default_factory=list)  # Entered, or an Ended for its entry
    ended: list[Ended] = field(default_factory=list)
    ts: str = ""  # wall-clock time of the sample, RFC 3339


@dataclass
class Row:
    """One line of the leaderboard (also one object of the JSON `rows` list)."""

    group: str
    pid: int | None
    comm: str | None
    close_wait: int
    oldest_age_s: float | None
    leaks: int
    new_per_s: float
    p50_s: float | None
    p99_s: float | None
    unread_bytes: int
    cause: str | None
    causes: dict[str, int]
    closed: int  # sockets that left CLOSE_WAIT in the window


def percentile(values: list[float], q: float, weights: list[int] | None = None
               ) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, each counted `weights` times if
    given; None for no values.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    >>> percentile([4.0, 1.0], 50, [1, 3]), percentile([4.0, 1.0], 80, [1, 3])
    (1.0, 4.0)
    """
    return percentiles(values, (q,), weights)[0]


def percentiles(values: list[float], qs: tuple[float, ...], weights: list[int] | None = None
                ) -> list[float | None]:
    """percentile() for each of qs, sorting once (groups of 100,000 sockets in one frame)."""
    if weights is None:
        if not values:
            return [None] * len(qs)
        ordered = sorted(values)
        return [ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] for q in qs]
    pairs = sorted((v, w) for v, w in zip(values, weights) if w > 0)
    total = sum(w for _, w in pairs)
    out: list[float | None] = []
    for q in qs:
        if not total:
            out.append(None)
            continue
        rank, seen = max(1, math.ceil(q / 100 * total)), 0
        for v, w in pairs:
            seen += w
            if seen >= rank:
                out.append(v)
                break
    return out


def _process(pid: int | None, comm: str | None) -> str:
    if pid is None:
        return "(unknown owner)"
    return f"{comm or '?'}[{pid}]"


def remote_group(raddr: str, lport: int, rport: int, ephemeral: tuple[int, int]) -> str:
    """The remote endpoint a socket is grouped under: 'addr:port' for a client socket, the
    address alone for a server socket, whose peers each use another ephemeral port (one row
    per connection would hide the peer that matters). Server side: the remote port is in the
    ephemeral range and the local one is not.

    >>> remote_group("10.0.0.9", 8080, 51234, (32768, 60999))
    '10.0.0.9'
    >>> remote_group("10.0.0.9", 51234, 5432, (32768, 60999))
    '10.0.0.9:5432'
    """
    lo, hi = ephemeral
    if lo <= rport <= hi and not lo <= lport <= hi:
        addr = canonical(raddr)
        return f"[{addr}]" if ":" in addr else addr
    return endpoint(raddr, rport)


def group_of(
    by: str, item: SockRef, ephemeral: tuple[int, int] = (32768, 60999)
) -> str:
    """The label an item is grouped under: 'server[812]', '10.0.0.2', ':8080', cgroup."""
    if by == "process":
        return _process(item.pid, item.comm)
    if by == "remote":
        return remote_group(item.raddr, item.lport, item.rport, ephemeral)
    if by == "port":
        return f":{item.lport}"
    if by == "cgroup":
        return item.cgroup
    raise ValueError(f"unknown grouping {by!r}; one of {', '.join(GROUPINGS)}")


def filter_sample(sample: Sample, keep: Callable[[SockRef], bool]) -> Sample:
    """The sample with only the sockets `keep` accepts (host figures untouched)."""
    return Sample(
        sample.mode, sample.window_s, sample.host,
        [s for s in sample.sockets if keep(s)],
        [e for e in sample.entered if keep(e)],
        [e for e in sample.ended if keep(e)],
        sample.ts,
    )


def keep_only(pids: Iterable[int] = (), ports: Iterable[int] = ()) -> Callable[..., bool]:
    """A `keep` for filter_sample: sockets of these pids and/or with these local/remote ports.

    >>> keep_only(ports=[8080])(Entered(1, "a", "/", 8080, "10.0.0.2", 4000))
    True
    """
    pid_set, port_set = set(pids), set(ports)

    def keep(item: SockRef) -> bool:
        if pid_set and item.pid not in pid_set:
            return False
        return not port_set or item.lport in port_set or item.rport in port_set

    return keep


def _sort_key(sort: str) -> Callable[[Row], tuple]:
    primary: dict[str, Callable[[Row], float]] = {
        "count": lambda r: r.close_wait,
        "age": lambda r: r.oldest_age_s or 0.0,
        "leaks": lambda r: r.leaks,
        "rate": lambda r: r.new_per_s,
        "p99": lambda r: r.p99_s or 0.0,
        "unread": lambda r: r.unread_bytes,
    }
    if sort not in primary:
        raise ValueError(f"unknown sort {sort!r}; one of {', '.join(SORTS)}")
    first = primary[sort]
    # Ties: more sockets, then older, then by name, so the order is stable between frames.
    return lambda r: (-first(r), -r.close_wait, -(r.oldest_age_s or 0.0), r.group)


def _key_of(by: str, ephemeral: tuple[int, int]) -> Callable[[SockRef], object]:
    """What decides an item's group_of(by, ...) label, cheaper to get than the label (a
    C-level attribute fetch for most groupings): items are grouped by it, then labelled
    once per key."""
    if by == "process":
        return attrgetter("pid", "comm")
    if by == "port":
        return attrgetter("lport")
    if by == "cgroup":
        return attrgetter("cgroup")
    if by == "remote":
        lo, hi = ephemeral

        def remote(item: SockRef) -> tuple:
            # a server socket's label is its peer's address alone (see remote_group)
            if lo <= item.rport <= hi and not lo <= item.lport <= hi:
                return (item.raddr,)
            return (item.raddr, item.rport)

        return remote
    raise ValueError(f"unknown grouping {by!r}; one of {', '.join(GROUPINGS)}")


def grouped(items: Sequence[SockRef], by: str, ephemeral: tuple[int, int] = (32768, 60999)
            ) -> dict[str, list]:
    """group_of(by, item, ephemeral) -> the items with that label, in their order.

    >>> grouped([Entered(1, "a", "/", 80, "10.0.0.2", 40000), Entered(None, None, "?", 80,
    ...          "10.0.0.3", 40001), Entered(None, "b", "?", 81, "10.0.0.3", 40002)],
    ...         "process").keys()
    dict_keys(['a[1]', '(unknown owner)'])
    """
    key_of = _key_of(by, ephemeral)
    by_key: dict[object, list] = {}
    for it in items:
        k = key_of(it)
        group = by_key.get(k)
        if group is None:
            by_key[k] = [it]
        else:
            group.append(it)
    labels = {k: group_of(by, group[0], ephemeral) for k, group in by_key.items()}
    out = {labels[k]: group for k, group in by_key.items()}
    if len(out) < len(by_key):  # keys sharing a label ("(unknown owner)"): one group
        shared = {label for label, n in Counter(labels.values()).items() if n > 1}
        for label in shared:
            out[label] = [it for it in items if labels[key_of(it)] == label]
    return out


_AGE, _CAUSE, _LEAKED, _UNREAD = (attrgetter("age_s"), attrgetter("cause"),
                                  attrgetter("leaked"), attrgetter("unread"))
_WHO = attrgetter("pid", "comm")


def build_rows(sample: Sample, by: str = "process", sort: str = "count") -> list[Row]:
    """Group the sample's sockets by `by` and sort the groups by `sort`, biggest first.
    (100,000 sockets at a time: per-socket work is left to C where it can be.)"""
    eph = sample.host.port_range  # the host's own: which side of a connection is the client
    stuck = grouped(sample.sockets, by, eph)
    ended = grouped(sample.ended, by, eph)
    entered = {g: sum(e.count for e in items)
               for g, items in grouped(sample.entered, by, eph).items()}

    rows = []
    for g in sorted({*stuck, *ended, *entered}):
        socks, gone = stuck.get(g, []), ended.get(g, [])
        ages = list(map(_AGE, socks))
        # Durations: finished stays, plus the ages so far of sockets still waiting (a lower
        # bound): otherwise a group whose sockets never leave would have no percentile at all.
        timed = [e for e in gone if e.duration_s is not None]
        durations = [e.duration_s for e in timed] + ages
        # Weights only where the kernel counted stays: sorting plain floats is faster.
        weights = ([e.count for e in timed] + [1] * len(socks)
                   if any(e.count != 1 for e in timed) else None)
        p50, p99 = percentiles(durations, (50, 99), weights)
        causes: dict[str, int] = dict(Counter(map(_CAUSE, socks)))
        if not causes:
            for e in gone:
                causes[e.cause] = causes.get(e.cause, 0) + e.count
        pid, comm = _main_process(socks, gone)
        rows.append(Row(
            group=g, pid=pid, comm=comm, close_wait=len(socks),
            oldest_age_s=round(max(ages), 3) if socks else None,
            leaks=sum(map(_LEAKED, socks)),
            new_per_s=round(entered.get(g, 0) / sample.window_s, 3) if sample.window_s else 0.0,
            p50_s=_r(p50), p99_s=_r(p99),
            unread_bytes=sum(filter(None, map(_UNREAD, socks))),  # None: not found in /proc
            # the sockets' own causes, else those of the exits: what `causes` counts
            cause=dominant(causes, causes.values()),
            causes=dict(sorted(causes.items())), closed=sum(e.count for e in gone),
        ))
    rows.sort(key=_sort_key(sort))
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _main_process(socks: list, gone: list) -> tuple[int | None, str | None]:
    """(pid, comm) holding most of a group's sockets: the group's own for `process`."""
    counts: dict[tuple, int] = dict(Counter(map(_WHO, socks)))  # a CwSock counts 1
    for it in gone:
        counts[(it.pid, it.comm)] = counts.get((it.pid, it.comm), 0) + it.count
    counts = {k: n for k, n in counts.items() if k[0] is not None}
    if not counts:
        return None, None
    return min(counts, key=lambda k: (-counts[k], k[0]))

"""What /proc says about the host, for top's header: state counts, local port ranges, the
FIN_WAIT2 side of the story, port exhaustion risk, and cgroups of processes.

Pure functions over procnet.TcpEntry lists, plus small readers of /proc files (each takes the
path so tests can fake it).

>>> from tcpwatch.procnet import TcpEntry
>>> e = [TcpEntry(1, 4, "10.0.0.1", 40000 + i, "10.0.0.9", 5432, 1, 0, 0, 0, 9000 + i)
...      for i in range(3)]
>>> state_counts(e)
{'ESTABLISHED': 3}
>>> [(r.laddr, r.remote, r.held, r.usable) for r in port_risk(e, (32768, 60999), set())]
[('10.0.0.1', '10.0.0.9:5432', 3, 28232)]
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from tcpwatch import schema
from tcpwatch.procnet import TcpEntry, canonical

LISTEN = schema.STATE_NUMBERS["LISTEN"]
FIN_WAIT2 = schema.STATE_NUMBERS["FIN_WAIT2"]
# Server-side sockets do not take a local port from the range: they share the listener's.
_NOT_HOLDING = {LISTEN, schema.STATE_NUMBERS["SYN_RECV"], schema.STATE_NUMBERS["NEW_SYN_RECV"]}
PORT_WARN = 0.7  # warn at 70% of the usable range: time to act before connect() fails
PORT_CRIT = 0.9


def endpoint(addr: str, port: int) -> str:
    """'10.0.0.9:5432', '[2001:db8::1]:443' (IPv6 in brackets, v4-mapped shown as IPv4).

    >>> endpoint("::ffff:10.0.0.9", 5432), endpoint("2001:db8::1", 443)
    ('10.0.0.9:5432', '[2001:db8::1]:443')
    """
    addr = canonical(addr)
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def state_counts(entries: Iterable[TcpEntry]) -> dict[str, int]:
    """Sockets per state name, in kernel state order, zero counts left out."""
    counts: dict[int, int] = {}
    for e in entries:
        counts[e.state] = counts.get(e.state, 0) + 1
    return {schema.state_name(s): counts[s] for s in sorted(counts)}


def read_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """(low, high) of the ephemeral range; Linux's default if unreadable."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def read_reserved_ports(path: str = "/proc/sys/net/ipv4/ip_local_reserved_ports") -> set[int]:
    """Ports excluded from automatic assignment ("8080,9000-9002" -> {8080, 9000, 9001, 9002})."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return set()
    return parse_port_list(text)


def parse_port_list(text: str) -> set[int]:
    """'8080,9000-9002' -> {8080, 9000, 9001, 9002}; malformed parts are ignored.

    >>> sorted(parse_port_list("8080,9000-9002,x"))
    [8080, 9000, 9001, 9002]
    """
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if m:
            lo = int(m.group(1))
            out.update(range(lo, int(m.group(2) or lo) + 1))
    return out


def ephemeral_in_use(entries: Iterable[TcpEntry], port_range: tuple[int, int]) -> int:
    """Distinct local ports inside the ephemeral range held by any socket (all namespaces)."""
    lo, hi = port_range
    return len({e.lport for e in entries if lo <= e.lport <= hi and e.state not in _NOT_HOLDING})


@dataclass(frozen=True)
class PortRisk:
    """Local ports one (local address -> remote endpoint) pair holds against the usable range.

    Every connection to one remote address:port from one local address needs its own local
    port, so `usable` (range size less reserved ports) is the most it can ever have.
    """

    laddr: str
    remote: str
    held: int
    usable: int

    @property
    def fraction(self) -> float:
        return self.held / self.usable if self.usable else 1.0

    @property
    def level(self) -> str:
        """'ok', 'warn' (>= 70%) or 'critical' (>= 90%)."""
        if self.fraction >= PORT_CRIT:
            return "critical"
        return "warn" if self.fraction >= PORT_WARN else "ok"


def port_risk(
    entries: Iterable[TcpEntry], port_range: tuple[int, int], reserved: set[int], top: int = 5
) -> list[PortRisk]:
    """The `top` (local address, remote endpoint) pairs holding most local ports in the range.

    Counts sockets in every state that keeps its local port (ESTABLISHED, CLOSE_WAIT,
    TIME_WAIT, FIN_WAIT*, LAST_ACK, CLOSING, SYN_SENT), not listeners nor server-side children.
    """
    lo, hi = port_range
    usable = (hi - lo + 1) - len({p for p in reserved if lo <= p <= hi})
    held: dict[tuple[int, str, str], set[int]] = {}
    for e in entries:
        if e.state in _NOT_HOLDING or not lo <= e.lport <= hi:
            continue
        key = (e.netns, canonical(e.laddr), endpoint(e.raddr, e.rport))
        held.setdefault(key, set()).add(e.lport)
    rows = [PortRisk(la, remote, len(ports), usable) for (_, la, remote), ports in held.items()]
    rows.sort(key=lambda r: (-r.held, r.laddr, r.remote))
    return rows[:top]


@dataclass(frozen=True)
class PeerWait:
    """Local sockets in FIN_WAIT2 towards one remote endpoint: the peer has not closed its
    side (it is probably the one leaking CLOSE_WAIT). oldest_s counts from first sight."""

    remote: str
    count: int
    oldest_s: float


def seen_key(e: TcpEntry) -> int:
    """What top remembers a socket's first sighting under: the hash of TcpEntry.key.

    An int instead of the 6-tuple (32 bytes instead of ~100 per socket, with 100,000s of
    sockets kept from frame to frame); two sockets share one with odds of ~1 in 2**64.
    """
    return hash(e[:6])


def fin_wait2_by_peer(
    entries: Iterable[TcpEntry], first_seen: dict[int, float], now_s: float, top: int = 5
) -> list[PeerWait]:
    """FIN_WAIT2 sockets per remote endpoint, most first. first_seen: seen_key() -> time."""
    groups: dict[str, list[float]] = {}
    for e in entries:
        if e.state == FIN_WAIT2:
            age = now_s - first_seen.get(seen_key(e), now_s)
            groups.setdefault(endpoint(e.raddr, e.rport), []).append(age)
    rows = [PeerWait(r, len(ages), round(max(ages), 3)) for r, ages in groups.items()]
    rows.sort(key=lambda r: (-r.count, -r.oldest_s, r.remote))
    return rows[:top]


_CONTAINER = re.compile(r"([0-9a-f]{64})")


def cgroup_label(text: str) -> str:
    """A short name for a /proc/PID/cgroup content: a container id when there is one, else
    the cgroup v2 path (or the first v1 path).

    >>> cgroup_label("0::/system.slice/docker-" + "ab" * 32 + ".scope\\n")
    'container:abababababab'
    >>> cgroup_label("0::/user.slice/user-1000.slice/session-2.scope\\n")
    '/user.slice/user-1000.slice/session-2.scope'
    """
    paths = [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]
    path = next((p for p in paths if p), "/") if paths else "?"
    m = _CONTAINER.search(path)
    if m:
        return f"container:{m.group(1)[:12]}"
    return path


@lru_cache(maxsize=4096)
def _cgroup_cached(pid: int, start: str, proc_root: str) -> str:
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            return cgroup_label(f.read())
    except OSError:
        return "?"


def cgroup_of(pid: int | None, proc_root: str = "/proc") -> str:
    """cgroup_label() of a process, '?' when unknown; cached per (pid, start time) so a
    reused pid is looked up again."""
    if pid is None:
        return "?"
    try:
        start = os.stat(f"{proc_root}/{pid}").st_ctime_ns
    except OSError:
        return "?"
    return _cgroup_cached(pid, str(start), proc_root)

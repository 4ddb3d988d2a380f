"""What /proc says about the host, for top's header: state counts, local port ranges, the
FIN_WAIT2 side of the story, port exhaustion risk, and cgroups of processes.

HostTally counts procnet.TcpEntry batches in one pass (see its example); small readers of
/proc files take the path so tests can fake them.
"""

from __future__ import annotations

import os
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import compress, repeat

from tcpwatch import schema
from tcpwatch.procnet import Tally, TcpEntry, canonical
from tcpwatch.sockdiag import id_texts

LISTEN = schema.STATE_NUMBERS["LISTEN"]
CLOSE_WAIT = schema.CLOSE_WAIT
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
    (A FIN_WAIT2 socket counted from its netlink record is remembered under
    seen_id_key() instead.)
    """
    return hash(e[:6])


# bytes.translate tables over TCP states: FIN_WAIT2 -> 1; a state that holds its own
# local port -> 1 (the others -> 0)
_IS_FIN_WAIT2 = bytes(int(s == FIN_WAIT2) for s in range(256))
_HOLDING = bytes(int(s not in _NOT_HOLDING) for s in range(256))


def seen_id_key(netns: int, family: int, lport: int, sock_id: bytes) -> int:
    """seen_key() of a socket given to Tally.take_ids() (HostTally hashes the same tuples in
    bulk): stable from frame to frame, but not equal to seen_key() of the socket's
    TcpEntry, so a namespace read through sock_diag one frame and from the /proc text the
    next (a fallback) would start its FIN_WAIT2 sockets' first sightings over."""
    return hash((netns, family, lport, sock_id))


_CONTAINER = re.compile(r"([0-9a-f]{64})")


class HostTally(Tally):
    """Host-wide figures from one pass over a snapshot, fed a batch at a time.

    take() counts each entry (states, ephemeral ports, ports per remote endpoint, FIN_WAIT2
    per peer, first sightings) and returns only the ones top needs whole afterwards:
    CLOSE_WAIT and LISTEN (`keep`). procnet.snapshot(each=tally) drops the rest batch by
    batch, so 100,000s of FIN_WAIT2 or TIME_WAIT sockets never sit in memory at once; through
    sock_diag they are counted from their netlink records (take_ids()) and never become
    TcpEntry at all. Either way the figures are the same.

    first_seen: the previous frame's seen_key() -> first sight (monotonic seconds) of its
    FIN_WAIT2 sockets, taken over: each socket seen again is moved out of it into the
    tally's own `first_seen` (this frame's), so that the two frames' 100,000s of keys are
    not all alive at once; what is left in it is gone. (The CLOSE_WAIT
    sockets top shows from /proc alone keep theirs in the collector: most are tracked by
    the kernel, whose entry times are better.)

    >>> from tcpwatch.procnet import TcpEntry
    >>> t = HostTally((32768, 60999), {}, 0.0)
    >>> t.take([TcpEntry(1, 4, "10.0.0.1", 40000 + i, "10.0.0.9", 5432, 1, 0, 0, 0, 9000 + i)
    ...         for i in range(3)])
    []
    >>> t.state_names(), t.ephemeral_used()
    ({'ESTABLISHED': 3}, 3)
    >>> [(r.laddr, r.remote, r.held, r.usable) for r in t.port_risk(set())]
    [('10.0.0.1', '10.0.0.9:5432', 3, 28232)]
    """

    keep = frozenset({CLOSE_WAIT, LISTEN})

    def __init__(self, port_range: tuple[int, int], first_seen: dict[int, float],
                 now_s: float) -> None:
        self.port_range = port_range
        self.now_s = now_s
        self.states: dict[int, int] = {}
        self.first_seen: dict[int, float] = {}
        self._before = first_seen.pop
        self._ports: set[int] = set()  # local ports in the range, any namespace
        # (netns, laddr, raddr, rport) -> local ports in the range: merged per canonical
        # address and endpoint text at the end (few keys; formatting per socket is not free).
        # An array of 2 bytes a socket, told apart at the end: a set of the 1,500 ports of
        # one peer is 128 KB (8 MB for the churn's 100,000 sockets), alive all frame.
        self._held: dict[tuple, array] = {}
        self._fin_wait2: dict[tuple[str, int], list] = {}  # (raddr, rport) -> [count, first]
        # The same from take_ids(), keyed by raw ids: (netns, family, id) -> local ports,
        # (family, id) -> [count, first]; turned into text at the end.
        self._held_ids: dict[tuple, array] = {}
        self._fin_wait2_ids: dict[tuple, list] = {}

    def take(self, entries: Iterable[TcpEntry]) -> list[TcpEntry]:
        """Count `entries`; return those in CLOSE_WAIT or LISTEN."""
        lo, hi = self.port_range
        states, seen, before, now = self.states, self.first_seen, self._before, self.now_s
        ports, held, fw2 = self._ports, self._held, self._fin_wait2
        not_holding, seen_key_of = _NOT_HOLDING, seen_key
        keep: list[TcpEntry] = []
        for e in entries:
            netns, _, laddr, lport, raddr, rport, state, _, _, _, _ = e
            states[state] = states.get(state, 0) + 1
            if state == FIN_WAIT2:
                key = seen_key_of(e)
                # setdefault: a key seen twice in one frame keeps its first sighting
                first = seen.setdefault(key, before(key, now))
                peer = fw2.get((raddr, rport))
                if peer is None:
                    fw2[(raddr, rport)] = [1, first]
                else:
                    peer[0] += 1
                    if first < peer[1]:
                        peer[1] = first
            elif state in (CLOSE_WAIT, LISTEN):
                keep.append(e)
            if lo <= lport <= hi and state not in not_holding:
                ports.add(lport)
                group = held.get((netns, laddr, raddr, rport))
                if group is None:
                    held[(netns, laddr, raddr, rport)] = array("H", (lport,))
                else:
                    group.append(lport)
        return keep

    def take_ids(self, netns: int, family: int, states: bytes, lports: list[int],
                 ids: list[bytes]) -> None:
        """Count sockets in states outside `keep` from their netlink records, as take()
        would count their TcpEntry (see procnet.Tally.take_ids). In bulk: a datagram's
        sockets at a time through C-level counting, selection and dict updates."""
        counts = self.states
        for state, n in Counter(states).items():
            counts[state] = counts.get(state, 0) + n
        if FIN_WAIT2 in states:
            self._fin_wait2_ids_take(netns, family, states, lports, ids)
        lo, hi = self.port_range
        ports, held = self._ports, self._held_ids
        holding = states.translate(_HOLDING)
        for sid, lport in zip(compress(ids, holding), compress(lports, holding)):
            if lo <= lport <= hi:
                ports.add(lport)
                group = held.get((netns, family, sid))
                if group is None:
                    held[(netns, family, sid)] = array("H", (lport,))
                else:
                    group.append(lport)

    def _fin_wait2_ids_take(self, netns: int, family: int, states: bytes, lports: list[int],
                            ids: list[bytes]) -> None:
        """take_ids()'s FIN_WAIT2 sockets: first sightings, counts and the oldest per id
        (remote endpoint and local address)."""
        fin_wait2 = states.translate(_IS_FIN_WAIT2)
        fw_ids = list(compress(ids, fin_wait2))
        keys = list(map(hash, zip(repeat(netns), repeat(family), compress(lports, fin_wait2),
                                  fw_ids)))  # seen_id_key() of each
        firsts = list(map(self._before, keys, repeat(self.now_s)))
        # setdefault: a key seen twice in one frame keeps its first sighting
        firsts = list(map(self.first_seen.setdefault, keys, firsts))
        fw2 = self._fin_wait2_ids
        for sid, n in Counter(fw_ids).items():
            peer = fw2.get((family, sid))
            if peer is None:
                fw2[(family, sid)] = [n, self.now_s]
            else:
                peer[0] += n
        for sid, first in set(zip(fw_ids, firsts)):  # first sightings are few distinct times
            peer = fw2[(family, sid)]
            if first < peer[1]:
                peer[1] = first

    def counted(self) -> None:
        """The snapshot is all counted: let go of what is left of the previous frame's first
        sightings (with the table of a 100,000-entry dict at as many FIN_WAIT2 sockets),
        which would otherwise stay alive while the rest of the frame is built."""
        self._before = {}.pop  # (a later take() sees every socket anew)

    def _held_texts(self) -> Iterator[tuple[tuple[int, str, str, int], array]]:
        """((netns, laddr, raddr, rport), local ports) from take() and take_ids() alike."""
        yield from self._held.items()
        for (netns, family, sid), ports in self._held_ids.items():
            laddr, raddr, rport = id_texts(family, sid)
            yield (netns, laddr, raddr, rport), ports

    def _fin_wait2_texts(self) -> Iterator[tuple[tuple[str, int], list]]:
        """((raddr, rport), [count, first]) from take() and take_ids() alike."""
        yield from self._fin_wait2.items()
        for (family, sid), peer in self._fin_wait2_ids.items():
            _, raddr, rport = id_texts(family, sid)
            yield (raddr, rport), peer

    def state_names(self) -> dict[str, int]:
        """Sockets per state name, in kernel state order, zero counts left out."""
        return {schema.state_name(s): self.states[s] for s in sorted(self.states)}

    def ephemeral_used(self) -> int:
        """Distinct local ports inside the ephemeral range held by any socket (all
        namespaces); server-side sockets share their listener's port and do not count."""
        return len(self._ports)

    def port_risk(self, reserved: set[int], top: int = 5) -> list[PortRisk]:
        """The `top` (local address, remote endpoint) pairs holding most local ports in the
        range, against the usable range (its size less reserved ports).

        Counts sockets in every state that keeps its local port (ESTABLISHED, CLOSE_WAIT,
        TIME_WAIT, FIN_WAIT*, LAST_ACK, CLOSING, SYN_SENT), not listeners nor server-side
        children.
        """
        lo, hi = self.port_range
        usable = (hi - lo + 1) - len({p for p in reserved if lo <= p <= hi})
        merged: dict[tuple[int, str, str], list[array]] = {}
        for (netns, laddr, raddr, rport), ports in self._held_texts():
            merged.setdefault((netns, canonical(laddr), endpoint(raddr, rport)), []).append(
                ports)
        # distinct ports, one set at a time
        rows = [PortRisk(la, remote, len(set().union(*groups)), usable)
                for (_, la, remote), groups in merged.items()]
        rows.sort(key=lambda r: (-r.held, r.laddr, r.remote))
        return rows[:top]

    def fin_wait2(self, top: int = 5) -> list[PeerWait]:
        """FIN_WAIT2 sockets per remote endpoint, most first; ages from first sight."""
        groups: dict[str, list] = {}
        for (raddr, rport), (count, first) in self._fin_wait2_texts():
            group = groups.setdefault(endpoint(raddr, rport), [0, first])
            group[0] += count
            group[1] = min(group[1], first)
        rows = [PeerWait(r, n, round(self.now_s - first, 3))
                for r, (n, first) in groups.items()]
        rows.sort(key=lambda r: (-r.count, -r.oldest_s, r.remote))
        return rows[:top]


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

"""TCP sockets and their holders as /proc shows them, in every reachable network namespace.

/proc/net/tcp{,6} lists the sockets of one network namespace (the reader's), with the socket
inode; /proc/<pid>/fd/* links to "socket:[INODE]" name the processes holding each one. Socket
inodes are global (one sockfs for the whole machine), so only the tables are per namespace.

The tables are read through NETLINK_SOCK_DIAG (sockdiag.py: binary, filtered by state in the
kernel) when the kernel allows it, with a netlink socket created inside the namespace; else
from the /proc text. Both give the same entries. TCPWATCH_PROCNET=proc forces the text.

Pure userspace: no bcc. Importing needs no privileges; reading other processes' namespaces
and descriptors needs root (or CAP_SYS_PTRACE + CAP_SYS_ADMIN), and what cannot be read is
skipped.

>>> snapshot({8})  # doctest: +SKIP
[TcpEntry(netns=4026531833, family=4, laddr='127.0.0.1', lport=8080, raddr='127.0.0.1',
          rport=55236, state=8, tx_queue=0, rx_queue=6, uid=0, inode=9204)]
>>> holders_of([9204])  # doctest: +SKIP
{9204: [Holder(pid=812, comm='server', fd=5)]}
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h
PROCNET_ENV = "TCPWATCH_PROCNET"  # "proc": read /proc/net/tcp{,6} text, never sock_diag
# Errors that mean the kernel has no sock_diag, or no inet/tcp handler for it: stop trying.
_NO_SOCK_DIAG = {errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.ENOENT, errno.EOPNOTSUPP}
_sock_diag_missing = False  # latched by the first of them
RESOLVE_STATES = frozenset({8})  # CLOSE_WAIT: what the agent's Resolver needs (see Resolver)
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


class TcpEntry(NamedTuple):
    """One line of /proc/net/tcp or tcp6, decoded (or the same socket from sock_diag).

    A NamedTuple rather than a dataclass: building 200k of them is ~7x faster (sockdiag makes
    them with tuple.__new__), and they are smaller. Copies with changes: entry._replace(...).

    rx_queue is the kernel's rcv_nxt - copied_seq: unread bytes, plus 1 for a FIN no read has
    consumed yet (a CLOSE_WAIT socket with 5 unread bytes shows 6). For LISTEN it is the
    accept backlog. inode is 0 for a socket still in the accept queue and for TIME_WAIT ones.
    """

    netns: int
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    state: int
    tx_queue: int
    rx_queue: int
    uid: int
    inode: int

    @property
    def unread(self) -> int:
        """Unread data bytes: rx_queue without the FIN's sequence number in CLOSE_WAIT.

        >>> TcpEntry(1, 4, "127.0.0.1", 8080, "127.0.0.1", 55236, 8, 0, 6, 0, 9204).unread
        5
        """
        if self.state == 8 and self.rx_queue > 0:
            return self.rx_queue - 1
        return self.rx_queue

    @property
    def key(self) -> tuple:
        """(netns, family, laddr, lport, raddr, rport), the aggregator's socket key.

        >>> TcpEntry(1, 4, "127.0.0.1", 8080, "127.0.0.1", 55236, 8, 0, 6, 0, 9204).key
        (1, 4, '127.0.0.1', 8080, '127.0.0.1', 55236)
        """
        return self[:6]  # the first six fields, in this order (a C-level slice)


@lru_cache(maxsize=1)
def port_ints() -> list[int]:
    """One int object per port number, made once: p[port] is port. A computed port above
    256 is a new 28-byte int each time; 100,000s of sockets hold the same few ports, and
    share these instead."""
    return list(range(65536))


# A batch of entries in, the ones to keep out (procnet.snapshot(each=...)).
Each = Callable[[list[TcpEntry]], list[TcpEntry]]


class Tally:
    """Something that counts every socket of a snapshot and keeps few (top's header):
    snapshot(each=tally). Sockets in `keep` states come as TcpEntry batches to take(), which
    returns those to keep. Through sock_diag every other socket comes to take_ids() as its
    state, local port and raw id only: no TcpEntry is built for the 100,000s a big host may
    have in FIN_WAIT2 or TIME_WAIT. From the /proc text, take() gets every entry.
    """

    keep: frozenset[int] = frozenset()

    def take(self, batch: list[TcpEntry]) -> list[TcpEntry]:
        raise NotImplementedError

    def take_ids(self, netns: int, family: int, states: bytes, lports: list[int],
                 ids: list[bytes]) -> None:
        """Sockets of one namespace and family (4 or 6), in states outside `keep`: their
        states (a byte each), local ports, and ids: the kernel's struct inet_diag_sockid
        from idiag_dport on, 34 bytes: the remote port (big endian), then the local and
        remote addresses (16 bytes each, IPv4 in the first 4); sockdiag.id_texts() turns
        one into text."""
        raise NotImplementedError


class Holder(NamedTuple):
    """A process holding a descriptor to a socket: Holder(pid=812, comm='server', fd=5).
    (A NamedTuple: there is one per open socket descriptor, 100,000s on a big host.)"""

    pid: int
    comm: str
    fd: int | None  # None from holders_of(..., fds=False)


@dataclass(frozen=True)
class Namespace:
    """A network namespace and how to read its tables: through a process living in it
    (pid), or by entering it from a bind mount (path, e.g. /run/netns/blue), or both."""

    inode: int
    pid: int | None
    path: str | None


@lru_cache(maxsize=4096)  # called for every table line and key: addresses repeat a lot
def canonical(addr: str) -> str:
    """The address text used to match sockets across tcp and tcp6: v4-mapped becomes IPv4.

    A dual-stack (v6) listener's children show in tcp6 as ::ffff:a.b.c.d while the same
    connection seen from IPv4 is a.b.c.d.

    >>> canonical("::ffff:127.0.0.1")
    '127.0.0.1'
    >>> canonical("0:0:0:0:0:0:0:1")
    '::1'
    >>> canonical("10.0.0.1")
    '10.0.0.1'
    """
    try:
        raw = socket.inet_pton(socket.AF_INET6, addr)
    except (OSError, ValueError):
        return addr  # IPv4 text (or not an address at all): leave it
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


@lru_cache(maxsize=4096)
def _addr(hexaddr: str) -> str:
    """Kernel hex address -> text. The kernel prints each 32-bit word of the address in host
    byte order ("%08X" of a __be32), so every word is byte-swapped on little-endian hosts.

    >>> _addr("0100007F")
    '127.0.0.1'
    >>> _addr("0000000000000000FFFF00000100007F")
    '::ffff:127.0.0.1'
    """
    if len(hexaddr) not in (8, 32):
        raise ValueError(f"bad address {hexaddr!r}")
    raw = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexaddr), 8)
    )
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def parse_tcp_table(text: str, family: int, netns: int) -> Iterator[TcpEntry]:
    """Decode /proc/net/tcp (family 4) or /proc/net/tcp6 (family 6) text.

    The header and malformed lines are skipped.

    >>> line = ("   1: 0100007F:1F90 0100007F:D7C4 08 00000000:00000006 00:00000000 00000000"
    ...         "     0        0 9204 1 0000000049c4f25d 20 4 28 10 -1")
    >>> next(parse_tcp_table(line, 4, 4026531833))  # doctest: +NORMALIZE_WHITESPACE
    TcpEntry(netns=4026531833, family=4, laddr='127.0.0.1', lport=8080, raddr='127.0.0.1',
             rport=55236, state=8, tx_queue=0, rx_queue=6, uid=0, inode=9204)
    """
    for line in text.splitlines():
        # sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ...
        fields = line.split()
        try:
            laddr, lport = fields[1].split(":")
            raddr, rport = fields[2].split(":")
            tx_queue, rx_queue = fields[4].split(":")
            entry = TcpEntry(
                netns, family, _addr(laddr), int(lport, 16), _addr(raddr), int(rport, 16),
                int(fields[3], 16), int(tx_queue, 16), int(rx_queue, 16),
                int(fields[7]), int(fields[9]),
            )
        except (IndexError, ValueError, OverflowError):
            continue  # the header, or a line we do not understand
        yield entry


def _pids(proc_root: str) -> list[int]:
    """Thread-group ids under proc_root (its numeric entries), ascending."""
    try:
        return sorted(int(name) for name in os.listdir(proc_root) if name.isdigit())
    except OSError:
        return []


def _ns_inode(link: str) -> int:
    """'net:[4026531833]' -> 4026531833"""
    if not (link.startswith("net:[") and link.endswith("]")):
        raise ValueError(f"not a network namespace link: {link!r}")
    return int(link[5:-1])


def list_netns(proc_root: str = "/proc", run_netns: str = "/run/netns") -> list[Namespace]:
    """Every reachable network namespace, unique by inode, the caller's own first.

    Found through /proc/<pid>/ns/net of every process (the lowest pid in each namespace is
    kept) and through bind mounts under run_netns (`ip netns add`), which give a path even
    when no process lives there. Processes that vanish or cannot be read are skipped.

    >>> list_netns()  # doctest: +SKIP
    [Namespace(inode=4026531833, pid=4242, path=None),
     Namespace(inode=4026532177, pid=913, path='/run/netns/blue'),
     Namespace(inode=4026532301, pid=None, path='/run/netns/empty')]
    """
    found: dict[int, Namespace] = {}
    pids = _pids(proc_root)
    try:
        own = int(os.readlink(f"{proc_root}/self"))
        pids.insert(0, own)  # seen twice, kept once: setdefault below
    except (OSError, ValueError):
        pass
    for pid in pids:
        try:
            inode = _ns_inode(os.readlink(f"{proc_root}/{pid}/ns/net"))
        except (OSError, ValueError):
            continue  # vanished, or not ours to look at
        found.setdefault(inode, Namespace(inode, pid, None))
    try:
        names = sorted(os.listdir(run_netns))
        dir_dev = os.stat(run_netns).st_dev
    except OSError:
        names = []
    for name in names:
        path = os.path.join(run_netns, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_dev == dir_dev:
            continue  # a plain file, not a namespace mounted on it (left by a failed `ip netns`)
        ns = found.get(st.st_ino)
        if ns is None:
            found[st.st_ino] = Namespace(st.st_ino, None, path)
        elif ns.path is None:
            found[st.st_ino] = replace(ns, path=path)
    return list(found.values())


def _read_at(dir_fd: int, name: str) -> str:
    with open(os.open(name, os.O_RDONLY, dir_fd=dir_fd), encoding="latin-1") as f:
        return f.read()


def _tables_at(dir_fd: int, inode: int) -> tuple[str, str] | None:
    """net/tcp and net/tcp6 under dir_fd (/proc/<pid> or /proc/thread-self), if ns/net there
    is the namespace `inode` before and after reading; None otherwise."""
    if _ns_inode(os.readlink("ns/net", dir_fd=dir_fd)) != inode:
        return None
    v4 = _read_at(dir_fd, "net/tcp")
    try:
        v6 = _read_at(dir_fd, "net/tcp6")
    except FileNotFoundError:
        v6 = ""  # IPv6 disabled, or the process just left: the check below tells which
    if _ns_inode(os.readlink("ns/net", dir_fd=dir_fd)) != inode:
        return None
    return v4, v6


def _read_via_pid(ns: Namespace, proc_root: str) -> tuple[str, str] | None:
    # Everything is read relative to one open /proc/<pid> directory: if the process exits
    # and its pid is reused, reads fail instead of returning another namespace's table.
    try:
        dir_fd = os.open(f"{proc_root}/{ns.pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        return _tables_at(dir_fd, ns.inode)
    except (OSError, ValueError):
        return None
    finally:
        os.close(dir_fd)


@lru_cache(maxsize=1)
def _setns():  # -> ctypes function; loaded on first use, not at import
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc.setns


def _read_via_path(ns: Namespace, proc_root: str) -> tuple[str, str] | None:
    # setns() moves only the calling thread, so it runs in a throw-away thread that ends
    # inside the namespace; the caller's threads never change namespace. (os.setns is 3.12+.)
    result: list[tuple[str, str] | None] = [None]

    def enter_and_read() -> None:
        try:
            fd = os.open(str(ns.path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _setns()(fd, CLONE_NEWNET) != 0:
                    return  # EPERM without CAP_SYS_ADMIN, EINVAL if path is no namespace
            finally:
                os.close(fd)
            dir_fd = os.open(f"{proc_root}/thread-self", os.O_RDONLY | os.O_DIRECTORY)
            try:
                result[0] = _tables_at(dir_fd, ns.inode)
            finally:
                os.close(dir_fd)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=enter_and_read, name="tcpwatch-setns", daemon=True)
    thread.start()
    thread.join()
    return result[0]


def use_sock_diag() -> bool:
    """Whether read_tcp() tries sock_diag first: not with TCPWATCH_PROCNET=proc, nor once the
    kernel said it has no sock_diag for TCP."""
    return not _sock_diag_missing and os.environ.get(PROCNET_ENV, "").lower() != "proc"


def _in_netns(inode: int) -> bool:
    """Whether the calling thread is in network namespace `inode` (False if /proc can't say)."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino == inode
    except OSError:
        return False


def _open_netns(ns: Namespace, proc_root: str) -> int | None:
    """A descriptor of namespace ns.inode: /proc/<pid>/ns/net if that process is (still) in it,
    else ns.path if it is that namespace; None if neither is."""
    for path in (None if ns.pid is None else f"{proc_root}/{ns.pid}/ns/net", ns.path):
        if path is None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # vanished, not ours to open, or a fake tree's dangling link
        try:
            if os.fstat(fd).st_ino == ns.inode:
                return fd
        except OSError:
            pass
        os.close(fd)
    return None


def _socket_in(ns_fd: int, inode: int):  # -> socket.socket | None
    """A sock_diag socket created inside namespace ns_fd (inode `inode`); None if it cannot
    be entered. OSError if netlink itself fails there.

    A socket stays in the namespace it was created in, so a throw-away thread setns() into
    it, makes the socket and ends; the caller uses the socket and never changes namespace.
    """
    from tcpwatch import sockdiag

    result: list = [None]
    failure: list[OSError | None] = [None]

    def enter_and_open() -> None:
        # As _tables_at: the thread is in namespace `inode` before and after the socket is made.
        try:
            if _setns()(ns_fd, CLONE_NEWNET) != 0 or not _in_netns(inode):
                return  # EPERM without CAP_SYS_ADMIN
            sock = sockdiag.open_socket()
        except OSError as exc:
            failure[0] = exc
            return
        if _in_netns(inode):
            result[0] = sock
        else:
            sock.close()

    thread = threading.Thread(target=enter_and_open, name="tcpwatch-setns", daemon=True)
    thread.start()
    thread.join()
    if failure[0] is not None:
        raise failure[0]
    return result[0]


def _read_via_sock_diag(
    ns: Namespace, proc_root: str, states: frozenset[int] | None,
    each: Each | Tally | None = None,
) -> list[TcpEntry] | None:
    """The namespace's sockets through sock_diag; None if it cannot be read that way."""
    global _sock_diag_missing
    from tcpwatch import sockdiag  # it imports this module: not at the top

    ns_fd = _open_netns(ns, proc_root)
    if ns_fd is None:
        return None
    try:
        if _in_netns(ns.inode):
            sock = sockdiag.open_socket()  # our own namespace: no thread needed
        else:
            sock = _socket_in(ns_fd, ns.inode)
            if sock is None:
                return None
        with sock:
            return sockdiag.read_tcp(sock, ns.inode, states, each)
    except OSError as exc:  # only netlink's: the namespace checks above do not raise
        if exc.errno in _NO_SOCK_DIAG:
            _sock_diag_missing = True
        return None
    finally:
        os.close(ns_fd)


def read_tcp(
    ns: Namespace, proc_root: str = "/proc", states: Iterable[int] | None = None,
    each: Each | Tally | None = None,
) -> list[TcpEntry]:
    """The tcp and tcp6 tables of one namespace, tagged with its inode; [] if unreachable.
    Only the sockets in `states` (TCP state numbers, e.g. {8} for CLOSE_WAIT) if given.
    each: called on every batch of entries read (one netlink datagram, or the whole table
    from /proc); what it returns is kept instead (top counts and drops most sockets so).
    A Tally is fed through its take() and take_ids() (see Tally).

    Tries sock_diag first (a netlink socket made in the namespace, entered through
    /proc/<pid>/ns/net or ns.path; states filtered in the kernel), then the text of
    /proc/<pid>/net/tcp{,6}, then of the tables seen after entering ns.path (entering needs
    CAP_SYS_ADMIN).

    >>> read_tcp(Namespace(4026532177, None, "/run/netns/blue"))  # doctest: +SKIP
    [TcpEntry(netns=4026532177, family=4, laddr='127.0.0.1', lport=8080, raddr='0.0.0.0',
              rport=0, state=10, tx_queue=0, rx_queue=0, uid=0, inode=9202), ...]
    """
    wanted = None if states is None else frozenset(states)
    if use_sock_diag():
        entries = _read_via_sock_diag(ns, proc_root, wanted, each)
        if entries is not None:
            return entries
    tables = None
    if ns.pid is not None:
        tables = _read_via_pid(ns, proc_root)
    if tables is None and ns.path is not None:
        tables = _read_via_path(ns, proc_root)
    if tables is None:
        return []
    v4, v6 = tables
    entries = [*parse_tcp_table(v4, 4, ns.inode), *parse_tcp_table(v6, 6, ns.inode)]
    if wanted is not None:
        entries = [e for e in entries if e.state in wanted]
    if isinstance(each, Tally):
        return each.take(entries)
    return each(entries) if each is not None else entries


def snapshot(
    states: set[int] | None = None, proc_root: str = "/proc", run_netns: str = "/run/netns",
    each: Each | Tally | None = None,
) -> list[TcpEntry]:
    """All TCP sockets in every reachable namespace, only those in `states` if given
    (each: as in read_tcp).

    >>> snapshot({8})  # 8 == CLOSE_WAIT  # doctest: +SKIP
    [TcpEntry(netns=4026531833, family=4, laddr='127.0.0.1', lport=8080, raddr='127.0.0.1',
              rport=55236, state=8, tx_queue=0, rx_queue=6, uid=0, inode=9204)]
    """
    entries = []
    for ns in list_netns(proc_root, run_netns):
        entries.extend(read_tcp(ns, proc_root, states, each))
    return entries


def _socket_fds(pid_fd: int, wanted: set[int]) -> list[tuple[int, int]]:
    """(fd, inode) for each descriptor of one process that is a wanted socket."""
    fd_dir = os.open("fd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=pid_fd)
    try:
        hits = []
        for name in os.listdir(fd_dir):
            try:
                link = os.readlink(name, dir_fd=fd_dir)
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in wanted:
                    hits.append((int(name), inode))
        return sorted(hits)
    finally:
        os.close(fd_dir)


def holders_of(inodes: Iterable[int], proc_root: str = "/proc", fds: bool = True
               ) -> dict[int, Sequence[Holder]]:
    """Who holds each of these socket inodes: one pass over /proc/*/fd/*.

    Inodes nobody holds are absent from the result; inode 0 (a socket not accepted yet) is
    never looked up. Processes that vanish or cannot be read are skipped.
    fds=False: one Holder(pid, comm, None) per process, in tuples shared between inodes
    (top keeps 100,000s of them and needs no descriptor numbers).

    >>> holders_of([9204, 0, 777])  # doctest: +SKIP
    {9204: [Holder(pid=812, comm='server', fd=5), Holder(pid=815, comm='worker', fd=5)]}
    """
    # A set without 0 is used as is (top's scans: 100,000 inodes, 4 MB a copy).
    wanted = (inodes if isinstance(inodes, (set, frozenset)) and 0 not in inodes
              else {i for i in inodes if i})
    found: dict[int, list[Holder]] = {}
    if not wanted:
        return found
    for pid in _pids(proc_root):
        try:
            pid_fd = os.open(f"{proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            hits = _socket_fds(pid_fd, wanted)
            comm = _read_at(pid_fd, "comm").rstrip("\n") if hits else ""
        except OSError:
            continue  # vanished, or not ours to read
        finally:
            os.close(pid_fd)
        if fds:
            for fd, inode in hits:
                found.setdefault(inode, []).append(Holder(pid, comm, fd))
            continue
        one = (Holder(pid, comm, None),)
        for _, inode in hits:
            held = found.get(inode)
            if held is None:
                found[inode] = one
            elif one[0] not in held:  # one entry per process, however many descriptors
                found[inode] = (*held, one[0])
    return found


class Resolver:
    """What the aggregator calls to learn who holds sockets now.

    states: read only sockets in these TCP states (None: all). The agent looks up sockets it
    tracks in CLOSE_WAIT: RESOLVE_STATES reads only those (with sock_diag the kernel filters),
    and a socket that has already left CLOSE_WAIT is then not found rather than matched to a
    TIME_WAIT or LAST_ACK socket of the same 4-tuple (inode 0 there would read as "not
    accepted").

    >>> Resolver(states=RESOLVE_STATES).resolve(  # doctest: +SKIP
    ...     [(0, 4, "127.0.0.1", 8080, "127.0.0.1", 55236)])
    {(0, 4, '127.0.0.1', 8080, '127.0.0.1', 55236):
        (TcpEntry(netns=4026531833, ..., inode=9204), [Holder(pid=812, comm='server', fd=5)])}
    """

    def __init__(
        self, proc_root: str = "/proc", run_netns: str = "/run/netns",
        states: Iterable[int] | None = None,
    ) -> None:  # fmt: skip
        self.proc_root = proc_root
        self.run_netns = run_netns
        self.states = None if states is None else frozenset(states)

    def _read(self, ns: Namespace) -> list[TcpEntry]:
        # Unfiltered, read_tcp is called as it always was (stand-ins in tests take 2 args).
        if self.states is None:
            return read_tcp(ns, self.proc_root)
        return read_tcp(ns, self.proc_root, self.states)

    def resolve(self, keys: Iterable[tuple]) -> dict[tuple, tuple[TcpEntry | None, list[Holder]]]:
        """Map each (netns, family, laddr, lport, raddr, rport) to (entry, holders).

        netns 0 means unknown: every namespace is searched and the caller's own wins a tie.
        Addresses match through canonical(), so an IPv4 key finds a dual-stack listener's
        child listed in tcp6 as ::ffff:a.b.c.d and vice versa. Not found: (None, []).
        Cost: each needed namespace's table is read once and /proc/*/fd scanned once.
        """
        keys = list(dict.fromkeys(keys))
        wanted_ns = {key[0] for key in keys}
        # Ports first: most of a big table is skipped without formatting canonical addresses.
        wanted_ports = {(key[3], key[5]) for key in keys}
        by_tuple: dict[tuple, list[TcpEntry]] = {}  # canonical 4-tuple -> entries, own ns first
        for ns in list_netns(self.proc_root, self.run_netns):
            if 0 in wanted_ns or ns.inode in wanted_ns:
                for e in self._read(ns):
                    if (e.lport, e.rport) in wanted_ports:
                        tup = (canonical(e.laddr), e.lport, canonical(e.raddr), e.rport)
                        by_tuple.setdefault(tup, []).append(e)

        found: dict[tuple, TcpEntry | None] = {}
        for key in keys:
            netns, family, laddr, lport, raddr, rport = key
            tup = (canonical(laddr), lport, canonical(raddr), rport)
            candidates = [e for e in by_tuple.get(tup, ()) if netns in (0, e.netns)]
            # Prefer the exact family and text, then a live socket over a TIME_WAIT one.
            found[key] = max(
                candidates,
                key=lambda e: (e.family == family and e.laddr == laddr, e.inode != 0),
                default=None,
            )
        holders = holders_of({e.inode for e in found.values() if e is not None}, self.proc_root)
        return {k: (e, holders.get(e.inode, []) if e else []) for k, e in found.items()}

"""Why a socket is, or was, in CLOSE_WAIT: the `cause` of `leak`/`close_wait` records and of top.

Pure functions over signals the aggregator and /proc already have; no I/O.

Still stuck (checked in this order, first match wins):

- ``not_accepted``: /proc shows inode 0: the socket still sits in the listener's accept queue,
  so the FIN arrived before the application ever accepted it (backlog too large / too slow).
- ``held_elsewhere``: the kernel saw the owner use this socket (process context), but the owner
  no longer holds a descriptor to it while another process does: the owner's close() released
  only its own descriptor (a forked child or a dup()/SCM_RIGHTS copy keeps the socket open).
  The kernel sends nothing on such a close(): this is judged from the holders/owner comparison.
- ``eof_ignored``: the application read EOF (kernel: recv returned 0; or /proc: rx_queue is 0,
  i.e. the FIN's sequence number was consumed by a read) and still did not close.
- ``not_reading``: the FIN has not been consumed: /proc counts it in rx_queue (>= 1), or the
  kernel reports reads (sock:sock_recv_length) and none returned EOF. The application has not
  read up to the FIN since it arrived (it may have read some data before the FIN).
- ``unknown``: none of these signals is available.

Ended (a `close_wait` record):

- ``closed`` (close() within ``slow_close_s``), ``slow_close`` (close() later than that, or a
  socket already reported as a leak), ``shutdown`` (shutdown(SHUT_WR)), ``reset`` (RST
  received), ``exited`` (the holder exited), ``error`` (the kernel aborted it after a socket
  error, e.g. a keepalive timeout), ``unknown`` (no verdict from the kernel).

>>> stuck_cause(inode=0, rx_queue=519, holders=[], owner=None, eof_read=False)
'not_accepted'
>>> stuck_cause(inode=9204, rx_queue=1, holders=[813], owner=(812, "socket"), eof_read=False)
'held_elsewhere'
>>> stuck_cause(inode=9204, rx_queue=None, holders=None, owner=None, eof_read=True)
'eof_ignored'
>>> ended_cause("closed", 0.004), ended_cause("closed", 2.5), ended_cause("exit", 0.1)
('closed', 'slow_close', 'exited')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# A healthy program closes within milliseconds of reading EOF (an event loop turn, a request
# handler returning). One second is past any scheduling hiccup, yet far below the peer
# timeouts (tens of seconds) whose expiry usually causes the FIN: closing later than this
# means the program was busy or blocked while the peer had already given up.
SLOW_CLOSE_S = 1.0

STUCK_CAUSES = ("not_accepted", "held_elsewhere", "eof_ignored", "not_reading", "unknown")
ENDED_CAUSES = ("closed", "slow_close", "shutdown", "reset", "exited", "error", "unknown")

RECV_TRACEPOINT = "sock:sock_recv_length"
_ENDED = {"closed": "closed", "shutdown": "shutdown", "reset": "reset", "exit": "exited",
          "error": "error"}


@dataclass(frozen=True)
class Causes:
    """Which signals classification may use, and the slow-close threshold.

    recv_eof: the kernel reports reads (sock:sock_recv_length, Linux 6.5+), so a socket with
    no EOF event has really not read EOF. Without it only /proc's rx_queue tells.

    >>> Causes.from_hooks({"owner": "sock:sock_recv_length,sock:sock_send_length"}).recv_eof
    True
    >>> Causes(recv_eof=False).signals()
    ['accept queue (/proc inode)', 'holders (/proc/*/fd)', 'FIN consumed (/proc rx_queue)']
    """

    recv_eof: bool
    slow_close_s: float = SLOW_CLOSE_S

    @classmethod
    def from_hooks(cls, hooks: Mapping, slow_close_s: float = SLOW_CLOSE_S) -> Causes:
        """From the `hooks` of loader.Opened (or of a `start` record)."""
        return cls(RECV_TRACEPOINT in (hooks.get("owner") or ""), slow_close_s)

    def signals(self) -> list[str]:
        """Human names of the signals in use, for headers and logs."""
        out = ["accept queue (/proc inode)", "holders (/proc/*/fd)",
               "FIN consumed (/proc rx_queue)"]
        if self.recv_eof:
            out.append(f"EOF read ({RECV_TRACEPOINT})")
        return out


def stuck_cause(
    *,
    inode: int | None,
    rx_queue: int | None,
    holders: Iterable[int] | None,
    owner: tuple[int, str] | None,
    eof_read: bool,
    recv_eof: bool = False,
) -> str:
    """The cause of a socket still in CLOSE_WAIT.

    inode, rx_queue: from /proc/net/tcp (rx_queue *raw*, FIN included), None if not found.
    holders: pids holding a descriptor now (None if not looked up; [] if none visible).
    owner: (pid, how) as the kernel hooks saw it, how "socket" or "listener"; None if unknown.
    eof_read: the kernel saw the owner read EOF. recv_eof: the kernel would have seen it.

    >>> stuck_cause(inode=9204, rx_queue=6, holders=[812], owner=(812, "socket"), eof_read=False)
    'not_reading'
    >>> stuck_cause(inode=9204, rx_queue=None, holders=[], owner=None, eof_read=False)
    'unknown'
    """
    if inode == 0:
        return "not_accepted"
    held = list(holders or ())
    # Only an owner seen on this very socket counts: a listener's owner (e.g. a prefork
    # master) may never have held the accepted socket at all.
    if owner is not None and owner[1] == "socket" and held and owner[0] not in held:
        return "held_elsewhere"
    if eof_read or rx_queue == 0:
        return "eof_ignored"
    if (rx_queue is not None and rx_queue > 0) or recv_eof:
        return "not_reading"
    return "unknown"


def ended_cause(
    outcome: str, duration_s: float | None, leaked: bool = False,
    slow_close_s: float = SLOW_CLOSE_S,
) -> str:
    """The cause of a socket that left CLOSE_WAIT, from the `close_wait` record's outcome.

    >>> ended_cause("closed", None, leaked=True), ended_cause("reset", 40.0)
    ('slow_close', 'reset')
    """
    cause = _ENDED.get(outcome, "unknown")
    if cause == "closed" and (leaked or (duration_s is not None and duration_s > slow_close_s)):
        return "slow_close"
    return cause


def dominant(causes: Iterable[str], weights: Iterable[int] | None = None) -> str | None:
    """The most frequent cause (each counted `weights` times if given); ties go to the order
    of STUCK_CAUSES then ENDED_CAUSES (the most actionable first). None for no cause at all.

    >>> dominant(["not_reading", "eof_ignored", "eof_ignored"]), dominant([])
    ('eof_ignored', None)
    >>> dominant(["not_reading", "eof_ignored"], [3, 2])
    'not_reading'
    """
    counts: dict[str, int] = {}
    for c, w in zip(causes, weights) if weights is not None else ((c, 1) for c in causes):
        counts[c] = counts.get(c, 0) + w
    if not counts:
        return None
    order = {c: i for i, c in enumerate((*STUCK_CAUSES[:-1], *ENDED_CAUSES))}  # unknown last
    return min(counts, key=lambda c: (-counts[c], order.get(c, 99), c))

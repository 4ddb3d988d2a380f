"""Synthetic kernel events for unit tests: a socket's life as a few readable steps.

Every event goes through schema.encode() -> schema.decode(), so tests exercise the real
layout of bpf/tcpwatch.h, and what the aggregator sees is exactly what the loader hands it.

    >>> server = Proc(812, "server")
    >>> evs = life(0xFFFF888105B5DC80, [
    ...     step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=server),      # FIN received
    ...     eof(0.6, owner=server),                                     # recv() returned 0
    ...     step(2.0, "CLOSE_WAIT", "LAST_ACK", owner=server, actor=server, outcome="closed"),
    ... ])
    >>> [(e["kind"], e["old"], e["new"], e["cw_ns"]) for e in evs]
    [(1, 1, 8, 0), (2, 0, 0, 0), (1, 8, 9, 1500000000)]

Times are seconds after T0 (CLOCK_MONOTONIC 1000 s); with WALL_OFFSET_NS as the aggregator's
mono_to_wall_ns, T0 prints as 2026-11-21T05:13:00.000000Z. prev_ns and cw_ns are filled in
as the kernel would (time since the previous step, since entering CLOSE_WAIT), with
TW_F_PREV_UNKNOWN / TW_F_CW_UNKNOWN when the life does not show the earlier step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tcpwatch import procnet, schema

SEC = 10**9
T0 = 1_000 * SEC
WALL_OFFSET_NS = 1_795_237_980 * SEC - T0  # T0 == 2026-11-21T05:13:00Z
NETNS = 4026531840  # the initial network namespace on the test "host"

_OUTCOME_CODES = {name: code for code, name in schema.OUTCOMES.items() if name}


def const(name: str) -> int:
    """const("TW_F_OWNER") -> 1, from bpf/tcpwatch.h."""
    return schema.layout().consts[name]


def flags(*names: str) -> int:
    """flags("OWNER", "ACTOR") -> TW_F_OWNER | TW_F_ACTOR."""
    out = 0
    for name in names:
        out |= const(f"TW_F_{name}")
    return out


def at(t_s: float) -> int:
    """Seconds after T0 -> CLOCK_MONOTONIC ns: at(1.5) == T0 + 1_500_000_000."""
    return T0 + round(t_s * SEC)


class Proc(NamedTuple):
    """A task: Proc(812, "server") is pid 812, main thread, comm "server"."""

    pid: int
    comm: str
    tid: int | None = None

    @property
    def thread(self) -> int:
        return self.pid if self.tid is None else self.tid


class Holder(NamedTuple):
    """What procnet reports as holding a descriptor to a socket."""

    pid: int
    comm: str
    fd: int


def Entry(  # noqa: N802 - stands in for a class in the tests' vocabulary
    netns: int, family: int, laddr: str, lport: int, raddr: str, rport: int,
    state: int = schema.CLOSE_WAIT, rx_queue: int = 0, inode: int = 0,
) -> procnet.TcpEntry:
    """A real procnet.TcpEntry (so its rx_queue/unread rules apply) with test defaults."""
    return procnet.TcpEntry(netns, family, laddr, lport, raddr, rport, state, 0, rx_queue, 0, inode)


def event(**fields: Any) -> dict:
    """A decoded event with defaults for everything not given (kind: a state transition)."""
    fields.setdefault("kind", const("TW_KIND_STATE"))
    return schema.decode(schema.encode(fields))


def _state(name: str | int) -> int:
    return name if isinstance(name, int) else schema.STATE_NUMBERS[name]


def step(
    t_s: float,
    old: str | int,
    new: str | int,
    *,
    owner: Proc | None = None,
    via_listener: bool = False,
    actor: Proc | None = None,
    outcome: str | int = 0,
    extra_flags: tuple[str, ...] = (),
    prev_ns: int | None = None,
    cw_ns: int | None = None,
    kstack_id: int = -1,
    ustack_id: int = -1,
) -> dict:
    """One state transition of a life(); owner/actor set the TW_F_OWNER*/TW_F_ACTOR flags."""
    return {
        "kind": const("TW_KIND_STATE"),
        "t_s": t_s,
        "old": _state(old),
        "new": _state(new),
        "owner": owner,
        "via_listener": via_listener,
        "actor": actor,
        "outcome": _OUTCOME_CODES.get(outcome, outcome) if isinstance(outcome, str) else outcome,
        "extra_flags": extra_flags,
        "prev_ns": prev_ns,
        "cw_ns": cw_ns,
        "kstack_id": kstack_id,
        "ustack_id": ustack_id,
    }


def eof(t_s: float, *, owner: Proc | None = None) -> dict:
    """The owner read EOF (recv returned 0) on a socket in CLOSE_WAIT."""
    return {"kind": const("TW_KIND_EOF"), "t_s": t_s, "owner": owner}


def life(
    sk: int,
    steps: list[dict],
    *,
    laddr: str = "10.0.0.1",
    lport: int = 8080,
    raddr: str = "10.0.0.2",
    rport: int = 51234,
    family: int = 4,
    netns: int = NETNS,
) -> list[dict]:
    """Decoded events for one socket: its steps, in order, with the kernel's timings."""
    sock = {"sk": sk, "laddr": laddr, "lport": lport, "raddr": raddr, "rport": rport,
            "family": family, "netns": netns}
    out = []
    last_ns: int | None = None  # when the socket entered its current state
    cw_since: int | None = None  # when it entered CLOSE_WAIT
    eof_ns = 0
    for spec in steps:
        ts = at(spec["t_s"])
        fields: dict[str, Any] = {**sock, "kind": spec["kind"], "ts_ns": ts}
        fl = _owner_fields(fields, spec.get("owner"), spec.get("via_listener", False))
        if spec["kind"] == const("TW_KIND_EOF"):
            eof_ns = ts
            fields.update(fin_read_ns=ts, flags=fl | flags("EOF_READ"))
            out.append(event(**fields))
            continue
        fl |= flags(*spec["extra_flags"])
        fl |= _actor_fields(fields, spec["actor"])
        fl |= _timing_fields(fields, spec, ts, last_ns, cw_since)
        if eof_ns:
            fl |= flags("EOF_READ")
            fields["fin_read_ns"] = eof_ns
        fields.update(
            old=spec["old"], new=spec["new"], outcome=spec["outcome"], flags=fl,
            kstack_id=spec["kstack_id"], ustack_id=spec["ustack_id"],
        )
        out.append(event(**fields))
        last_ns = ts
        if spec["new"] == schema.CLOSE_WAIT:
            cw_since = ts
    return out


def _owner_fields(fields: dict, owner: Proc | None, via_listener: bool) -> int:
    if owner is None:
        return 0
    fields.update(pid=owner.pid, tid=owner.thread, comm=owner.comm)
    return flags("OWNER_LISTENER" if via_listener else "OWNER")


def _actor_fields(fields: dict, actor: Proc | None) -> int:
    if actor is None:
        return 0
    fields.update(actor_pid=actor.pid, actor_tid=actor.thread, actor_comm=actor.comm)
    return flags("ACTOR")


def _timing_fields(
    fields: dict, spec: dict, ts: int, last_ns: int | None, cw_since: int | None
) -> int:
    """prev_ns / cw_ns as the kernel computes them, or the *_UNKNOWN flags."""
    fl = 0
    if spec["prev_ns"] is not None:
        fields["prev_ns"] = spec["prev_ns"]
    elif last_ns is not None:
        fields["prev_ns"] = ts - last_ns
    else:
        fl |= flags("PREV_UNKNOWN")
    if spec["old"] == schema.CLOSE_WAIT:
        if spec["cw_ns"] is not None:
            fields["cw_ns"] = spec["cw_ns"]
        elif cw_since is not None:
            fields["cw_ns"] = ts - cw_since
        else:
            fl |= flags("CW_UNKNOWN")
    return fl


def merge(*lives: list[dict]) -> list[dict]:
    """Several lives interleaved in time order, as the ring buffer delivers them."""
    return sorted((ev for one in lives for ev in one), key=lambda ev: ev["ts_ns"])


class FakeResolver:
    """Stands in for procnet.Resolver: answers from a table, remembers every call.

    found maps (laddr, lport, raddr, rport) -> (entry, [Holder]); netns and family in the
    key are ignored. Unknown sockets get (None, []), as procnet says "not found".
    """

    def __init__(self, found: dict[tuple, tuple[Any, list[Holder]]] | None = None) -> None:
        self.found = dict(found or {})
        self.calls: list[list[tuple]] = []

    def resolve(self, keys: list[tuple]) -> dict[tuple, tuple[Any, list[Holder]]]:
        self.calls.append(list(keys))
        return {key: self.found.get(tuple(key[2:]), (None, [])) for key in keys}


def Found(rx_queue: int, inode: int, netns: int = NETNS) -> procnet.TcpEntry:  # noqa: N802
    """The entry part of a resolver answer: a CLOSE_WAIT line as /proc shows it."""
    return procnet.TcpEntry(
        netns, 4, "0.0.0.0", 0, "0.0.0.0", 0, schema.CLOSE_WAIT, 0, rx_queue, 0, inode
    )


def churn(connections: int, *, start_s: float = 0.0, sk_pool: int = 512,
          seed: int = 1) -> list[bytes]:
    """Raw tw_event bytes of a loopback churn like scripts/churn.c: per connection a client
    socket (CLOSE>SYN_SENT ... FIN_WAIT2>CLOSE) and a server socket that inherits the
    listener's owner, goes through CLOSE_WAIT, is claimed by its owner (OWNER event), reads
    EOF and closes: 10 transitions and 2 socket events, 12 events per connection, about
    1 us apart. Socket addresses are reused from a pool of `sk_pool`, as the slab does.

    >>> raw = churn(2); len(raw), schema.decode(raw[0])["new"] == schema.STATE_NUMBERS["SYN_SENT"]
    (24, True)
    """
    import random

    rng = random.Random(seed)
    client, server = Proc(4242, "churn", 4243), Proc(4242, "churn", 4244)
    c = {n: const(f"TW_F_{n}") for n in ("OWNER", "OWNER_LISTENER", "ACTOR", "EOF_READ")}
    kind_state, kind_eof, kind_owner = (const(f"TW_KIND_{k}") for k in ("STATE", "EOF", "OWNER"))
    st = schema.STATE_NUMBERS
    out: list[bytes] = []
    ts = at(start_s)
    for i in range(connections):
        csk = 0xFFFF888100000000 + rng.randrange(sk_pool) * 0x900
        ssk = 0xFFFF888200000000 + rng.randrange(sk_pool) * 0x900
        caddr = f"127.1.0.{1 + i % 32}"
        cport = 32768 + (i * 7919) % 28000
        netns = NETNS
        cl = {"sk": csk, "laddr": caddr, "lport": cport, "raddr": "127.0.0.1", "rport": 17999,
              "netns": netns, "pid": client.pid, "tid": client.thread, "comm": client.comm}
        sv = {"sk": ssk, "laddr": "127.0.0.1", "lport": 17999, "raddr": caddr, "rport": cport,
              "netns": netns, "pid": server.pid, "tid": server.thread, "comm": server.comm}
        cw_in = 0

        def ev(sock: dict, kind: int, old: int, new: int, fl: int, prev: int, **kw: Any) -> None:
            nonlocal ts
            ts += 400 + rng.randrange(1200)
            out.append(schema.encode({**sock, "kind": kind, "ts_ns": ts, "old": old, "new": new,
                                      "flags": fl, "prev_ns": prev, **kw}))

        ev({**cl, "lport": 0}, kind_state, st["CLOSE"], st["SYN_SENT"],
           c["OWNER"] | c["ACTOR"] | const("TW_F_PREV_UNKNOWN"), 0,
           actor_pid=client.pid, actor_tid=client.thread, actor_comm=client.comm)
        ev(sv, kind_state, st["LISTEN"], st["SYN_RECV"],
           c["OWNER_LISTENER"] | const("TW_F_PREV_UNKNOWN"), 0)
        ev(sv, kind_state, st["SYN_RECV"], st["ESTABLISHED"], c["OWNER_LISTENER"],
           rng.randrange(20_000))
        ev(cl, kind_state, st["SYN_SENT"], st["ESTABLISHED"], c["OWNER"], rng.randrange(30_000))
        ev(cl, kind_state, st["ESTABLISHED"], st["FIN_WAIT1"], c["OWNER"] | c["ACTOR"],
           rng.randrange(5_000), actor_pid=client.pid, actor_tid=client.thread,
           actor_comm=client.comm, outcome=1)
        ev(sv, kind_state, st["ESTABLISHED"], st["CLOSE_WAIT"], c["OWNER_LISTENER"],
           rng.randrange(40_000))
        cw_in = ts
        ev(cl, kind_state, st["FIN_WAIT1"], st["FIN_WAIT2"], c["OWNER"], rng.randrange(9_000))
        ev(sv, kind_owner, st["CLOSE_WAIT"], st["CLOSE_WAIT"], c["OWNER"], 0)
        ev(sv, kind_eof, st["CLOSE_WAIT"], st["CLOSE_WAIT"], c["OWNER"] | c["EOF_READ"], 0,
           fin_read_ns=ts + 900)
        ev(sv, kind_state, st["CLOSE_WAIT"], st["LAST_ACK"],
           c["OWNER"] | c["ACTOR"] | c["EOF_READ"], rng.randrange(50_000),
           cw_ns=ts + 1000 - cw_in, actor_pid=server.pid, actor_tid=server.thread,
           actor_comm=server.comm, outcome=1, fin_read_ns=cw_in + 500)
        ev(cl, kind_state, st["FIN_WAIT2"], st["CLOSE"], c["OWNER"], rng.randrange(20_000))
        ev(sv, kind_state, st["LAST_ACK"], st["CLOSE"], c["OWNER"] | c["EOF_READ"],
           rng.randrange(20_000), fin_read_ns=cw_in + 500)
    return out

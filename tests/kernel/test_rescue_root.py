"""The rescue program against the real kernel: transitions the state program is skipped for
(the classic one: a softirq interrupting one of our classic programs; trace's raw one,
tw_trace: a softirq interrupting itself) arrive anyway, with the tuple read from struct
sock_common; every firing of the tracepoint for the churn's sockets (counted by an oracle
program of the test's own) is delivered once or counted as missed.

Skips need a saturating churn: a timer interrupt must land while one of our programs runs
(~0.1 % of transitions here). The C churn of scripts/bench makes them in seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import time
from pathlib import Path

import pytest
from scenarios import PER_CONNECTION, churn_in

from tcpwatch import bpfsys, loader, schema

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
PORT = 17889
WANT_SKIPS = 30  # state-program skips to have seen before judging the rescue
ROUNDS = 6       # of 3 s of churn at most


class Oracle:
    """Counts the firings of the tracepoint for the churn's sockets (clients bind to
    127.1.0.x: an end of every churn socket but its listener), independently of tcpwatch:
    a raw tracepoint program of its own. The kernel may skip it too (its recursion misses,
    which it cannot tell apart by socket): fired() is (counted, skipped)."""

    def __init__(self) -> None:
        from bcc import BPF

        # skc_daddr and skc_rcv_saddr open struct sock_common (checked by the loader).
        self.bpf = BPF(text="""
BPF_PERCPU_ARRAY(n, u64, 1);
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
        int zero = 0;
        u8 a[8] = {};
        u64 *v;

        bpf_probe_read_kernel(a, sizeof(a), (void *)ctx->args[0]);
        if (!((a[0] == 127 && a[1] == 1) || (a[4] == 127 && a[5] == 1)))
                return 0;
        v = n.lookup(&zero);
        if (v)
                (*v)++;
        return 0;
}
""")

    def fired(self) -> tuple[int, int]:
        prog = self.bpf.funcs[b"raw_tracepoint__inet_sock_set_state"]
        self.bpf.detach_raw_tracepoint(b"inet_sock_set_state")
        return int(sum(self.bpf["n"][ctypes.c_int(0)])), loader.recursion_misses(prog.fd)


@pytest.mark.parametrize("raw_path", [True, False], ids=["tw_trace", "classic"])
def test_skipped_transitions_are_rescued_and_accounted(churn_bin, netns, raw_path):
    src = loader.KernelSource(loader.Options(ports=(PORT,), ring_pages=16384,
                                             raw_path=raw_path))
    try:
        opened = src.open()
        assert src.raw_state == raw_path, (opened.hooks, opened.warnings)
        want = "raw_tracepoint:inet_sock_set_state (IPv4+IPv6, checked)"
        assert opened.hooks["rescue"] == want, (opened.hooks, opened.warnings)
        oracle = Oracle()
        got: list[bytes] = []
        made = 0
        for _ in range(ROUNDS):
            result, _, batch = churn_in(netns, churn_bin, 3, PORT, src)
            got += batch
            made += result["connections"] * PER_CONNECTION + 2  # + the listener
            if src.skips() >= WANT_SKIPS:
                break
        # The churn has ended: drain until the ring stays empty for a while.
        deadline, quiet = time.monotonic() + 10, 0
        while quiet < 5 and time.monotonic() < deadline:
            batch = src.poll(0.1)
            got += batch
            quiet = 0 if batch else quiet + 1
        fired, oracle_skipped = oracle.fired()
        counts, skips = src.counters(), src.skips()
    finally:
        src.close()

    assert skips >= WANT_SKIPS, f"only {skips} skips in {ROUNDS} rounds: nothing to rescue"
    assert counts["lost"] == 0, counts
    events = [ev for ev in map(schema.decode, got) if ev["kind"] == STATE]  # not EOF events
    # What was missed is counted: the kernel's skips of the state program less the rescues.
    assert counts["missed"] == skips - counts["rescued"], (counts, skips)
    # Every firing for the churn's sockets was delivered once, or counted as missed. (+ 2:
    # the listener's own. Within the oracle's own skips, if it had any.)
    delivered = len(events) + counts["missed"]
    assert fired + 2 <= delivered <= fired + 2 + oracle_skipped, (
        len(events), fired, oracle_skipped, counts)
    # The skips come back. (0 missed in six churns since stale `ran` records are dropped;
    # 0-2 in a million transitions before: see "rescue" in the C. A little room is left.)
    assert counts["missed"] <= max(2, skips // 100), (counts, skips)
    # The churn's own count is a ceiling: in some runs up to 1 in 2,000 of the transitions
    # it expects never fire (the oracle sees none of them either).
    assert len(events) <= made, (len(events), made)

    rescued = [i for i, ev in enumerate(events) if ev["flags"] & RESCUED]
    assert len(rescued) == counts["rescued"]
    assert all(PORT in (events[i]["lport"], events[i]["rport"]) for i in rescued)
    # A rescued event's tuple, read from struct sock_common, is the one the tracepoint gave
    # for the same socket's previous transition, once both ends are set (from ESTABLISHED).
    last: dict[int, dict] = {}
    checked = 0
    for ev in events:
        prev = last.get(ev["sk"])
        assert prev is None or prev["new"] != ev["new"], ("twice", prev, ev)
        if ev["flags"] & RESCUED and prev is not None and ev["old"] in SETTLED:
            assert ev["old"] == prev["new"], (prev, ev)
            assert {k: ev[k] for k in TUPLE} == {k: prev[k] for k in TUPLE}, (prev, ev)
            checked += 1
        last[ev["sk"]] = None if ev["new"] == CLOSE else ev
    assert checked >= len(rescued) // 2, (checked, len(rescued))


RESCUED = schema.layout().consts["TW_F_RESCUED"]
STATE = schema.layout().consts["TW_KIND_STATE"]
CLOSE = schema.STATE_NUMBERS["CLOSE"]
SETTLED = {schema.STATE_NUMBERS[n] for n in (
    "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING")}
TUPLE = ("family", "laddr", "lport", "raddr", "rport")


class RescueFirst(loader.KernelSource):
    """Attaches the classic state program again after the rescue program: the wrong order."""

    def _attach_rescue(self) -> list[str]:
        out = super()._attach_rescue()
        self.bpf.detach_tracepoint(b"sock:inet_sock_set_state")
        self.bpf.attach_tracepoint(tp=b"sock:inet_sock_set_state",
                                   fn_name=b"tracepoint__sock__inet_sock_set_state")
        return out


def test_a_rescue_program_running_first_is_detached():
    src = RescueFirst(loader.Options())
    try:
        opened = src.open()
        assert opened.hooks["rescue"] is None, opened.hooks
        assert any("runs before the state program" in w for w in opened.warnings), opened.warnings
        assert b"inet_sock_set_state" not in src.bpf.raw_tracepoint_fds
        with socket.create_server(("127.0.0.1", 0)) as lsock, socket.create_connection(
                lsock.getsockname()):
            lsock.accept()[0].close()
        time.sleep(0.2)
        counts = src.counters()
        assert counts["rescued"] == 0 and counts["missed"] == 0, counts
    finally:
        src.close()


# struct tw_ran in bpf/tcpwatch.bpf.c (TW_RAN_SETS 16 sets of 2 ways; a way: u64 sk, u32 seq,
# u16 st, u16 pad; then u32 seq, padded to 8).
RAN_WAY = "<QIHH"
RAN_SIZE = 16 * 2 * 16 + 8


def _bpf(cmd: int, attr: bytes) -> int:
    return bpfsys.call(cmd, bpfsys.attr_buffer(attr))


def plant_record(src, cpu: int, sk: int, old: int, new: int, age: int) -> None:
    """Put a record of (sk, old -> new) `age` pushes old into `ran` on `cpu`, as the state
    program would have left it (age 0: the last push)."""
    from bcc.utils import get_possible_cpus

    fd, key = src.bpf["ran"].map_fd, ctypes.c_int(0)
    n = len(get_possible_cpus())  # a per-CPU value for each
    vals = ctypes.create_string_buffer(RAN_SIZE * n)
    _bpf(1, struct.pack("<IIQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(vals)))  # lookup
    raw = bytearray(vals.raw)
    base = cpu * RAN_SIZE
    seq = struct.unpack_from("<I", raw, base + 16 * 2 * 16)[0]
    st = old << 8 | new
    way = base + (((sk >> 6) ^ (sk >> 11) ^ st) & 15) * 32
    struct.pack_into(RAN_WAY, raw, way, sk, (seq - age) & 0xFFFFFFFF, st, 0)
    struct.pack_into(RAN_WAY, raw, way + 16, 0, 0, 0, 0)
    vals = ctypes.create_string_buffer(bytes(raw), len(raw))
    _bpf(2, struct.pack("<IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(vals), 0))


def run_rescue(src, cpu: int, sk: int, old: int, new: int) -> None:
    """BPF_PROG_TEST_RUN of tw_rescue for a firing (sk, old, new) on `cpu`: the rescue
    program as it runs after a state program that was skipped, or not."""
    args = (ctypes.c_uint64 * 3)(sk, old, new)
    attr = struct.pack("<IIIIQQIIIIQQII", src.bpf.funcs[b"tw_rescue"].fd, 0, 0, 0, 0, 0, 0, 0,
                       ctypes.sizeof(args), 0, ctypes.addressof(args), 0, 1, cpu)  # ON_CPU
    _bpf(10, attr)


EST, CW, LAST_ACK = (schema.STATE_NUMBERS[n] for n in ("ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"))


@contextlib.contextmanager
def source_and_connection(opts: loader.Options, path: str):
    """A KernelSource whose state tracepoint went to `path` ("raw_state": tw_trace, "cw_raw":
    tw_top), and a loopback connection: (src, client, server socket, listening port)."""
    src = loader.KernelSource(opts)
    try:
        opened = src.open()
        assert getattr(src, path), (opened.hooks, opened.warnings)
        with socket.create_server(("127.0.0.1", 0)) as lsock, socket.create_connection(
                lsock.getsockname()) as c:
            s, _ = lsock.accept()
            with s:
                yield src, c, s, lsock.getsockname()[1]
    finally:
        src.close()


def test_a_record_left_behind_does_not_hide_a_skip():
    """A record in `ran` older than the last push is either the state program's own (firings
    nested between the two programs pushed theirs after it) or one left behind when the rescue
    program was itself skipped, matching this socket and transition by chance. trace's socket
    map tells: a socket still in the old state was skipped, and is rescued (STALE_RAN)."""
    with source_and_connection(loader.Options(raw_path=True), "raw_state") as (src, _, _, port):
        sk = None
        deadline = time.monotonic() + 5
        while sk is None and time.monotonic() < deadline:
            for ev in map(schema.decode, src.poll(0.1)):
                if ev["kind"] == STATE and ev["lport"] == port and ev["new"] == EST:
                    sk = ev["sk"]
        assert sk, "no SYN_RECV -> ESTABLISHED of the server socket"

        def rescued(old: int, new: int, age: int | None) -> list:
            before = src.counters()
            if age is not None:
                plant_record(src, 0, sk, old, new, age)
            run_rescue(src, 0, sk, old, new)
            got = [ev for ev in map(schema.decode, src.poll(0.2))
                   if ev["sk"] == sk and ev["flags"] & RESCUED]
            after = src.counters()
            return [got, after["rescued"] - before["rescued"],
                    after["stale_ran"] - before["stale_ran"]]

        # The socket map has it in ESTABLISHED. A firing ESTABLISHED -> CLOSE_WAIT with its
        # own record as the last push: the state program ran.
        assert rescued(EST, CW, 0) == [[], 0, 0]
        # The same record, 3 pushes old, the socket still in ESTABLISHED: a record left
        # behind hid a skip. Rescued (the map now says CLOSE_WAIT).
        got, n, stale = rescued(EST, CW, 3)
        assert (n, stale) == (1, 1), (got, n, stale)
        assert [(e["old"], e["new"]) for e in got] == [(EST, CW)], got
        # Again 3 pushes old, but the socket has moved on to the new state: the state program
        # ran (nested firings pushed after it). Not handled twice.
        assert rescued(EST, CW, 3) == [[], 0, 0]
        # No record at all and still in the old state: a plain skip, rescued as ever.
        got, n, stale = rescued(CW, LAST_ACK, None)
        assert (n, stale, len(got)) == (1, 0, 1), (got, n, stale)


def test_top_tells_a_left_behind_record_by_its_cw_map():
    """top's raw path: a record that is not the last push is checked against what tw_top would
    have done to the `cw` map (an exit deletes the socket's entry, an entry makes one)."""
    opts = loader.Options(states=(schema.CLOSE_WAIT,), cw_map=True)
    with source_and_connection(opts, "cw_raw") as (src, c, _, port):
        c.close()  # the server socket enters CLOSE_WAIT: tw_top makes its `cw` entry
        deadline, sk = time.monotonic() + 5, None
        while sk is None and time.monotonic() < deadline:
            sk = next((k for k, v in src.read_cw() if port in v), None)
            time.sleep(0.05)
        assert sk, "no cw entry for the server socket"

        def in_cw() -> bool:
            return any(k == sk for k, _ in src.read_cw())

        def step(old: int, new: int, age: int) -> tuple[int, int]:
            before = src.counters()
            plant_record(src, 0, sk, old, new, age)
            run_rescue(src, 0, sk, old, new)
            after = src.counters()
            return (after["rescued"] - before["rescued"],
                    after["stale_ran"] - before["stale_ran"])

        # An exit whose record is the last push: tw_top ran; the entry stays as is.
        assert step(CW, LAST_ACK, 0) == (0, 0) and in_cw()
        # 3 pushes old and the entry still there: tw_top would have deleted it, so it was
        # skipped. Rescued: the exit is handled, the entry goes.
        assert step(CW, LAST_ACK, 3) == (1, 1) and not in_cw()
        # Again, entry gone: tw_top ran. Taken.
        assert step(CW, LAST_ACK, 3) == (0, 0)
        # An entry into CLOSE_WAIT 3 pushes old with no `cw` entry: skipped, rescued, the
        # entry made. Then again with the entry there: tw_top ran.
        assert step(EST, CW, 3) == (1, 1) and in_cw()
        assert step(EST, CW, 3) == (0, 0) and in_cw()

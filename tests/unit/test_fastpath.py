"""The trace's fast path (fastpath.FastPath) against the general path (decode -> feed ->
records -> orjson): the same bytes, the same table, the same aggregator state, on random
streams that go everywhere the general path can go. Every test runs twice: with the compiled
formatter (tcpwatch._fastlines, a failure under CI when it was not built) and without."""

from __future__ import annotations

import io
import random
import re
import socket
import struct
import zlib

import orjson
import pytest
from streams import (
    NETNS,
    SEC,
    WALL_OFFSET_NS,
    Entry,
    FakeResolver,
    Found,
    Holder,
    at,
    churn,
    const,
    flags,
)

from tcpwatch import fastpath, ringbuf, schema
from tcpwatch.aggregate import Aggregator
from tcpwatch.classify import Causes
from tcpwatch.fastpath import FIELDS, FastPath, secs_text, unpacker
from tcpwatch.pipeline import TraceLoop, pid_filter
from tcpwatch.sinks.ndjson import NdjsonSink
from tcpwatch.sinks.table import TableSink

ST = schema.STATE_NUMBERS
CW = schema.CLOSE_WAIT
COMMS = ["server", "api", 'we"ird\\', "ünïcødé", "\x01ctl\x7f", "", "kube-controller"]
V4 = ["10.0.0.1", "10.0.0.2", "127.0.0.1", "192.168.100.200"]
RECV_EOF = Causes(recv_eof=True)
V6 = ["2001:db8::1", "::1", "::ffff:10.0.0.1", "fe80::1234:5678:9abc:def0"]


@pytest.fixture(autouse=True, params=["compiled", "python"])
def compiled(request, monkeypatch) -> bool:
    """Run the test with and without the compiled formatter."""
    on = request.param == "compiled"
    if on and fastpath._fastlines is None:
        pytest.skip("tcpwatch._fastlines is not built (pip install -e . with gcc and "
                    "Python's headers)")
    monkeypatch.setattr(fastpath, "COMPILED", on)
    return on


class Recorded:
    def __init__(self, batches: list[list[bytes]]) -> None:
        self.batches = list(batches)
        self.polls = 0

    def poll(self, timeout_s: float) -> list[bytes]:
        self.polls += 1
        return self.batches.pop(0) if self.batches else []

    def counters(self) -> dict[str, int]:
        return {"lost": self.polls // 7, "missed": self.polls // 11}


def random_duration(rng: random.Random) -> int:
    return rng.choice([
        0, 1, 499, 500, 501, 999, 1_000, 1_500, 2_500,  # ties at half a microsecond
        rng.randrange(1, 2_000_000),
        rng.randrange(0, 10**6) * 1000 + 500,
        rng.randrange(1, 5 * SEC),
        rng.randrange(10**12 - 10**6, 10**12 + 10**6),  # around 1000 s
        rng.randrange(10**12, 10**15),  # days
        10**12 + 499, 9_999 * SEC + 500_499,
    ])


def random_stream(seed: int, sockets: int = 400) -> tuple[list[bytes], list]:
    """Raw events of many sockets over ~6 s, and /proc entries for some of them (seeded as
    pre-existing): CLOSE_WAIT entries and exits of every kind, EOF and owner news, unknown
    kinds and states, sk reuse, odd comms, IPv6, netns 0, late events across batches."""
    rng = random.Random(seed)
    events: list[tuple[int, bytes]] = []
    existing = []
    for _ in range(sockets):
        v6 = rng.random() < 0.3
        pool = V6 if v6 else V4
        sock = {
            "sk": 0xFFFF888100000000 + rng.randrange(40) * 0x100,  # reused a lot
            "family": 6 if v6 else 4,
            "laddr": rng.choice(pool), "raddr": rng.choice(pool),
            "lport": rng.choice([0, 80, 8080, rng.randrange(1, 65536)]),
            "rport": rng.randrange(1, 65536),
            "netns": rng.choice([NETNS, NETNS, 0, 4026532000]),
        }
        t = rng.randrange(0, 6 * SEC)
        kinds = [const("TW_KIND_STATE")] * 12 + [const("TW_KIND_EOF"), const("TW_KIND_OWNER"), 9]
        path = rng.choice([
            ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            ["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            ["ESTABLISHED", "CLOSE_WAIT", "CLOSE"],
            ["CLOSE_WAIT", "LAST_ACK"],  # entered before tracing
            ["ESTABLISHED", "CLOSE_WAIT"],  # stays
            ["SYN_RECV", 13, "CLOSE_WAIT", 0, "CLOSE"],  # states this tree does not know
        ])
        # In /proc at start: sockets already in CLOSE_WAIT, and (a race the aggregator
        # reconciles) some that enter it after the kernel side was attached.
        if (path[0] == "CLOSE_WAIT" and rng.random() < 0.7) or (
            "CLOSE_WAIT" in path and rng.random() < 0.1
        ):
            existing.append(Entry(sock["netns"] or NETNS, sock["family"], sock["laddr"],
                                  sock["lport"], sock["raddr"], sock["rport"],
                                  rx_queue=rng.choice([0, 1, 7]), inode=rng.choice([0, 9100])))
        states = [s if isinstance(s, int) else ST[s] for s in path]
        for old, new in zip(states, states[1:]):
            t += rng.choice([300, 5_000, 400_000, rng.randrange(1, 3 * SEC)])
            if old == CW or new == CW or rng.random() < 0.2:
                for _ in range(rng.choice([0, 0, 1, 2])):
                    t += rng.randrange(1, 100_000)
                    events.append((t, schema.encode(sock_event(rng, sock, t, rng.choice(kinds),
                                                               old))))
            events.append((t, schema.encode(state_event(rng, sock, t, old, new))))
    events.sort(key=lambda te: te[0])
    raw = [r for _, r in events]
    for _ in range(len(raw) // 50):  # a few events come one batch late (per-CPU buffers)
        i = rng.randrange(len(raw) - 40)
        raw.insert(i + rng.randrange(1, 40), raw.pop(i))
    return raw, existing


def who(rng: random.Random, ev: dict) -> int:
    fl = rng.choice([0, flags("OWNER"), flags("OWNER"), flags("OWNER_LISTENER")])
    if fl or rng.random() < 0.3:
        ev.update(pid=rng.choice([812, 4194301]), tid=rng.choice([812, 813]),
                  comm=rng.choice(COMMS))
    return fl


def state_event(rng: random.Random, sock: dict, t: int, old: int, new: int) -> dict:
    ev = {**sock, "kind": const("TW_KIND_STATE"), "ts_ns": at(0) + t, "old": old, "new": new}
    fl = who(rng, ev)
    if rng.random() < 0.2:
        fl |= flags("PREV_UNKNOWN")
    else:
        ev["prev_ns"] = random_duration(rng)
    if rng.random() < 0.5:
        fl |= flags("ACTOR")
        ev.update(actor_pid=rng.choice([812, 900]), actor_tid=901,
                  actor_comm=rng.choice(COMMS))
    if rng.random() < 0.3:
        fl |= flags("EOF_READ")
    if old == CW:
        if rng.random() < 0.2:
            fl |= flags("CW_UNKNOWN")
        else:
            ev["cw_ns"] = random_duration(rng)
        ev["outcome"] = rng.choice([0, 0, 1, 2, 3, 4, 5, 7])
    ev["flags"] = fl
    return ev


def sock_event(rng: random.Random, sock: dict, t: int, kind: int, state: int) -> dict:
    ev = {**sock, "kind": kind, "ts_ns": at(0) + t, "old": state, "new": state}
    fl = who(rng, ev)
    if kind == const("TW_KIND_EOF") or rng.random() < 0.3:
        fl |= flags("EOF_READ")
    ev["flags"] = fl
    return ev


class SomeHeld(FakeResolver):
    """/proc finds about half the sockets, some held by another process than the owner."""

    def resolve(self, keys: list[tuple]) -> dict:
        out = {}
        for key in keys:
            h = zlib.crc32(repr(key[2:]).encode()) % 4
            out[key] = [(None, []), (Found(0, 0), []), (Found(5, 9204), [Holder(813, "w", 7)]),
                        (Found(1, 9301), [Holder(2001, "nginx", 12), Holder(2002, "n", 3)])][h]
        return out


def run(raw: list[bytes], existing: list, fast: bool, *, batch: int = 97, offset: int = 0,
        causes: Causes | None = RECV_EOF, rows: int = 25,
        start: int | None = at(0)):
    """The whole trace loop over `raw` with an NDJSON sink and a rate-limited table."""
    rng = random.Random(batch)
    batches, i = [], 0
    while i < len(raw):
        n = rng.randrange(1, 2 * batch)
        batches.append(raw[i:i + n])
        i += n
    agg = Aggregator(0.5, WALL_OFFSET_NS + offset, SomeHeld().resolve, start_mono_ns=start,
                     causes=causes)
    out, screen = io.BytesIO(), io.StringIO()
    table = TableSink(screen, color=False, clock=lambda: 0.0, rows_per_s=rows,
                      elsewhere="/var/log/t.ndjson", wall=lambda: 1795237980.0)
    sinks = [table, NdjsonSink(out)]
    ticks = iter(range(at(0), at(10**6), 250_000_000))  # leaks come due as events go by
    loop = TraceLoop(Recorded(batches), agg, sinks, clock=lambda: next(ticks), fast=fast)
    assert (loop.fast is not None) == fast
    assert not fast or loop.fast.compiled == fastpath.COMPILED
    for rec in agg.seed_existing(existing, {9100: [Holder(812, "server", 9)]}, at(0)):
        loop.emit([rec])
    orig = loop._drain

    def drain(timeout_s: float) -> None:
        orig(timeout_s)
        if not loop.source.batches:
            loop.stop()

    loop._drain = drain
    loop.run(None)
    loop.close()
    state = sorted(repr(s) for s in agg.in_close_wait())
    pending = [(t.sk, t.since_ns, t.leaked) for t in agg._pending]
    counters = (agg.events, agg.transitions, agg.close_waits, agg.leaks, agg.lost)
    return out.getvalue(), screen.getvalue(), state, pending, counters, loop


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_writes_what_the_general_path_writes(seed, compiled):
    raw, existing = random_stream(seed)
    offset = random.Random(seed).randrange(SEC)  # seconds fall anywhere
    fast = run(raw, existing, True, offset=offset)
    slow = run(raw, existing, False, offset=offset)
    assert fast[0] == slow[0]  # NDJSON, byte for byte
    assert fast[1] == slow[1]  # the table, rows and "not shown" counts
    assert fast[2:5] == slow[2:5]  # tracked sockets, leak queue, counters
    assert fast[5].fast.fast > len(raw) // 2  # the fast path did most of it
    # ... and the compiled formatter some of it (these streams track most sockets)
    assert (fast[5].fast.in_c > len(raw) // 20) == compiled


@pytest.mark.parametrize("causes", [None, Causes(recv_eof=False, slow_close_s=0.002)])
def test_fast_path_without_causes_or_with_another_slow_close(causes):
    raw, existing = random_stream(99, sockets=200)
    assert run(raw, existing, True, causes=causes)[:5] == run(raw, existing, False,
                                                               causes=causes)[:5]


@pytest.mark.parametrize("rows", [10**9, 10])
def test_fast_path_on_the_churn_is_all_fast_and_identical(compiled, rows):
    raw = churn(1500)
    fast = run(raw, [], True, batch=5000, rows=rows)
    slow = run(raw, [], False, batch=5000, rows=rows)
    assert fast[:5] == slow[:5]
    assert fast[5].fast.fast == len(raw)  # no event needed the general path
    if compiled and rows == 10:  # in C: all but what the table shows (its 10 rows a second)
        assert fast[5].fast.in_c >= len(raw) * 95 // 100
        # handed to Python only when due: the churn's one leak
        assert fast[5].fast.handed == fast[4][3] == 1
    # (with rows=10**9 the table shows every transition: each needs its record, from Python)
    lines = fast[0].splitlines()
    assert sum(b'"event":"state"' in line for line in lines) == 15000
    assert sum(b'"event":"close_wait"' in line for line in lines) == 1500


@pytest.mark.parametrize("seed", range(6))
def test_sockets_held_in_c_end_as_in_python(seed, compiled, monkeypatch):
    """No pre-existing socket to bind, so the compiled formatter holds sockets entering
    CLOSE_WAIT: their news, exits, leaks (handed over when due), table rows, odd comms and
    stale events must come out as the general path has them; also with room for 2 only."""
    raw, _ = random_stream(seed)
    offset = random.Random(seed).randrange(SEC)
    slow = run(raw, [], False, offset=offset, rows=3)
    fast = run(raw, [], True, offset=offset, rows=3)
    assert fast[:5] == slow[:5]
    if compiled:
        held = fast[5].fast
        assert held.adopted > 0  # (handed over when due: see the churn test)
        monkeypatch.setattr(fastpath, "HOLD", False)
        plain = run(raw, [], True, offset=offset, rows=3)
        assert plain[:5] == slow[:5]
        assert held.in_c > plain[5].fast.in_c and plain[5].fast.handed == 0
        monkeypatch.setattr(fastpath, "HOLD", True)
        monkeypatch.setattr(fastpath, "HELD_MAX", 2)
        assert run(raw, [], True, offset=offset, rows=3)[:5] == slow[:5]


def test_fast_path_with_tiny_caches_and_no_start_time(monkeypatch):
    monkeypatch.setattr(fastpath, "CACHE_MAX", 3)  # every cache fills and starts again
    monkeypatch.setattr(fastpath, "CHUNK", 7)  # lines go out in many small writes
    raw, existing = random_stream(7, sockets=150)
    assert run(raw, existing, True, start=None)[:5] == run(raw, existing, False, start=None)[:5]


def test_raw_bytes_no_encoder_makes():
    """Comms that are not UTF-8, times in the first second of the clock, odd families."""
    lay = schema.layout()
    comm_at = dict((name, off) for name, off, _ in lay.fields)["comm"]
    fam_at = dict((name, off) for name, off, _ in lay.fields)["family"]
    raw = []
    for i, ev in enumerate(churn(30)):
        b = bytearray(ev)
        if i % 3 == 0:
            b[comm_at:comm_at + 16] = b"\xff\xfe\xc3(ab\x00garbage\x00\x00\x00\x00"
        if i % 7 == 0:
            b[fam_at:fam_at + 2] = (0).to_bytes(2, "little")
        raw.append(bytes(b))
    for offset in (0, -WALL_OFFSET_NS - at(0) + 3):  # wall time 3 ns after the epoch at T0
        assert run(raw, [], True, offset=offset)[:5] == run(raw, [], False, offset=offset)[:5]
    early = [r[:0] + (5).to_bytes(8, "little") + r[8:] for r in raw[:5]]  # ts_ns 5
    assert run(early, [], True, start=None)[:5] == run(early, [], False, start=None)[:5]


def test_every_line_parses_and_matches_the_records(tmp_path):
    raw, existing = random_stream(3, sockets=100)
    data = run(raw, existing, True)[0]
    for line in data.splitlines():
        assert orjson.dumps(orjson.loads(line)) == line


def test_fast_path_only_where_it_is_exact():
    agg = Aggregator(30, 0)
    out = NdjsonSink(io.BytesIO())
    assert FastPath.build(agg, [out]) is not None
    assert FastPath.build(agg, [out], keep=pid_filter([1])) is None  # --pid: records filtered
    assert FastPath.build(agg, [TableSink(io.StringIO(), color=False)]) is None  # table only
    unlimited = TableSink(io.StringIO(), color=False)
    assert FastPath.build(agg, [unlimited, out]) is None  # every row would need a record
    limited = TableSink(io.StringIO(), color=False, rows_per_s=50)
    assert FastPath.build(agg, [limited, out]) is not None
    stacks = Aggregator(30, 0, symbolize=lambda ev: {})
    assert FastPath.build(stacks, [out]) is None  # --stacks


def test_unpacker_follows_the_header_and_refuses_another_order():
    lay = schema.layout()
    raw = churn(1)[0]
    assert unpacker(lay, FIELDS)(raw)[:2] == schema.layout().struct.unpack_from(raw)[:2]
    assert unpacker(lay, ("sk", "ts_ns")) is None
    assert unpacker(lay, ("saddr", "pid")) is None  # daddr must come with saddr


@pytest.mark.parametrize("ns", [0, 1, 499, 500, 501, 1_500, 12_345, 10**12 - 500, 10**12 + 499,
                                10**15 + 500, 123_456_789_500, -1_500, -2])
def test_secs_text_is_round_and_orjson(ns):
    value, text = secs_text(ns, {})
    assert value == round(ns / 1e9, 6)
    assert text == orjson.dumps(round(ns / 1e9, 6)).decode()


def test_secs_text_on_random_values():
    rng = random.Random(5)
    cache: dict = {}
    for _ in range(20000):
        ns = rng.choice([rng.randrange(10**7), rng.randrange(10**13), rng.randrange(10**6) * 1000
                         + 500])
        assert secs_text(ns, cache) == (round(ns / 1e9, 6), orjson.dumps(round(ns / 1e9, 6))
                                        .decode())


def test_docstring_examples():
    import doctest

    assert doctest.testmod(fastpath).failed == 0


def test_the_ring_scanner_reads_the_ring_as_walk_and_process_do(compiled, monkeypatch):
    """The compiled scanner walking a ring buffer's memory in place (wrapping around its end,
    skipping discarded records, stopping at a busy one) writes what walk() + process() do."""
    from test_ringbuf import Ring

    from tcpwatch.ringbuf import BUSY_BIT, DISCARD_BIT, walk

    raw, existing = random_stream(4, sockets=150)
    raw = churn(200, start_s=7.0) + raw[:1500]
    ring = Ring(1 << 20, pos=(1 << 20) * 3 - 40_000)  # wraps 40 kB in
    positions = [ring.put(r) for r in raw]
    for i in range(5, len(raw), 97):
        ring.set_flags(positions[i], DISCARD_BIT)
    busy = len(raw) * 2 // 3
    ring.set_flags(positions[busy], BUSY_BIT)
    base, mask = 4096, (1 << 20) - 1

    def make() -> tuple[FastPath, io.BytesIO, io.StringIO]:
        agg = Aggregator(0.5, WALL_OFFSET_NS, SomeHeld().resolve, start_mono_ns=None,
                         causes=RECV_EOF)
        for _ in agg.seed_existing(existing, {}, at(0)):
            pass
        out, screen = io.BytesIO(), io.StringIO()
        table = TableSink(screen, color=False, clock=lambda: 0.0, rows_per_s=40,
                          wall=lambda: 1795237980.0)
        return FastPath.build(agg, [table, NdjsonSink(out)]), out, screen

    def by_c() -> tuple:
        fast, out, screen = make()
        scan = fast.ring_scanner()
        assert scan is not None
        cons = ring.start
        for _ in range(2):  # up to the busy record, then (submitted) the rest
            # As MmapRing maps it: the second copy's first page only.
            mem = ring.mapped(base)[:base + mask + 1 + ringbuf.EXTRA]
            items, cons = ringbuf.walk_wrapped(mem, cons, ring.prod, mask, base, scan)
            fast.process_items(items)
            ring.set_flags(positions[busy], 0)
        ring.set_flags(positions[busy], BUSY_BIT)
        assert cons == ring.prod
        return fast, out, screen

    def by_python() -> tuple:
        monkeypatch.setattr(fastpath, "COMPILED", False)
        fast, out, screen = make()
        cons = ring.start
        for _ in range(2):
            batch, cons = walk(ring.mapped(base), cons, ring.prod, mask, base)
            fast.process(batch)
            ring.set_flags(positions[busy], 0)
        ring.set_flags(positions[busy], BUSY_BIT)
        assert cons == ring.prod
        return fast, out, screen

    if not compiled:
        assert make()[0].ring_scanner() is None  # nothing reads the ring in place
        return
    c, py = by_c(), by_python()
    for fast, _, _ in (c, py):
        fast.line_sinks[0].flush()
        for sink in fast.record_sinks:
            sink.close()
    assert c[1].getvalue() == py[1].getvalue() and c[1].getvalue().count(b"\n") > 2000
    assert c[2].getvalue() == py[2].getvalue()
    a, b = c[0].agg, py[0].agg
    assert (a.events, a.transitions, a.close_waits, a._start_ns) == (
        b.events, b.transitions, b.close_waits, b._start_ns)
    assert sorted(map(repr, a.in_close_wait())) == sorted(map(repr, b.in_close_wait()))
    assert c[0].in_c > len(raw) // 3


def test_the_compiled_formatter_is_used_only_when_it_agrees(compiled, monkeypatch):
    """Off with TCPWATCH_FASTLINES=0, or when the built module reads another layout than the
    header's (it was built before tcpwatch.h changed): the pure-Python path then."""
    def build() -> FastPath:
        return FastPath.build(Aggregator(30, 0), [NdjsonSink(io.BytesIO())])

    assert build().compiled == compiled
    monkeypatch.setenv("TCPWATCH_FASTLINES", "0")
    assert not build().compiled
    monkeypatch.delenv("TCPWATCH_FASTLINES")
    if compiled:
        size, fields = fastpath._fastlines.LAYOUT
        moved = tuple((n, off + 8 if n == "comm" else off, k) for n, off, k in fields)
        monkeypatch.setattr(fastpath._fastlines, "LAYOUT", (size, moved))
        assert not build().compiled


def test_addresses_are_written_as_python_writes_them(compiled, monkeypatch):
    """The compiled formatter writes IPv4 text itself and caches IPv6 text in 64 slots: every
    octet width, and 300 IPv6 addresses (slots get replaced) with zero runs anywhere,
    v4-mapped and v4-compatible forms."""
    rng = random.Random(7)
    v4 = ["0.0.0.0", "255.255.255.255", "1.22.199.9", "100.10.0.250", "9.99.100.255"]
    v4 += [socket.inet_ntoa(rng.randbytes(4)) for _ in range(200)]
    v6 = ["::", "::1", "1::", "::ffff:0.0.0.0", "::ffff:255.1.2.3", "::1.2.3.4", "1:0:0:1::",
          "a:b:c:d:e:f:1:2", "1:0:1:0:1:0:1:0", "fe80::1:0:0:1"]
    for _ in range(300):
        words = [rng.choice([0, 0, rng.randrange(1, 65536)]) for _ in range(8)]
        v6.append(socket.inet_ntop(socket.AF_INET6, struct.pack("!8H", *words)))
    monkeypatch.setitem(globals(), "V4", v4)
    monkeypatch.setitem(globals(), "V6", v6)
    raw, existing = random_stream(3, sockets=1500)
    fast = run(raw, existing, True)
    assert fast[:5] == run(raw, existing, False)[:5]
    assert (fast[5].fast.in_c > len(raw) // 20) == compiled
    written = {m.decode() for m in re.findall(rb'"[lr]addr":"([^"]+)"', fast[0])}
    assert len(written & set(v4)) > 150 and len(written & set(v6)) > 250

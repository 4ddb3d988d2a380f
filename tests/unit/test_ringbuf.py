"""ringbuf.walk(): the BPF ring buffer's record protocol on synthetic buffers (no kernel).

Buffers are laid out as the reader sees the kernel's mapping: the data area twice in a row
(after `base` bytes standing for the producer page), or as MmapRing maps it, the second copy
cut short, with positions free-running and masked.
"""

from __future__ import annotations

import random
import struct

import pytest

from tcpwatch import ringbuf
from tcpwatch.ringbuf import BUSY_BIT, DISCARD_BIT, walk

SIZE = 256  # data area bytes (a power of two; the kernel's is a multiple of the page size)
MASK = SIZE - 1


class Ring:
    """A data area written at free-running positions, like the kernel's producer."""

    def __init__(self, size: int = SIZE, pos: int = 0) -> None:
        self.data = bytearray(size)
        self.mask = size - 1
        self.start = self.prod = pos

    def put(self, payload: bytes, flags: int = 0) -> int:
        """Append a record; returns its position."""
        pos = self.prod
        rec = struct.pack("=II", len(payload) | flags, 0) + payload
        for i, b in enumerate(rec):
            self.data[(pos + i) & self.mask] = b
        self.prod += (len(rec) + 7) & ~7
        return pos

    def set_flags(self, pos: int, flags: int) -> None:
        off = pos & self.mask  # headers are 8-aligned: never split across the end
        (word,) = struct.unpack_from("=I", self.data, off)
        struct.pack_into("=I", self.data, off, (word & (DISCARD_BIT - 1)) | flags)

    def mapped(self, base: int = 0) -> bytes:
        """What the reader's mapping shows: `base` bytes, then the data area twice."""
        return b"\xee" * base + bytes(self.data) * 2


def test_records_in_order_with_8_byte_rounding():
    ring = Ring()
    payloads = [b"a", b"12345678", b"123456789", b"", b"x" * 20]
    for p in payloads:
        ring.put(p)
    # 8+1 -> 16, 8+8 -> 16, 8+9 -> 24, 8+0 -> 8, 8+20 -> 32
    assert ring.prod == 96
    out, cons = walk(ring.mapped(), 0, ring.prod, MASK)
    assert out == payloads
    assert all(type(b) is bytes for b in out)
    assert cons == ring.prod


def test_empty_ring():
    ring = Ring(pos=5 * SIZE + 40)
    assert walk(ring.mapped(), ring.prod, ring.prod, MASK) == ([], ring.prod)


def test_discarded_records_are_skipped_and_consumed():
    ring = Ring()
    ring.put(b"keep1")
    gone = ring.put(b"discarded payload")
    ring.put(b"keep2")
    ring.set_flags(gone, DISCARD_BIT)
    assert walk(ring.mapped(), 0, ring.prod, MASK) == ([b"keep1", b"keep2"], ring.prod)


def test_a_busy_record_stops_the_walk_until_submitted():
    ring = Ring()
    ring.put(b"first")
    busy = ring.put(b"not yet submitted")
    ring.put(b"submitted after the busy one")
    ring.set_flags(busy, BUSY_BIT)
    out, cons = walk(ring.mapped(), 0, ring.prod, MASK)
    assert out == [b"first"]
    assert cons == busy  # the consumer waits at the busy record
    ring.set_flags(busy, 0)
    out, cons = walk(ring.mapped(), cons, ring.prod, MASK)
    assert out == [b"not yet submitted", b"submitted after the busy one"]
    assert cons == ring.prod


def test_busy_and_discarded_is_still_busy():
    ring = Ring()
    pos = ring.put(b"zzz")
    ring.set_flags(pos, BUSY_BIT | DISCARD_BIT)
    assert walk(ring.mapped(), 0, ring.prod, MASK) == ([], 0)


def test_positions_wrap_past_the_data_size():
    # Positions are free-running: several laps done, and a record crossing the end of the
    # data area, which the double mapping shows contiguous.
    start = 7 * SIZE + SIZE - 24
    ring = Ring(pos=start)
    payloads = [b"A" * 30, b"B" * 100, b"C" * 3]
    for p in payloads:
        ring.put(p)
    assert (start & MASK) + 8 + 30 > SIZE  # the first one wraps
    out, cons = walk(ring.mapped(), start, ring.prod, MASK)
    assert out == payloads
    assert cons == ring.prod


def test_base_offset_skips_the_producer_page():
    ring = Ring(pos=3 * SIZE + 200)
    ring.put(b"hello ring")
    ring.put(b"again")
    out, cons = walk(ring.mapped(base=64), ring.start, ring.prod, MASK, base=64)
    assert out == [b"hello ring", b"again"]
    assert cons == ring.prod


def test_limit():
    ring = Ring()
    for i in range(6):
        ring.put(bytes([i]) * (i + 1))
    gone = ring.put(b"d")
    ring.put(b"last")
    ring.set_flags(gone, DISCARD_BIT)
    data = ring.mapped()
    out, cons = walk(data, 0, ring.prod, MASK, limit=4)
    assert out == [bytes([i]) * (i + 1) for i in range(4)]
    out2, cons2 = walk(data, cons, ring.prod, MASK, limit=4)
    assert out2 == [b"\x04" * 5, b"\x05" * 6, b"last"]  # the discarded one is not counted
    assert cons2 == ring.prod
    assert walk(data, 0, ring.prod, MASK, limit=0) == ([], 0)


def test_full_ring():
    ring = Ring(pos=SIZE * 1000 + 8)
    while ring.prod - ring.start + 16 <= SIZE:
        ring.put(b"12345678")
    assert ring.prod - ring.start == SIZE
    out, cons = walk(ring.mapped(), ring.start, ring.prod, MASK)
    assert len(out) == SIZE // 16 and set(out) == {b"12345678"}
    assert cons == ring.prod


@pytest.mark.parametrize(("cons", "prod"), [(100, 90), (0, SIZE + 8)])
def test_impossible_positions_are_refused(cons, prod):
    with pytest.raises(ValueError):
        walk(bytes(2 * SIZE), cons, prod, MASK)


def test_random_streams_match_a_model():
    rnd = random.Random(20261121)
    for _ in range(300):
        ring = Ring(pos=rnd.randrange(1 << 40) & ~7)
        cons = ring.start
        expected: list[bytes] = []
        busy_at = None
        while True:
            payload = rnd.randbytes(rnd.choice([0, 1, 7, 8, 9, 24, 45]))
            if ring.prod + ((8 + len(payload) + 7) & ~7) - cons > SIZE:
                break
            pos = ring.put(payload)
            roll = rnd.random()
            if roll < 0.15:
                ring.set_flags(pos, DISCARD_BIT)
            elif roll < 0.2 and busy_at is None:
                ring.set_flags(pos, BUSY_BIT)
                busy_at = pos
            elif busy_at is None:
                expected.append(payload)
        out, new = walk(ring.mapped(base=8), cons, ring.prod, MASK, base=8)
        assert out == expected
        assert new == (busy_at if busy_at is not None else ring.prod)


def test_the_second_copy_cut_short_reads_the_same_in_two_pieces():
    # MmapRing maps EXTRA bytes of the second copy, not all of it: a walk that passes the end
    # of the data area reads the record across it there, then goes on from the start; with a
    # limit too, spread over the two pieces.
    rnd = random.Random(5)
    extra = 64  # more than the longest record below (8 + 45 bytes)
    for _ in range(300):
        ring = Ring(pos=rnd.randrange(1 << 40) & ~7)
        cons = ring.start
        expected: list[bytes] = []
        while True:
            payload = rnd.randbytes(rnd.choice([0, 1, 7, 8, 9, 24, 45]))
            if ring.prod + ((8 + len(payload) + 7) & ~7) - cons > SIZE:
                break
            pos = ring.put(payload)
            if rnd.random() < 0.15:
                ring.set_flags(pos, DISCARD_BIT)
            else:
                expected.append(payload)
        mem = ring.mapped(base=8)[:8 + SIZE + extra]
        got: list[bytes] = []
        while cons != ring.prod:
            out, cons = walk(mem, cons, ring.prod, MASK, base=8, extra=extra,
                             limit=rnd.choice([None, 1, 3, 7]))
            got += out
        assert got == expected


def test_a_record_running_past_the_end_is_refused():
    ring = Ring()
    ring.put(b"x" * 16)
    data = bytearray(ring.mapped())
    struct.pack_into("=I", data, 0, 200)  # a length past what the producer position covers
    for limit in (None, 5):
        with pytest.raises(ValueError, match="runs past"):
            walk(bytes(data), 0, ring.prod, MASK, limit=limit)


def test_mmap_reader_only_on_x86_64(monkeypatch):
    monkeypatch.setattr(ringbuf.platform, "machine", lambda: "aarch64")
    assert not ringbuf.mmap_supported()
    monkeypatch.setattr(ringbuf.platform, "machine", lambda: "x86_64")
    assert ringbuf.mmap_supported()

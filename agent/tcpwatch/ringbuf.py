"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) straight from its memory.

bcc hands each record to a Python callback through ctypes (0.5-0.8 us per event); mapping the
buffer and walking its records in Python costs 0.25-0.3 us, the copy included. The layout is the
kernel's (Documentation/bpf/ringbuf.rst), mapped as libbpf maps it:

- offset 0, one page, read-write: the consumer page; its first u64 is consumer_pos, which
  only we write (it tells the kernel how much room it may reuse);
- offset page_size, read-only: the producer page (first u64: producer_pos), then the data
  area of `data_size` bytes, which the kernel lets us map twice in a row, so that a record
  that wraps around the end of the data area is still contiguous. We map the second copy's
  first page only (`EXTRA`): a record is far shorter than a page, so that is enough, and the
  mapping adds the ring's size to the agent's RSS once, not twice. Walks that pass the end
  of the data area go on from its start (MmapRing.drain_with).

Positions are free-running u64 byte counters; a record starts at `pos & (data_size - 1)`
in the data area with an 8-byte header: u32 len (payload bytes, plus BUSY while the producer
has not submitted it yet, plus DISCARD if it was discarded), u32 page offset (kernel use).
It occupies round_up(8 + len, 8) bytes.

Memory ordering: the kernel clears BUSY after writing the payload, and publishes positions
with release stores. On x86-64 (TSO) loads are not reordered with older loads and stores
not with older loads, so plain aligned loads and stores are enough: that is why this reader
is only used on x86_64 (mmap_supported()). Each position and header is read through a
memoryview cast ('Q'/'I'), i.e. one aligned load, never byte by byte.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import platform
import select
from collections.abc import Callable

from tcpwatch import bpfsys

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_FLAGS = BUSY_BIT | DISCARD_BIT
_LEN = DISCARD_BIT - 1

EXTRA = 4096  # bytes of the data area's second copy mapped after it: more than a record
BPF_MAP_TYPE_RINGBUF = 27
_BPF_OBJ_GET_INFO_BY_FD = 15


def mmap_supported() -> bool:
    """Whether this machine's memory model lets walk() use plain loads (x86-64 TSO)."""
    return platform.machine() == "x86_64"


def walk(buf, cons: int, prod: int, mask: int, base: int = 0,
         limit: int | None = None, extra: int = EXTRA) -> tuple[list[bytes], int]:
    """Records between positions `cons` and `prod`: (payloads in ring order, new consumer pos).

    `buf` is laid out like the mapping from byte `base` on: the data area (mask + 1 bytes),
    then at least its first `extra` bytes again, and must slice to bytes (an mmap, bytes).
    Stops at the first record still BUSY, skips discarded ones, and after `limit` payloads
    if given. Pure: tests feed it a bytes buffer.
    """
    return walk_wrapped(buf, cons, prod, mask, base, _limited(limit), extra)


def _limited(limit: int | None) -> Callable[..., tuple[list[bytes], int]]:
    """walk_span() as a walk_wrapped() scan, with at most `limit` payloads over its calls."""
    left = limit

    def scan(buf, start: int, end: int, stop: int) -> tuple[list[bytes], int]:
        nonlocal left
        out, off = walk_span(buf, start, end, left, stop)
        if left is not None:
            left -= len(out)
        return out, off

    return scan


def walk_wrapped(buf, cons: int, prod: int, mask: int, base: int,
                 scan: Callable[..., tuple[list, int]], extra: int = EXTRA
                 ) -> tuple[list, int]:
    """`scan(buf, start, end, stop)` over the records between positions cons and prod, in
    one piece or, when they pass the end of the data area, in two: up to the end (a record
    that starts before it and runs over is read whole in the `extra` bytes of the second copy
    mapped after it), then on from the start. Returns (items of both, the position reached)."""
    start, end = span(cons, prod, mask, base)
    wrap = base + mask + 1
    if end <= wrap:
        items, off = scan(buf, start, end, end)
        return items, cons + (off - start)
    items, off = scan(buf, start, min(end, wrap + extra), wrap)
    if off < wrap:  # stopped early (a busy record, a limit)
        return items, cons + (off - start)
    more, off2 = scan(buf, off - wrap + base, end - wrap + base, end - wrap + base)
    return items + more, cons + (off - start) + (off2 - (off - wrap + base))


def span(cons: int, prod: int, mask: int, base: int = 0) -> tuple[int, int]:
    """The byte offsets in the mapping of the records between positions cons and prod (never
    past the second copy of the data area, so a record that wraps is contiguous there)."""
    avail = prod - cons
    if not 0 <= avail <= mask + 1:
        raise ValueError(f"ring positions out of range: consumer {cons}, producer {prod}")
    start = base + (cons & mask)
    return start, start + avail


def walk_span(buf, start: int, end: int, limit: int | None = None,
              stop: int | None = None) -> tuple[list[bytes], int]:
    """walk() between two byte offsets of `buf`: (payloads, the offset reached). Only records
    that start before `stop` (default: end) are read; each must end by `end`."""
    off = start
    stop = end if stop is None else stop
    out: list[bytes] = []
    append = out.append
    with memoryview(buf) as mv, mv.cast("I") as words:
        if limit is None:
            while off < stop:
                hdr = words[off >> 2]
                if hdr & _FLAGS:
                    if hdr & BUSY_BIT:
                        break
                    off += ((hdr & _LEN) + HDR_SIZE + 7) & ~7  # discarded: skip it
                    continue
                nxt = off + HDR_SIZE + hdr
                if nxt > end:
                    raise ValueError(f"ring record at {off} runs past {end}")
                append(buf[off + HDR_SIZE:nxt])
                off = (nxt + 7) & ~7
        else:  # a second loop so that the usual, unlimited one pays for no count
            left = limit
            while off < stop and left > 0:
                hdr = words[off >> 2]
                if hdr & BUSY_BIT:
                    break
                nxt = off + HDR_SIZE + (hdr & _LEN)
                if nxt > end:
                    raise ValueError(f"ring record at {off} runs past {end}")
                if not hdr & DISCARD_BIT:
                    append(buf[off + HDR_SIZE:nxt])
                    left -= 1
                off = (nxt + 7) & ~7
    return out, off


class _MapInfo(ctypes.Structure):  # the head of struct bpf_map_info
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _InfoAttr(ctypes.Structure):  # union bpf_attr, BPF_OBJ_GET_INFO_BY_FD member
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def map_info(map_fd: int) -> tuple[int, int]:
    """(map type, max_entries) of a BPF map, from BPF_OBJ_GET_INFO_BY_FD."""
    info = _MapInfo()
    attr = _InfoAttr(map_fd, ctypes.sizeof(info), ctypes.addressof(info))
    bpfsys.call(_BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return info.type, info.max_entries


class MmapRing:
    """A BPF ring buffer map read through mmap: wait() for data, drain() the records.

    Single consumer: nothing else (bcc's ring_buffer_poll included) may consume this map.
    """

    def __init__(self, map_fd: int, data_size: int | None = None) -> None:
        kind, size = map_info(map_fd)
        if kind != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"map fd {map_fd} is of type {kind}, not a ring buffer")
        if data_size is not None and data_size != size:
            raise ValueError(f"ring buffer holds {size} bytes, not {data_size}")
        page = mmap.PAGESIZE
        if size < page or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power-of-two number of pages")
        self.data_size = size
        self._mask = size - 1
        self._base = page  # the data area follows the producer page
        self.peak = 0  # the most bytes found waiting at a drain (how close to full it came)
        # Our own descriptor: bcc closes its map fd in cleanup(), maybe before close() here.
        self._fd = os.dup(map_fd)
        self._cons_mm = self._mm = None
        self._cons = self._prod = None
        try:
            self._cons_mm = mmap.mmap(self._fd, page, access=mmap.ACCESS_WRITE, offset=0)
            self._mm = mmap.mmap(self._fd, page + size + EXTRA, access=mmap.ACCESS_READ,
                                 offset=page)
            self._cons = memoryview(self._cons_mm).cast("Q")
            self._prod = memoryview(self._mm).cast("Q")
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
        except BaseException:
            self.close()
            raise

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (records, busy ones included)."""
        return self._prod[0] - self._cons[0]

    def wait(self, timeout_s: float) -> bool:
        """Block until the kernel signals data or timeout_s passes; True if data is there.

        Returns at once when records are already waiting: the kernel only wakes readers
        every few thousand events (BPF_RB_NO_WAKEUP), so most data arrives silently.
        """
        if self.pending():
            return True
        if timeout_s > 0:
            self._poller.poll(math.ceil(timeout_s * 1000))
        return bool(self.pending())

    def drain(self, limit: int | None = None) -> list[bytes]:
        """Every submitted record (at most `limit`) as bytes, in ring order; frees their room."""
        return self.drain_with(_limited(limit))

    def drain_with(self, scan: Callable[[mmap.mmap, int, int, int], tuple[list, int]]) -> list:
        """drain() with `scan(memory, start, end, stop) -> (items, offset reached)` walking
        the records that start between two byte offsets of this mapping, start and stop, and
        end by `end` (walk_span(), or fastpath's compiled scanner), once or twice (see
        walk_wrapped); their room is freed up to where it stopped."""
        cons = self._cons[0]
        prod = self._prod[0]
        if cons == prod:
            return []
        if prod - cons > self.peak:
            self.peak = prod - cons
        items, reached = walk_wrapped(self._mm, cons, prod, self._mask, self._base, scan)
        if reached != cons:
            # The payloads are copies now: hand their room back to the kernel.
            self._cons[0] = reached
        return items

    def close(self) -> None:
        for view in (self._cons, self._prod):
            if view is not None:
                view.release()
        self._cons = self._prod = None
        for mm in (self._cons_mm, self._mm):
            if mm is not None:
                mm.close()
        self._cons_mm = self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

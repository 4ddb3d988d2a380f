"""The Python mirror of bpf/tcpwatch.h: event layout, constants, TCP state names.

The layout is read from the header itself (never restated here), so the C and the
Python side cannot drift apart; tests/unit/test_schema.py cross-checks it with gcc.

>>> decode(raw)["new"]     # doctest: +SKIP
8
"""

from __future__ import annotations

import re
import socket
import struct
from functools import lru_cache
from pathlib import Path

# include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
STATE_NUMBERS = {name: num for num, name in TCP_STATES.items()}
CLOSE_WAIT = 8

OUTCOMES = {0: None, 1: "closed", 2: "shutdown", 3: "reset", 4: "exit", 5: "error"}

_TYPES = {
    "__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q", "__s32": "i", "__s64": "q", "char": "s",
}  # fmt: skip
_DEFINE = re.compile(r"^#define\s+(TW_\w+)\s+(-?\d+)\b", re.M)
_FIELD = re.compile(r"^\s*(\w+)\s+(\w+)(?:\[(\w+)\])?\s*;", re.M)


def bpf_dir() -> Path:
    """Where the kernel programs live: shipped inside the package, a link in a checkout."""
    return Path(__file__).resolve().parent / "bpf"


class Layout:
    """A struct layout parsed from the header: field names, struct format, constants."""

    def __init__(self, header_text: str, struct_name: str = "tw_event") -> None:
        self.consts: dict[str, int] = {k: int(v) for k, v in _DEFINE.findall(header_text)}
        body = re.search(r"struct\s+" + struct_name + r"\s*\{(.*?)\};", header_text, re.S)
        if body is None:
            raise ValueError(f"struct {struct_name} not found in header")
        fmt = "="  # native byte order, no implicit padding: alignment is made explicit below
        offset = 0
        self.fields: list[tuple[str, int, int]] = []  # (name, offset, size)
        self.codes: dict[str, str] = {}  # name -> struct code of the field: "Q", "16s", ...
        self.arrays: dict[str, str] = {}
        max_align = 1
        for ctype, name, dim in _FIELD.findall(re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)):
            code = _TYPES[ctype]
            size = 1 if code == "s" else struct.calcsize(code)
            count = 1
            if dim:
                count = int(dim) if dim.isdigit() else self.consts[dim]
            pad = (-offset) % size
            if pad:
                fmt += f"{pad}x"
                offset += pad
            max_align = max(max_align, size)
            if code == "s" or (dim and code == "B"):
                fmt += f"{count}s"
                self.codes[name] = f"{count}s"
                self.arrays[name] = ctype
                self.fields.append((name, offset, count))
                offset += count
            elif dim:  # other arrays: raw bytes too (array.array(code, value) reads them)
                fmt += f"{count * size}s"
                self.codes[name] = f"{count * size}s"
                self.arrays[name] = ctype
                self.fields.append((name, offset, count * size))
                offset += count * size
            else:
                fmt += code
                self.codes[name] = code
                self.fields.append((name, offset, size))
                offset += size
        tail = (-offset) % max_align
        if tail:
            fmt += f"{tail}x"
        self.struct = struct.Struct(fmt)
        self.names = [f[0] for f in self.fields]
        self.size = self.struct.size


@lru_cache(maxsize=1)
def layout() -> Layout:
    return Layout((bpf_dir() / "tcpwatch.h").read_text())


@lru_cache(maxsize=4)
def layout_of(struct_name: str) -> Layout:
    """Another struct of the header, e.g. "tw_cw" (the value of the kernel's `cw` map)."""
    return Layout((bpf_dir() / "tcpwatch.h").read_text(), struct_name)


# decode() runs per event (hundreds of thousands a second): the struct's field names are
# renamed once, and addresses and comms, which repeat, are decoded once each.
_RENAME = {"saddr": "laddr", "daddr": "raddr", "sport": "lport", "dport": "rport",
           "oldstate": "old", "newstate": "new"}
_CACHE_MAX = 65536
_v4_cache: dict[bytes, str] = {}
_v6_cache: dict[bytes, str] = {}
_comm_cache: dict[bytes, str] = {}


@lru_cache(maxsize=1)
def _decoder():
    lay = layout()
    return lay.struct.unpack_from, [_RENAME.get(n, n) for n in lay.names]


def _addr(raw: bytes, family: int) -> str:
    cache = _v6_cache if family == socket.AF_INET6 else _v4_cache
    text = cache.get(raw)
    if text is None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        if family == socket.AF_INET6:
            text = socket.inet_ntop(socket.AF_INET6, raw)
        else:
            text = socket.inet_ntop(socket.AF_INET, raw[:4])
        cache[raw] = text
    return text


def _comm(raw: bytes) -> str:
    text = _comm_cache.get(raw)
    if text is None:
        if len(_comm_cache) >= _CACHE_MAX:
            _comm_cache.clear()
        text = _comm_cache[raw] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return text


def decode(buf: bytes) -> dict:
    """Turn one raw tw_event into a flat dict with addresses and comm as str.

    Keys: kind, ts_ns, sk, prev_ns, cw_ns, fin_read_ns, laddr, raddr, pid, tid,
    actor_pid, actor_tid, netns, kstack_id, ustack_id, family (4 or 6), lport, rport,
    old, new, outcome, flags, comm, actor_comm.
    """
    unpack, names = _decoder()
    ev = dict(zip(names, unpack(buf)))
    del ev["pad"]
    fam = ev["family"]
    ev["family"] = 6 if fam == socket.AF_INET6 else 4
    ev["laddr"] = _addr(ev["laddr"], fam)
    ev["raddr"] = _addr(ev["raddr"], fam)
    ev["comm"] = _comm(ev["comm"])
    ev["actor_comm"] = _comm(ev["actor_comm"])
    return ev


def encode(ev: dict) -> bytes:
    """The inverse of decode(), for synthetic streams in tests and recorded fixtures."""
    lay = layout()
    fam = socket.AF_INET6 if ev.get("family", 4) == 6 else socket.AF_INET

    def pack_addr(a: str) -> bytes:
        return socket.inet_pton(fam, a).ljust(16, b"\0")

    raw = {
        "saddr": pack_addr(ev.get("laddr", "0.0.0.0" if fam == socket.AF_INET else "::")),
        "daddr": pack_addr(ev.get("raddr", "0.0.0.0" if fam == socket.AF_INET else "::")),
        "family": fam,
        "sport": ev.get("lport", 0),
        "dport": ev.get("rport", 0),
        "oldstate": ev.get("old", 0),
        "newstate": ev.get("new", 0),
        "comm": ev.get("comm", "").encode(),
        "actor_comm": ev.get("actor_comm", "").encode(),
        "pad": 0,
    }
    values = []
    for name in lay.names:
        if name in raw:
            values.append(raw[name])
        elif name in ("kstack_id", "ustack_id"):
            values.append(ev.get(name, -1))
        else:
            values.append(ev.get(name, 0))
    return lay.struct.pack(*values)


def state_name(num: int) -> str:
    return TCP_STATES.get(num, f"STATE_{num}")


# For other readers of kernel bytes (the `cw` map): the same cached conversions.
addr_text = _addr
comm_text = _comm


# The `exits` map's duration histogram (TW_EXIT_* in the header; exit_bucket() in the C).
def exit_bucket(ns: int) -> int:
    """The bucket of a CLOSE_WAIT stay of `ns` nanoseconds, as the kernel files it.

    >>> [exit_bucket(n << 10) for n in (0, 7, 8, 15, 16, 17, 18, 1 << 39, 1 << 41)]
    [0, 7, 8, 15, 16, 16, 17, 296, 303]
    """
    c = layout_of("tw_exit_agg").consts
    sub_bits, sub = c["TW_EXIT_SUB_BITS"], c["TW_EXIT_SUB"]
    v = max(0, ns) >> c["TW_EXIT_SHIFT"]
    if v < sub:
        return v
    if v >> c["TW_EXIT_MAX_LOG"]:
        return c["TW_EXIT_BUCKETS"] - 1
    log = v.bit_length() - 1
    return (log - sub_bits + 1) * sub + ((v >> (log - sub_bits)) & (sub - 1))


def exit_bucket_ns(bucket: int) -> int:
    """The middle of a bucket's range in nanoseconds: within 1/(2*TW_EXIT_SUB) of any stay
    filed there (below TW_EXIT_SUB units, within half a unit).

    >>> [exit_bucket_ns(b) for b in (0, 7, 16, 17)]
    [512, 7680, 17408, 19456]
    >>> all(exit_bucket(exit_bucket_ns(b)) == b for b in range(303))
    True
    """
    c = layout_of("tw_exit_agg").consts
    sub_bits, sub, unit = c["TW_EXIT_SUB_BITS"], c["TW_EXIT_SUB"], 1 << c["TW_EXIT_SHIFT"]
    if bucket < sub:
        return bucket * unit + unit // 2
    log, part = bucket // sub + sub_bits - 1, bucket % sub
    lo = (sub + part) << (log - sub_bits)
    width = 1 << (log - sub_bits)
    return (lo * 2 + width) * unit // 2

#!/usr/bin/env python3
"""How fast `tcpwatch analyze` is, against merely parsing every line with orjson.

Writes a synthetic log shaped like a busy host's (loopback connections: both ends' state
transitions, a `close_wait` record per server socket, 1 % of them leaking), then, in this
one process and on the same file (warm page cache), times:

  parse    for line in file: orjson.loads(line)
  analyze  the whole `tcpwatch analyze` pipeline (read, parse, analyse, render the text)

and prints both and the ratio analyze/parse (issue #5 asks for at most 1.5). Each is run
--repeat times, alternating, and the best time of each is kept.

    .venv/bin/python scripts/bench_analyze.py                  # 3,000,000 records
    .venv/bin/python scripts/bench_analyze.py --records 500000 --keep /tmp/big.ndjson
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import orjson

from tcpwatch.analyze import inputs, report
from tcpwatch.analyze.engine import Analyzer, Options
from tcpwatch.analyze.timeparse import stamp

T0 = 1_795_237_980.0  # 2026-11-21T05:13:00Z
SERVER_PORT = 8080
LEAK_EVERY = 100  # one server socket in 100 is never closed


def _sock(n: int, side: str) -> dict:
    client_port = 32768 + n % 28000
    if side == "server":
        ports = {"lport": SERVER_PORT, "rport": client_port}
    else:
        ports = {"lport": client_port, "rport": SERVER_PORT}
    return {
        "sk": f"{0xFFFF888100000000 + n * 2 + (side == 'client'):#x}",
        "family": "ipv4", "laddr": "127.0.0.1", "raddr": "127.0.0.1", **ports,
        "netns": 4026531840,
    }


def _state(ts: float, sock: dict, who: tuple, old: str, new: str, dur: float) -> dict:
    return {"event": "state", "ts": stamp(ts), **sock, "pid": who[0], "tid": who[0],
            "comm": who[1], "old": old, "new": new, "duration_s": round(dur, 6),
            "owner": "socket"}


def connection(n: int, t: float) -> list[dict]:
    """The records one loopback connection produces, server and client side."""
    srv, cli = _sock(n, "server"), _sock(n, "client")
    server, client = (812 + n % 8, "api"), (20000 + n % 50, "client")
    cw = 0.0005 + (n % 997) / 997 * 0.05
    out = [
        _state(t, cli, client, "CLOSE", "SYN_SENT", 0.0),
        _state(t + 0.0001, srv, server, "SYN_RECV", "ESTABLISHED", 0.0001),
        _state(t + 0.0001, cli, client, "SYN_SENT", "ESTABLISHED", 0.0001),
        _state(t + 0.01, cli, client, "ESTABLISHED", "FIN_WAIT1", 0.01),
        _state(t + 0.0101, srv, server, "ESTABLISHED", "CLOSE_WAIT", 0.01),
        _state(t + 0.0101, cli, client, "FIN_WAIT1", "FIN_WAIT2", 0.0001),
    ]
    if n % LEAK_EVERY == 0:
        out.append({"event": "leak", "ts": stamp(t + 30.0101), **srv, "pid": server[0],
                    "tid": None, "comm": server[1], "age_s": 30.0, "since": stamp(t + 0.0101),
                    "holders": [{"pid": server[0], "comm": server[1], "fd": 9}],
                    "owner_pid": server[0], "owner_comm": server[1], "rx_queue": 0,
                    "inode": 100000 + n, "eof_read": True, "preexisting": False})
        return out
    end = t + 0.0101 + cw
    out += [
        _state(end, srv, server, "CLOSE_WAIT", "LAST_ACK", cw),
        {"event": "close_wait", "ts": stamp(end), **srv, "pid": server[0], "tid": server[0],
         "comm": server[1], "duration_s": round(cw, 6), "since": stamp(t + 0.0101),
         "new": "LAST_ACK", "outcome": "closed", "closer_pid": server[0],
         "closer_tid": server[0], "closer_comm": server[1], "eof_read": True,
         "leaked": False, "preexisting": False},
        _state(end + 0.0001, cli, client, "FIN_WAIT2", "TIME_WAIT", cw),
        _state(end + 0.0001, srv, server, "LAST_ACK", "CLOSE", 0.0001),
    ]
    return out


def write_log(path: str, records: int) -> int:
    """A log of at least `records` records; returns how many."""
    dumps = orjson.dumps
    start = {"event": "start", "ts": stamp(T0), "v": 1, "version": "0.1.0", "hostname": "bench",
             "kernel": "6.18.0", "pid": 1, "hooks": {}, "leak_after_s": 30.0,
             "filters": {"pid": [], "port": [], "state": []}, "startup_s": 0.5, "warnings": []}
    written = 0
    with open(path, "wb", buffering=1 << 20) as f:
        f.write(dumps(start) + b"\n")
        written += 1
        n = 0
        while written < records:
            recs = connection(n, T0 + n * 0.001)
            f.write(b"".join(dumps(r) + b"\n" for r in recs))
            written += len(recs)
            n += 1
    return written


def time_parse(path: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to parse every line."""
    loads = orjson.loads
    c, w = time.process_time(), time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            loads(line)
    return time.process_time() - c, time.perf_counter() - w


def time_analyze(path: str) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, records) of a whole analysis, text report included."""
    c, w = time.process_time(), time.perf_counter()
    result = Analyzer(Options()).run([inputs.Source(path, path)])
    report.as_text(result)
    return time.process_time() - c, time.perf_counter() - w, result.records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=3_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", metavar="PATH", help="write the log here and keep it")
    args = ap.parse_args()
    path = args.keep or os.path.join(tempfile.mkdtemp(prefix="tcpwatch-bench-"), "big.ndjson")
    t = time.perf_counter()
    n = write_log(path, args.records)
    size = os.path.getsize(path)
    print(f"log: {path}: {n} records, {size / 1e6:.0f} MB, written in "
          f"{time.perf_counter() - t:.1f}s", file=sys.stderr)
    parse, analyze = [], []
    for _ in range(args.repeat):
        parse.append(time_parse(path))
        cpu, wall, records = time_analyze(path)
        analyze.append((cpu, wall))
        assert records == n, (records, n)
    # CPU time is the measure (other work on the machine inflates wall time unevenly);
    # wall time is shown too.
    pc, pw = min(c for c, _ in parse), min(w for _, w in parse)
    ac, aw = min(c for c, _ in analyze), min(w for _, w in analyze)
    print(f"parse only (orjson):  {pc:.2f}s CPU ({pw:.2f}s wall)  {n / pc / 1e6:.2f} M records/s")
    print(f"tcpwatch analyze:     {ac:.2f}s CPU ({aw:.2f}s wall)  {n / ac / 1e6:.2f} M records/s")
    print(f"ratio analyze/parse:  {ac / pc:.2f} CPU, {aw / pw:.2f} wall  (target <= 1.5)")
    if not args.keep:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


if __name__ == "__main__":
    main()

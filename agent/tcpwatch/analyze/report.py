"""An analysis `Result` as terminal text (at most 100 columns) or as one JSON document.

>>> human(0.000512), human(0.0123), human(4.5), human(754), human(7384), human(200000)
('512us', '12.3ms', '4.50s', '12m34s', '2h03m', '2d07h')
>>> bar(5, 10, 8)
'####'
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from tcpwatch.analyze.engine import Group, Result, group_name
from tcpwatch.analyze.timeparse import stamp

WIDTH = 100
TIMELINE_ROWS = 24


def human(seconds: float | None) -> str:
    """A duration in at most 6 characters."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def bar(value: int, top: int, width: int) -> str:
    """A bar of '#' scaled so that `top` fills `width` (any value > 0 shows at least one)."""
    if value <= 0 or top <= 0:
        return ""
    return "#" * max(1, round(value * width / top))


def _clip(text: Any, width: int) -> str:
    s = "?" if text is None else str(text)
    s = "".join(c if c.isprintable() else "?" for c in s)  # a comm may hold anything
    return s if len(s) <= width else s[: width - 1] + "~"


def _endpoint(addr: Any, port: Any) -> str:
    a = "?" if addr is None else str(addr)
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


# ------------------------------------------------------------------------------------- text


def as_text(r: Result, limit: int = 10) -> str:
    out: list[str] = []
    _header(r, out)
    _open_leaks(r, out, limit)
    for title, kind, table in (
        ("BY PROCESS", "process", r.by_process),
        ("BY REMOTE ENDPOINT", "remote", r.by_remote),
        ("BY LOCAL PORT", "local", r.by_local_port),
    ):
        _group_table(title, _named(kind, table), out, limit)
    _outcomes(r, out)
    _histogram(r, out)
    _timeline(r, out)
    _transitions(r, out, limit)
    return "\n".join(out) + "\n"


def _header(r: Result, out: list[str]) -> None:
    span = ""
    if r.first_ts and r.end is not None:
        from tcpwatch.analyze.timeparse import epoch

        span = f", {r.first_ts[:19]}Z .. {stamp(r.end)[:19]}Z ({human(r.end - epoch(r.first_ts))})"
    files = f"{len(r.files)} file{'s' if len(r.files) != 1 else ''}"
    out.append(f"tcpwatch analyze: {files}, {r.records} records{span}")
    for s in r.sessions[:5]:
        out.append(
            f"  run: {s.get('hostname')} pid {s.get('pid')}, tcpwatch {s.get('version')}, "
            f"kernel {s.get('kernel')}, started {s.get('ts')}"
        )
    if len(r.sessions) > 5:
        out.append(f"  ... {len(r.sessions) - 5} more runs")
    health = f"  leak after {human(r.leak_after_s)}; lost kernel events: {r.lost}"
    if r.unwritten:
        health += f"; records the tracer could not write: {r.unwritten}"
    if r.corrupt:
        health += f"; corrupt lines: {r.corrupt}"
    out.append(health)
    t = r.totals
    out.append(
        f"  sockets in CLOSE_WAIT: {t['cw']} ({t['closed']} closed, {t['open']} still open, "
        f"{t['leaks']} leaks)"
        + (f"; {t['untracked']} lost track of" if t["untracked"] else "")
    )


def _open_leaks(r: Result, out: list[str], limit: int) -> None:
    leaks = [o for o in r.open if o["leaked"]]
    end = stamp(r.end)[:19] + "Z" if r.end is not None else "the end"
    out.append("")
    out.append(f"LEAKS STILL OPEN at {end}: {len(leaks)} (of {len(r.open)} sockets in CLOSE_WAIT)")
    if not leaks:
        return
    out.append(
        f"{'AGE':>7} {'PID':>7} {'COMM':<15} {'LOCAL':<22} {'REMOTE':<22} {'RXQ':>5} EOF CAUSE"
    )
    for o in leaks[:limit]:
        age = (">" if o["at_least"] else "") + human(o["age_s"])
        out.append(
            f"{age:>7} {_clip(o['pid'], 7):>7} {_clip(o['comm'], 15):<15} "
            f"{_clip(_endpoint(o['laddr'], o['lport']), 22):<22} "
            f"{_clip(_endpoint(o['raddr'], o['rport']), 22):<22} "
            f"{_clip(o['rx_queue'] if o['rx_queue'] is not None else '-', 5):>5} "
            f"{'yes' if o['eof_read'] else 'no ':<3} {_clip(o['cause'] or '-', 12)}"
        )
        holders = [h for h in o["holders"] if h.get("pid") != o["pid"]]
        if holders:
            out.append("        also held by " + ", ".join(
                f"{_clip(h.get('comm'), 15)}[{h.get('pid')}]" for h in holders[:5]))
        for name in ("ustack", "kstack"):
            for frame in (o.get(name) or [])[:8]:
                out.append(f"        {name[0]} {_clip(frame, WIDTH - 10)}")
    if len(leaks) > limit:
        out.append(f"  ... {len(leaks) - limit} more (--limit, or --format json for all)")


def _group_table(title: str, table: dict[str, Group], out: list[str], limit: int) -> None:
    out.append("")
    out.append(f"{title} (top {min(limit, len(table))} of {len(table)} by leaks, then count)")
    if not table:
        return
    out.append(
        f"{'':<30} {'CW':>7} {'LEAKS':>6} {'OPEN':>6} {'P50':>7} {'P90':>7} {'P99':>7} {'MAX':>7}"
    )
    rows = sorted(table.items(), key=lambda kv: (-kv[1].leaks, -kv[1].cw, kv[0]))
    for key, g in rows[:limit]:
        d = g.durations
        out.append(
            f"{_clip(key, 30):<30} {g.cw:>7} {g.leaks:>6} {g.open:>6} "
            f"{human(d.quantile(0.5)):>7} {human(d.quantile(0.9)):>7} "
            f"{human(d.quantile(0.99)):>7} {human(d.max if d.n else None):>7}"
        )


def _outcomes(r: Result, out: list[str]) -> None:
    if not r.outcomes:
        return
    parts = [f"{k} {v}" for k, v in sorted(r.outcomes.items(), key=lambda kv: -kv[1])]
    out.append("")
    out.append("HOW SOCKETS LEFT CLOSE_WAIT: " + ", ".join(parts))


def _histogram(r: Result, out: list[str]) -> None:
    d = r.durations
    out.append("")
    out.append(
        f"TIME IN CLOSE_WAIT (n={d.n}; p50 {human(d.quantile(0.5))}, p99 "
        f"{human(d.quantile(0.99))}, max {human(d.max if d.n else None)}; sockets that left it)"
    )
    buckets = d.log2_buckets()
    top = max((c for _, _, c in buckets), default=0)
    for low, high, count in buckets:
        label = f"{human(low) if low else '0'} .. {human(high)}"
        out.append(f"{label:>17} |{bar(count, top, 60):<60} {count}")


def _timeline(r: Result, out: list[str]) -> None:
    tl = r.timeline
    if tl is None or not tl.bins:
        return
    bins = tl.bins
    group = max(1, math.ceil(len(bins) / TIMELINE_ROWS))
    rows = [max(bins[i : i + group]) for i in range(0, len(bins), group)]
    width = tl.bin_s * group
    top = max(rows)
    out.append("")
    out.append(f"SOCKETS IN CLOSE_WAIT OVER TIME (most at once per {human(width)}; peak {top})")
    for i, value in enumerate(rows):
        at = stamp(tl.start + i * width)
        out.append(f"{at[:10]} {at[11:19]} |{bar(value, top, 60):<60} {value}")


def _transitions(r: Result, out: list[str], limit: int) -> None:
    if not r.transitions:
        return
    rows = sorted(((f"{o}>{n}", c) for (o, n), c in r.transitions.items()),
                  key=lambda kv: (-kv[1], kv[0]))
    out.append("")
    out.append(f"STATE TRANSITIONS (top {min(limit, len(rows))} of {len(rows)})")
    for key, count in rows[:limit]:
        out.append(f"  {key:<40} {count:>10}")


# ------------------------------------------------------------------------------------- JSON


def as_dict(r: Result) -> dict[str, Any]:
    """The Result as plain data: what `--format json` prints."""
    d = r.durations
    tl = r.timeline
    return {
        "input": {
            "files": r.files,
            "records": r.records,
            "corrupt": r.corrupt,
            "corrupt_examples": r.corrupt_examples,
            "notes": r.notes,
        },
        "runs": r.sessions,
        "first_ts": r.first_ts,
        "end_ts": stamp(r.end) if r.end is not None else None,
        "leak_after_s": r.leak_after_s,
        "lost": r.lost,
        "unwritten": r.unwritten,
        "totals": r.totals,
        "outcomes": r.outcomes,
        "open": r.open,
        "by_process": _groups(_named("process", r.by_process)),
        "by_remote": _groups(_named("remote", r.by_remote)),
        "by_local_port": _groups(_named("local", r.by_local_port)),
        "durations": {
            "n": d.n,
            "p50_s": _r(d.quantile(0.5)),
            "p90_s": _r(d.quantile(0.9)),
            "p99_s": _r(d.quantile(0.99)),
            "max_s": _r(d.max) if d.n else None,
            "log2_buckets": [
                {"ge_s": _r(lo), "lt_s": _r(hi), "count": c} for lo, hi, c in d.log2_buckets()
            ],
        },
        "timeline": None if tl is None else {
            "start": stamp(tl.start), "bin_s": tl.bin_s, "max_in_close_wait": tl.bins,
        },
        "transitions": dict(sorted((f"{o}>{n}", c) for (o, n), c in r.transitions.items())),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _named(kind: str, table: dict) -> dict[str, Group]:
    return {group_name(kind, k): g for k, g in table.items()}


def _groups(table: dict[str, Group]) -> list[dict]:
    rows = sorted(table.items(), key=lambda kv: (-kv[1].leaks, -kv[1].cw, kv[0]))
    return [{"key": k, **g.as_dict()} for k, g in rows]


def as_json(r: Result) -> bytes:
    return orjson.dumps(as_dict(r), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

"""Drawing a top frame: model rows + header figures -> rich renderables, plain text, JSON.

One `render()` builds the frame for every output: the live view (fixed terminal size, rows cut
to fit, key help at the bottom) and `--once` (every row, no help). Colour is used only where it
carries meaning: leaks and stuck causes in red, a port range filling up in yellow/red, lost
events in red, snapshot mode in yellow.

>>> from tcpwatch.top.model import Host, Sample
>>> frame = render(Sample("kernel", 10.0, Host(hostname="web-1")), [], "process", "count",
...                width=60)
>>> print(plain(frame, width=60).rstrip())  # doctest: +NORMALIZE_WHITESPACE
tcpwatch top  web-1  kernel  by process  sort count  10s
tcp  -
ports - ephemeral   events -/s   lost -
hooks -
causes from -
GROUP           CW OLDEST LEAKS NEW/s    P99 CAUSE
(no socket in CLOSE_WAIT)
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tcpwatch.sinks.table import clean, human_secs
from tcpwatch.top.model import Row, Sample

SHORT_STATES = {
    "ESTABLISHED": "EST", "SYN_SENT": "SYN_S", "SYN_RECV": "SYN_R", "FIN_WAIT1": "FW1",
    "FIN_WAIT2": "FW2", "TIME_WAIT": "TW", "CLOSE": "CLOSE", "CLOSE_WAIT": "CW",
    "LAST_ACK": "LA", "LISTEN": "LISTEN", "CLOSING": "CLOSING", "NEW_SYN_RECV": "NSR",
}
STUCK_STYLE = {"not_accepted": "red", "held_elsewhere": "red", "eof_ignored": "red",
               "not_reading": "red", "slow_close": "yellow"}
KEYS_HELP = "g/1-4 group  s sort  q quit"
# Fixed widths of the numeric columns; GROUP takes what is left (at least MIN_GROUP).
COLUMNS = [("CW", 5), ("OLDEST", 6), ("LEAKS", 5), ("NEW/s", 5), ("P50", 6), ("P99", 6),
           ("UNREAD", 6), ("CAUSE", 14)]
MIN_GROUP = 12
PORT_SHOW = 0.05  # a destination holding under 5% of the range is no news on screen
GIVE_WAY = ("P50", "UNREAD", "NEW/s", "P99")


def fmt_secs(x: float | None) -> str:
    return "-" if x is None else human_secs(x)


def fmt_bytes(n: int) -> str:
    """Bytes in at most 6 characters: 512, 1.2K, 34M.

    >>> fmt_bytes(0), fmt_bytes(512), fmt_bytes(1234), fmt_bytes(35_000_000)
    ('0', '512', '1.2K', '33M')
    """
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 10 else f"{int(v)}{unit}"
    return str(n)


def fmt_rate(x: float) -> str:
    """New sockets per second, short.

    >>> fmt_rate(0.0), fmt_rate(0.25), fmt_rate(12.5), fmt_rate(1234.0)
    ('0', '0.25', '12.5', '1234')
    """
    if x == 0:
        return "0"
    if x < 1:
        return f"{x:.2f}"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _header(sample: Sample, by: str, sort: str) -> list[Text]:
    h = sample.host
    title = Text(f"tcpwatch top  {clean(h.hostname)}  {sample.mode}  by {by}  sort {sort}  "
                 f"{round(sample.window_s, 1):g}s")  # the window covered so far
    if sample.ts:
        title.append(f"  {sample.ts[11:19]}Z")
    lines = [title]
    if sample.mode == "snapshot":
        lines.append(Text("SNAPSHOT MODE (no root): /proc only, ages from first sight, "
                          "owners where visible", style="yellow"))
    if sample.mode == "replay":
        lines.append(Text(f"REPLAY of a log at {sample.ts}: ages as of then; '-' is not in "
                          "the log", style="yellow"))
    states = "  ".join(f"{SHORT_STATES.get(k, k)} {v}" for k, v in h.states.items())
    lines.append(Text(f"tcp  {states or '-'}"))
    lo, hi = h.port_range
    size = hi - lo + 1
    if h.ephemeral_used is None:  # not measured (a replayed log): not even the range
        line = Text("ports - ephemeral   events ")
    else:
        pct = f" ({100 * h.ephemeral_used // size}%)"
        line = Text(f"ports {h.ephemeral_used}/{size}{pct} ephemeral   events ")
    line.append("-" if h.events_per_s is None else f"{h.events_per_s:g}")
    line.append("/s   lost ")
    line.append("-" if h.lost is None else str(h.lost), style="red" if h.lost else "")
    lines.append(line)
    # Hook kinds only ("state owner outcome netns"): the full names are in the JSON frame.
    lines.append(Text("hooks " + (" ".join(k.split(":", 1)[0] for k in h.hooks) or "-")))
    # The source of each signal, e.g. "/proc inode": the JSON frame has the long names.
    lines.append(Text("causes from " + (", ".join(_short(x) for x in h.signals) or "-")))
    for w in h.warnings:
        lines.append(Text("warning: " + clean(w), style="yellow"))
    for r in h.port_risk:
        if r.level != "ok":
            lines.append(Text(
                f"PORTS {r.level}: {r.laddr} -> {r.remote} holds {r.held}/{r.usable} local "
                f"ports ({100 * r.fraction:.0f}%)", style="red" if r.level == "critical" else
                "yellow"))
    for line in lines:
        line.no_wrap, line.overflow = True, "ellipsis"
    return lines


def _short(signal: str) -> str:
    """'accept queue (/proc inode)' -> '/proc inode'."""
    return signal[signal.find("(") + 1 : -1] if signal.endswith(")") else signal


def _table(rows: list[Row], width: int, limit: int | None) -> Table:
    cols = list(COLUMNS)
    # On narrow terminals columns give way in this order (P99 says more than P50 about stuck
    # sockets; counts, ages and causes are what the view is for).
    for name in GIVE_WAY:
        if width - sum(w + 1 for _, w in cols) - 1 >= MIN_GROUP:
            break
        cols = [c for c in cols if c[0] != name]
    group_w = max(MIN_GROUP, width - sum(w + 1 for _, w in cols) - 1)
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, pad_edge=False,
                  header_style="bold", collapse_padding=True)
    table.add_column("GROUP", width=group_w, no_wrap=True, overflow="ellipsis")
    for name, w in cols:
        table.add_column(name, width=w, no_wrap=True, overflow="ellipsis",
                         justify="left" if name == "CAUSE" else "right")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        cells = {
            "CW": str(r.close_wait), "OLDEST": fmt_secs(r.oldest_age_s),
            "LEAKS": Text(str(r.leaks), style="red" if r.leaks else ""),
            "NEW/s": fmt_rate(r.new_per_s), "P50": fmt_secs(r.p50_s), "P99": fmt_secs(r.p99_s),
            "UNREAD": fmt_bytes(r.unread_bytes),
            "CAUSE": Text(r.cause or "-", style=STUCK_STYLE.get(r.cause or "", "")),
        }
        table.add_row(clean(r.group), *[cells[name] for name, _ in cols])
    if limit is not None and len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} more", *[""] * len(cols))
    return table


def _sections(sample: Sample) -> list[Text]:
    """FIN_WAIT2 per remote endpoint, and local ports per destination, one line each."""
    h = sample.host
    out: list[Text] = []
    if h.fin_wait2:
        out.append(Text("FIN_WAIT2 by remote (peer not closing: it may be the one leaking)",
                        style="bold"))
        for p in h.fin_wait2:
            out.append(Text(f"  {p.remote:<40} {p.count:>6}  oldest {human_secs(p.oldest_s)}"))
    risky = [r for r in h.port_risk if r.fraction >= PORT_SHOW]
    if risky:
        out.append(Text("local ports per destination (ESTAB+CW+TW+...)", style="bold"))
        for r in risky:
            style = {"critical": "red", "warn": "yellow"}.get(r.level, "")
            out.append(Text(f"  {r.laddr} -> {r.remote}"[:48].ljust(48)
                            + f" {r.held:>6}/{r.usable} {100 * r.fraction:3.0f}%", style=style))
    for line in out:
        line.no_wrap, line.overflow = True, "ellipsis"
    return out


def render(sample: Sample, rows: list[Row], by: str, sort: str, *, width: int = 100,
           height: int | None = None, keys_help: bool = False) -> RenderableType:
    """The whole frame. With `height`, rows are cut (with "... N more") and the FIN_WAIT2 and
    port sections dropped so that it fits; without, everything is shown."""
    head = _header(sample, by, sort)
    extra = _sections(sample)
    footer = [Text(KEYS_HELP, style="dim")] if keys_help else []
    limit = None
    if height is not None:
        # 1: the table's header line (or the "no socket" line that replaces the rows)
        room = height - len(head) - 1 - len(footer) - (0 if rows else 1)
        if len(rows) + len(extra) <= room:
            pass
        elif len(rows) + 1 + 3 <= room and extra:  # keep a cut-down FIN_WAIT2/ports view
            extra = extra[: room - len(rows)]
        else:
            extra = []
            limit = max(1, room - 1) if len(rows) > room else None
    empty = [] if rows else [Text("(no socket in CLOSE_WAIT)")]
    parts: list[RenderableType] = [*head, _table(rows, width, limit), *empty, *extra, *footer]
    return Group(*parts)


def plain(renderable: RenderableType, width: int = 100, color: bool = False) -> str:
    """A renderable as text (no escape codes unless color), as printed by `--once`."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system="standard" if color else None,
                      force_terminal=color, legacy_windows=False, highlight=False,
                      emoji=False, markup=False)
    console.print(renderable)
    # rich pads every line to the full width: nobody wants those spaces in a file or a pipe.
    return "\n".join(line.rstrip() for line in buf.getvalue().split("\n"))


def frame_json(sample: Sample, rows: list[Row], by: str, sort: str, interval_s: float) -> dict:
    """The `--format json` object: header figures and the `rows` list (docs/top.md)."""
    h = sample.host
    lo, hi = h.port_range
    return {
        "ts": sample.ts or None,
        "mode": sample.mode,
        "hostname": h.hostname,
        "by": by,
        "sort": sort,
        "interval_s": interval_s,
        "window_s": sample.window_s,
        "states": h.states,
        "ephemeral": {"used": h.ephemeral_used, "low": lo, "high": hi, "size": hi - lo + 1},
        "events_per_s": h.events_per_s,
        "lost": h.lost,
        "hooks": h.hooks,
        "signals": h.signals,
        "warnings": h.warnings,
        "rows": [asdict(r) for r in rows],
        "fin_wait2": [asdict(p) for p in h.fin_wait2],
        "port_risk": [dict(asdict(r), fraction=round(r.fraction, 4), level=r.level)
                      for r in h.port_risk],
    }


def utc_now() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())

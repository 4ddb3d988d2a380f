"""Times for `analyze`: record timestamps and --since/--until arguments, as epoch seconds.

Record timestamps are RFC 3339 UTC with microseconds ("2026-11-21T05:13:00.123456Z",
docs/ndjson.md), so they order as strings; they are turned into numbers only where
durations or the timeline need them, with the calendar part cached per second.

>>> epoch("2026-11-21T05:13:00.250000Z")
1795237980.25
>>> parse_when("2026-11-21T05:13:00Z", now=0.0), parse_when("1h", now=7200.0)
(1795237980.0, 3600.0)
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import datetime, timezone

_cache: dict[str, int] = {}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def epoch(ts: str) -> float:
    """"2026-11-21T05:13:00.123456Z" -> 1795237980.123456; ValueError if not RFC 3339 UTC."""
    head = ts[:19]
    base = _cache.get(head)
    if base is None:
        base = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
        if len(_cache) > 4096:
            _cache.clear()
        _cache[head] = base
    frac = ts[19:-1] if ts.endswith("Z") else ts[19:]
    return base + float(frac) if frac else float(base)


def stamp(seconds: float) -> str:
    """Epoch seconds -> the records' timestamp format (for comparing as strings).

    >>> stamp(1795237980.25)
    '2026-11-21T05:13:00.250000Z'
    """
    whole = int(seconds // 1)
    micros = int(round((seconds - whole) * 1e6))
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def parse_when(text: str, now: float | None = None) -> float:
    """--since/--until: RFC 3339 (a missing offset means UTC), a date, or an age before now
    ("30m", "1h", "2d"). Raises ValueError with a message for the user.

    >>> parse_when("2026-11-21 05:13", now=0.0), parse_when("90s", now=100.0)
    (1795237980.0, 10.0)
    """
    text = text.strip()
    rel = _RELATIVE.match(text)
    if rel:
        ago = float(rel.group(1)) * _UNITS[rel.group(2)]
        return (time.time() if now is None else now) - ago
    iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use RFC 3339 (2026-11-21T05:13:00Z) or an age such as "
            "30m, 1h, 2d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()

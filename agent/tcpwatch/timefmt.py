"""Timestamps for records: RFC 3339 in UTC with microseconds.

Called once per event (tens of thousands of times a second), so the expensive part,
turning whole seconds into a calendar date, is done once per second and cached.

>>> rfc3339(1_795_237_980_123_456_789)
'2026-11-21T05:13:00.123456Z'
"""

from __future__ import annotations

import time

# (epoch second, "YYYY-MM-DDTHH:MM:SS") of the last call. One tuple, replaced whole, so a
# reader on another thread never sees a second paired with another second's text.
_last: tuple[int, str] = (-1, "")


def rfc3339(wall_ns: int) -> str:
    """Wall-clock nanoseconds since the epoch -> "2026-11-21T05:13:00.123456Z".

    Sub-microsecond digits are truncated, not rounded, so a time never moves into the next
    second (or day) when printed.

    >>> rfc3339(1_795_237_980_000_000_999)
    '2026-11-21T05:13:00.000000Z'
    """
    global _last
    sec, ns = divmod(wall_ns, 1_000_000_000)
    cached_sec, prefix = _last
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _last = (sec, prefix)
    return f"{prefix}.{ns // 1000:06d}Z"

"""`analyze --plot FILE.png|.svg`: the duration histogram and the timeline as a picture.

Optional: needs matplotlib (`pip install 'tcpwatch[plot]'`); without it --plot fails with
one line before any log is read, and the rest of tcpwatch does not care.

>>> check("out.pdf")                                                  # doctest: +SKIP
Fatal: --plot writes .png or .svg, not 'out.pdf'
"""

from __future__ import annotations

import os

from tcpwatch.analyze.engine import Result
from tcpwatch.cli import Fatal

FORMATS = (".png", ".svg")


def check(path: str) -> None:
    """Fail early (one line) when `path` cannot be drawn: wrong suffix, no matplotlib."""
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise Fatal(f"--plot writes .png or .svg, not {path!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Fatal(
            "--plot needs matplotlib: pip install 'tcpwatch[plot]' (or python3-matplotlib)"
        ) from None


def draw(result: Result, path: str) -> None:
    """Two panels: sockets leaving CLOSE_WAIT per log2 duration bucket; sockets in
    CLOSE_WAIT over time (the most at once per bin)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from datetime import datetime, timezone

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from tcpwatch.analyze.report import human

    fig, (hist, line) = plt.subplots(2, 1, figsize=(10, 7), constrained_layout=True)
    buckets = result.durations.log2_buckets()
    labels = [f"{human(lo) if lo else '0'}-{human(hi)}" for lo, hi, _ in buckets]
    hist.bar(range(len(buckets)), [c for _, _, c in buckets], color="#4477aa")
    hist.set_xticks(range(len(buckets)), labels, rotation=45, ha="right", fontsize=8)
    hist.set_ylabel("sockets")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 2.5 sockets
    hist.set_title(f"Time in CLOSE_WAIT (n={result.durations.n}, log2 buckets)")
    tl = result.timeline
    if tl is not None and tl.bins:
        times = [datetime.fromtimestamp(tl.start + i * tl.bin_s, tz=timezone.utc)
                 for i in range(len(tl.bins))]
        line.step(times, tl.bins, where="post", color="#cc3311")
    locator = mdates.AutoDateLocator()
    line.xaxis.set_major_locator(locator)
    line.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # not "57:14.000000"
    line.yaxis.set_major_locator(MaxNLocator(integer=True))
    line.set_ylabel("in CLOSE_WAIT (max per bin)")
    line.set_xlabel("time (UTC)")
    line.set_title("Sockets in CLOSE_WAIT over time")
    try:
        fig.savefig(path)
    except OSError as exc:
        raise Fatal(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)

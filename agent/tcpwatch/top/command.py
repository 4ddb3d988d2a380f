"""`tcpwatch top`: the click command, its one-shot mode and its live loop.

The loop only pumps the collector, reads keys and asks the view for a frame; collecting
(collect.py), grouping (model.py) and drawing (view.py) live apart.

\b
  sudo tcpwatch top                        # live, grouped by process
  sudo tcpwatch top --by remote --port 5432
  tcpwatch top --once --interval 5 --format json | jq '.rows[0]'
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Iterator

import click

from tcpwatch.classify import SLOW_CLOSE_S
from tcpwatch.cli import CONTEXT, DEFAULT_LEAK_AFTER_S, pid_port_options
from tcpwatch.top.model import GROUPINGS, SORTS, build_rows, filter_sample, keep_only

WINDOW_S = 10.0  # live view: rates and percentiles over the last 10 s


@click.command(context_settings=CONTEXT)
@click.option("--once", is_flag=True, help="Collect for one interval, print one frame, exit.")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
    metavar="SECONDS", help="Live: time between samples. --once: how long to collect.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="With --once: a plain text frame, or one JSON object.",
)
@click.option("--by", type=click.Choice(GROUPINGS), default="process", show_default=True,
              help="Group rows by process, remote endpoint, local port or cgroup.")
@click.option("--sort", type=click.Choice(SORTS), default="count", show_default=True,
              help="Order of the rows, biggest first.")
@pid_port_options
@click.option(
    "--leak-after", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LEAK_AFTER_S,
    show_default=True, metavar="SECONDS", help="CLOSE_WAIT age that counts as a leak.",
)
@click.option(
    "--slow-close", type=click.FloatRange(min=0), default=SLOW_CLOSE_S, show_default=True,
    metavar="SECONDS", help="A close() later than this after the FIN is a slow_close.",
)
@click.option(
    "--window", type=click.FloatRange(min=1), default=WINDOW_S, show_default=True,
    metavar="SECONDS", help="Live: rates and percentiles over this many seconds.",
)
@click.option("--snapshot", "force_snapshot", is_flag=True,
              help="Use /proc snapshots even as root (what non-root users get).")
def top(once, interval, fmt, by, sort, pids, ports, leak_after, slow_close, window,
        force_snapshot) -> None:
    """Live CLOSE_WAIT leaderboard: who holds them, how old, how fast, and why.

    As root the kernel programs watch every CLOSE_WAIT entry and exit; without root top falls
    back to /proc snapshots (ages from first sight, owners only where visible).
    Keys: g (or 1-4) grouping, s sort, q quit.

    \b
    Examples:
      sudo tcpwatch top
      sudo tcpwatch top --by remote --port 5432
      sudo tcpwatch top --once --interval 5 --format json
      tcpwatch top --once            # without root: snapshot mode
    """
    if fmt == "json" and not once:
        raise click.UsageError("--format json needs --once")
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda *_: stop.append(1))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    # --once: everything since the baseline sample counts (the window is the collection).
    window_s = float("inf") if once else window
    collector = open_collector(window_s, ports, leak_after, slow_close, force_snapshot)
    keep = keep_only(pids, ports)
    try:
        if once:
            run_once(collector, keep, interval, fmt, by, sort, stop)
        else:
            run_live(collector, keep, interval, by, sort, stop)
    finally:
        collector.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def open_collector(window_s: float, ports: tuple[int, ...], leak_after: float,
                   slow_close: float, force_snapshot: bool):
    """KernelCollector as root when the kernel programs load; else SnapshotCollector with the
    reason as a warning (never an error: top must work for anyone who can read /proc)."""
    from tcpwatch.top.collect import KernelCollector, SnapshotCollector

    def snapshot(why: str) -> SnapshotCollector:
        return SnapshotCollector(window_s, ports, leak_after, [why])

    if force_snapshot:
        return snapshot("snapshot mode requested (--snapshot)")
    if os.geteuid() != 0:
        return snapshot("not root: kernel programs not loaded (run with sudo for live causes)")
    from tcpwatch import loader, schema

    try:
        warnings = loader.preflight()
        source = loader.KernelSource(loader.Options(states=(schema.CLOSE_WAIT,),
                                                    ports=tuple(ports)))
        opened = source.open()
    except loader.LoaderError as exc:
        return snapshot(f"kernel programs unavailable: {exc}")
    collector = KernelCollector(
        source, opened.hooks, window_s, ports, leak_after, slow_close,
        warnings + opened.warnings, mono_to_wall_ns=loader.mono_to_wall_ns(),
    )
    try:
        collector.seed()
    except BaseException:
        collector.close()
        raise
    return collector


def run_once(collector, keep, interval: float, fmt: str, by: str, sort: str,
             stop: list) -> None:
    """Collect for `interval` seconds, then print one frame (text or JSON) on stdout."""
    import orjson

    from tcpwatch.top import view

    collector.sample()  # the baseline: first-sight times, event counters
    # Scripts and tests may start their workload once this line is out.
    click.echo(f"tcpwatch top: collecting for {interval:g}s ({collector.mode} mode)", err=True)
    deadline = time.monotonic() + interval
    while not stop:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        collector.pump(min(left, 0.1))
    collector.pump(0)
    sample = filter_sample(collector.sample(), keep)
    rows = build_rows(sample, by, sort)
    if fmt == "json":
        sys.stdout.buffer.write(orjson.dumps(view.frame_json(sample, rows, by, sort, interval),
                                             option=orjson.OPT_APPEND_NEWLINE))
        sys.stdout.flush()
        return
    tty = sys.stdout.isatty()
    width = shutil.get_terminal_size().columns if tty else 100
    sys.stdout.write(view.plain(view.render(sample, rows, by, sort, width=width), width, tty))
    sys.stdout.flush()


class Keys:
    """Single key presses from a terminal (cbreak mode), restored on exit; none if stdin is
    not a terminal.

    >>> with Keys(sys.stdin) as keys: keys.read()   # doctest: +SKIP
    ['g']
    """

    def __init__(self, stream) -> None:
        self.fd = stream.fileno() if stream.isatty() else None
        self._saved = None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)  # keys arrive at once, unechoed; Ctrl-C still signals
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self) -> Iterator[str]:
        while self.fd is not None and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                return
            yield from data.decode(errors="replace")


def _next(options: tuple, current: str) -> str:
    return options[(options.index(current) + 1) % len(options)]


def run_live(collector, keep, interval: float, by: str, sort: str, stop: list) -> None:
    """Full-screen view: sample every `interval`, redraw at least once a second, keys."""
    from rich.console import Console
    from rich.live import Live

    from tcpwatch.top import view

    console = Console(highlight=False, emoji=False, markup=False)
    sample = filter_sample(collector.sample(), keep)
    next_sample = time.monotonic() + interval
    next_draw = 0.0
    with Keys(sys.stdin) as keys, Live(console=console, screen=True, auto_refresh=False,
                                       redirect_stdout=False, redirect_stderr=False) as live:
        while not stop:
            dirty = False
            for key in keys.read():
                if key in ("q", "Q"):
                    return
                if key == "g":
                    by = _next(GROUPINGS, by)
                elif key in "1234" and key:
                    by = GROUPINGS[int(key) - 1]
                elif key == "s":
                    sort = _next(SORTS, sort)
                else:
                    continue
                dirty = True
            now = time.monotonic()
            if now >= next_sample:
                sample = filter_sample(collector.sample(), keep)
                next_sample = now + interval
                dirty = True
            if dirty or now >= next_draw:
                width, height = console.size
                frame = view.render(sample, build_rows(sample, by, sort), by, sort,
                                    width=width, height=height, keys_help=True)
                live.update(frame, refresh=True)
                next_draw = now + 1.0
            collector.pump(0.1, wake_fd=keys.fd)




__all__ = ["top"]

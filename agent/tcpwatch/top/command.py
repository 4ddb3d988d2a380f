"""`tcpwatch top`: the click command, its one-shot mode and its live loop.

The loop only pumps the collector, reads keys and asks the view for a frame; collecting
(collect.py), grouping (model.py) and drawing (view.py) live apart.

\b
  sudo tcpwatch top                        # live, grouped by process
  sudo tcpwatch top --by remote --port 5432
  tcpwatch top --once --interval 5 --format json | jq '.rows[0]'
  tcpwatch top --replay '/var/log/tcpwatch.ndjson*' --at 2026-11-21T05:13:00Z
"""

from __future__ import annotations

import mmap
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Iterator

import click

from tcpwatch.classify import SLOW_CLOSE_S
from tcpwatch.cli import (
    CONTEXT,
    DEFAULT_LEAK_AFTER_S,
    Fatal,
    large_blocks_mapped,
    pid_port_options,
)
from tcpwatch.top.model import GROUPINGS, SORTS, build_rows, filter_sample, keep_only

WINDOW_S = 10.0  # live view: rates and percentiles over the last 10 s


def _at(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from tcpwatch.top.replay import parse_at

    try:
        return parse_at(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command(context_settings=CONTEXT)
@click.argument("logs", nargs=-1, metavar="[LOG...]")
@click.option("--once", is_flag=True, help="Collect for one interval, print one frame, exit.")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
    metavar="SECONDS", help="Live: time between samples. --once: how long to collect.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="With --once or --replay: a plain text frame, or one JSON object.",
)
@click.option("--by", type=click.Choice(GROUPINGS), default="process", show_default=True,
              help="Group rows by process, remote endpoint, local port or cgroup.")
@click.option("--sort", type=click.Choice(SORTS), default="count", show_default=True,
              help="Order of the rows, biggest first.")
@pid_port_options
@click.option(
    "--leak-after", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LEAK_AFTER_S,
    show_default=True, metavar="SECONDS",
    help="CLOSE_WAIT age that counts as a leak (--replay: by default the log's own).",
)
@click.option(
    "--slow-close", type=click.FloatRange(min=0), default=SLOW_CLOSE_S, show_default=True,
    metavar="SECONDS", help="A close() later than this after the FIN is a slow_close.",
)
@click.option(
    "--window", type=click.FloatRange(min=1), default=WINDOW_S, show_default=True,
    metavar="SECONDS",
    help="Live, and --replay before --at: rates and percentiles over this many seconds.",
)
@click.option("--snapshot", "force_snapshot", is_flag=True,
              help="Use /proc snapshots even as root (what non-root users get).")
@click.option(
    "--replay", is_flag=True,
    help="Draw one frame from NDJSON logs (LOG...: files, quoted globs, .gz, .zst, - for "
         "stdin) written by `tcpwatch trace -o`, as top would have shown it at --at.",
)
@click.option(
    "--at", "at", callback=_at, metavar="TIME",
    help="With --replay: RFC 3339, an age before the end of the log (5m), or +AGE after its "
         "start (+90s). Default: the end of the log.",
)
def top(logs, once, interval, fmt, by, sort, pids, ports, leak_after, slow_close, window,
        force_snapshot, replay, at) -> None:
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
      tcpwatch top --replay /var/log/tcpwatch.ndjson --at 2026-11-21T05:13:00Z
      tcpwatch top --replay '/var/log/tcpwatch.ndjson*' --at 10m --format json
    """
    large_blocks_mapped()  # before the kernel programs' compile: its big blocks too
    if replay or logs or at is not None:
        given = _given(click.get_current_context())
        _check_replay_usage(logs, replay, at, force_snapshot, given)
        keep = keep_only(pids, ports)
        run_replay(logs, at, window, leak_after if "leak_after" in given else None,
                   slow_close, keep, fmt, by, sort)
        return
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


def _given(ctx: click.Context) -> set[str]:
    """Parameters given on the command line (or from the environment), not defaulted."""
    from click.core import ParameterSource

    return {p.name for p in ctx.command.params if p.name and ctx.get_parameter_source(p.name)
            in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def _check_replay_usage(logs: tuple, replay: bool, at, force_snapshot: bool,
                        given: set[str]) -> None:
    """One-line usage errors for what does not go with --replay (or needs it)."""
    if not replay:
        if logs:
            raise click.UsageError(f"unexpected argument {logs[0]!r}: LOG arguments go with "
                                   "--replay")
        raise click.UsageError("--at needs --replay LOG...")
    if not logs:
        raise click.UsageError("--replay needs at least one LOG (a file, a quoted glob, or - "
                               "for stdin)")
    if force_snapshot:
        raise click.UsageError("--replay reads a log, --snapshot reads /proc now: use one")
    if "interval" in given:
        raise click.UsageError("--interval does not go with --replay: a replay is one frame at "
                               "--at (--window sets the span of the rates)")


def run_replay(logs: tuple, at, window: float, leak_after: float | None, slow_close: float,
               keep, fmt: str, by: str, sort: str) -> None:
    """--replay: read the logs up to T, print the frame at T (text or JSON) on stdout.

    leak_after None: the log's own threshold. Problems with the input are warnings (as for
    analyze) unless nothing usable is left; errors are one line (Fatal, exit 1)."""
    from tcpwatch.analyze import inputs
    from tcpwatch.analyze.engine import IncompatibleLog
    from tcpwatch.analyze.timeparse import epoch
    from tcpwatch.top import replay

    sources, problems = inputs.expand(list(logs))
    if all(s.path is not None for s in sources):
        sources.sort(key=inputs.order_key)
    at_s = after_start = None
    if at is not None and at.kind == "time":
        at_s = at.value
    elif at is not None and at.kind == "after_start":
        after_start = at.value
    elif at is not None:  # before the end: find the end first
        if any(s.path is None for s in sources):
            raise Fatal(f"--at {at.text} counts back from the end of the log, which stdin "
                        "cannot tell in advance: give a time (RFC 3339) or +AGE from the start")
        end = replay.log_end(sources)
        if end is not None:
            at_s = epoch(end) - at.value
    r = replay.Replayer(at_s, after_start=after_start, window_s=window,
                        leak_after_s=leak_after, slow_close_s=slow_close,
                        label=at.text if at is not None else None)
    try:
        r.run(sources)
        if not r.records:
            raise replay.ReplayError(_nothing_usable(logs, problems + r.notes, r))
        problems += r.notes
        sample = r.sample()
    except (IncompatibleLog, replay.ReplayError) as exc:
        _report_input(problems, r)
        raise Fatal(str(exc)) from None
    _report_input(problems, r)
    if at is not None and at.kind == "before_end" and at_s is None:
        raise Fatal(f"--at {at.text}: the end of the log could not be read")
    if by == "cgroup":
        sample.host.warnings.insert(0, "the log has no cgroups (and /proc now is not the "
                                       "log's): every socket is under '?'")
    replayed = {"ephemeral": {"used": None, "low": None, "high": None, "size": None},
                "port_risk": None,  # needs every socket of the host: not in the log
                "replay": r.info()}
    if not r.fw2_known:
        replayed["fin_wait2"] = None
    print_frame(filter_sample(sample, keep), by, sort, fmt, None, replayed)


def _nothing_usable(logs: tuple, problems: list[str], r) -> str:
    """The one line for input with no record at all: what went wrong with it."""
    if problems and not r.corrupt:
        return "; ".join(problems)
    why = f"nothing usable read from {', '.join(logs)}"
    if r.corrupt:
        why += f": {r.corrupt} corrupt line{'s' if r.corrupt != 1 else ''}"
        if r.corrupt_examples:
            why += f", the first: {r.corrupt_examples[0]}"
    return why


def _report_input(problems: list[str], r) -> None:
    """Warnings on stderr, as analyze gives them: unreadable inputs, corrupt lines."""
    if not r.records:
        return  # said in the one error line
    for note in problems:
        click.echo(f"tcpwatch: warning: {note}", err=True)
    if r.corrupt:
        click.echo(f"tcpwatch: warning: {r.corrupt} corrupt line{'s' if r.corrupt != 1 else ''}"
                   " skipped" + ("; the first:" if r.corrupt_examples else ""), err=True)
        for example in r.corrupt_examples:
            click.echo(f"  {example}", err=True)


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
        from tcpwatch.classify import SLOW_CLOSE_S
        from tcpwatch.top.hostinfo import read_port_range

        # Exits after a shorter stay than this are never slow nor leaks: the kernel may count
        # them instead of sending each (their cause does not depend on the exact duration).
        detail_s = min(SLOW_CLOSE_S if slow_close is None else slow_close, leak_after)
        source = loader.KernelSource(loader.Options(
            states=(schema.CLOSE_WAIT,), ports=tuple(ports), cw_map=True,
            exit_detail_s=detail_s, ephemeral=read_port_range()))
        opened = source.open()
    except loader.LoaderError as exc:
        return snapshot(f"kernel programs unavailable: {exc}")
    from tcpwatch.background import BackgroundPoll

    # Drained on a thread while frames are built; up to the buffer's size again waits here.
    source = BackgroundPoll(source, max_held=source.opts.ring_pages * mmap.PAGESIZE)
    collector = KernelCollector(
        source, opened.hooks, window_s, ports, leak_after, slow_close,
        warnings + opened.warnings, mono_to_wall_ns=loader.mono_to_wall_ns(), cw_map=True,
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
    t0 = time.monotonic()
    sample = filter_sample(collector.sample(), keep)
    rows = build_rows(sample, by, sort)
    frame_s = round(time.monotonic() - t0, 3)  # what a live redraw costs on this host
    print_frame(sample, by, sort, fmt, interval, {"frame_s": frame_s}, rows)


def print_frame(sample, by: str, sort: str, fmt: str, interval: float | None,
                json_extra: dict | None = None, rows: list | None = None) -> None:
    """One frame on stdout: plain text (terminal width, or 100 columns into a pipe) or one
    JSON object (json_extra overrides some of its fields). rows: build_rows(sample, by, sort)
    if already built."""
    import orjson

    from tcpwatch.top import view

    if rows is None:
        rows = build_rows(sample, by, sort)
    if fmt == "json":
        frame = view.frame_json(sample, rows, by, sort, interval)
        frame.update(json_extra or {})
        sys.stdout.buffer.write(orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE))
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

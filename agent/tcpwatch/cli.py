"""Command line: a thin click layer. Nothing here imports bcc until a command needs it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import socket
import sys
import time

import click

from tcpwatch import __version__, schema

SCHEMA_VERSION = 1
DEFAULT_LEAK_AFTER_S = 30.0
DEFAULT_NICE = -5  # trace's scheduling priority (see _set_nice)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class StateName(click.ParamType):
    """A TCP state by kernel name, any case: close_wait -> 8."""

    name = "STATE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        num = schema.STATE_NUMBERS.get(str(value).upper().replace("-", "_"))
        if num is None:
            self.fail(
                f"{value!r} is not a TCP state; one of: " + ", ".join(schema.STATE_NUMBERS),
                param,
                ctx,
            )
        return num


class Fatal(click.ClickException):
    """One line on stderr, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"tcpwatch: error: {self.message}", err=True)


PID_MAX = 4194304  # /proc/sys/kernel/pid_max can go no higher


def pid_port_options(func):
    """--pid and --port, the same for every command that filters sockets."""
    func = click.option(
        "--port", "ports", type=click.IntRange(1, 65535), multiple=True,
        help="Only sockets with this local or remote port (repeatable).",
    )(func)
    return click.option(
        "--pid", "pids", type=click.IntRange(1, PID_MAX), multiple=True,
        help="Only sockets owned, held or closed by this process (repeatable).",
    )(func)


def state_option(help_text: str):
    """--state NAME (repeatable), any case: the kernel's TCP state names."""
    return click.option("--state", "states", type=StateName(), multiple=True, help=help_text)


# Commands that live in their own package, imported only when invoked (start-up stays fast
# and a command's dependencies, e.g. rich for `top`, are not loaded for `trace`).
LAZY_COMMANDS = {
    "top": "tcpwatch.top.command:top",
    "analyze": "tcpwatch.analyze.command:analyze",
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class LazyGroup(click.Group):
    def _lazy(self, name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                return None  # not part of this build
            raise
        return getattr(mod, attr)

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [n for n, t in LAZY_COMMANDS.items() if _module_exists(t.split(":")[0])]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._lazy(name)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="tcpwatch")
def app() -> None:
    """Find TCP sockets stuck in CLOSE_WAIT and the process that leaked them."""


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt() parameters


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value): True if set, False if refused or not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(ctypes.c_int(param), ctypes.c_int(value)))


def one_malloc_arena() -> bool:
    """Have every thread allocate from glibc's main arena (True if set). trace's and top's
    worker threads build 100,000-entry dicts (holder lookups); in an arena of their own
    that memory, once freed, is never reused by the main thread: a running top at 100,000
    sockets peaked 15 MB higher. Threads contend little: the GIL serializes them anyway."""
    return _mallopt(M_ARENA_MAX, 1)


def large_blocks_mapped(threshold: int = 128 * 1024) -> bool:
    """Have glibc give every block of `threshold` bytes or more its own mmap(), unmapped
    when freed (True if set). By default glibc raises that threshold to the largest block
    freed so far (up to 32 MB); top frees 100,000-entry dicts and sets every frame, so from
    the first frame on they came from the heap, whose freed middle glibc keeps: a running
    top's heap grew to 86 MB with 30 MB of it in use. The cost is a mmap() and fresh pages
    per block, a few dozen per frame."""
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def main(args: list[str] | None = None) -> None:
    """Entry point: every error is one line on stderr and a non-zero exit, no traceback."""
    one_malloc_arena()  # before any thread starts
    try:
        app.main(args=args, prog_name="tcpwatch", standalone_mode=False)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx:  # bare `tcpwatch`
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx else ""
        click.echo(f"tcpwatch: error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(0)


@app.command(context_settings=CONTEXT)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "ndjson"]), default="table", show_default=True,
    help="What goes to stdout.",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
    help="Also write NDJSON records to this file. The table stays on screen, showing at most "
    "50 transitions (and routine CLOSE_WAIT exits) a second and counting the rest; leaks, "
    "other CLOSE_WAIT exits and lost events always show. The file has every record.",
)
@click.option(
    "--leak-after", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LEAK_AFTER_S,
    show_default=True, metavar="SECONDS",
    help="Report a socket as a leak once it has been in CLOSE_WAIT this long.",
)
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Stop by itself after this long.",
)
@pid_port_options
@state_option("Only transitions from or to this state, e.g. CLOSE_WAIT (repeatable).")
@click.option("--stacks", is_flag=True, help="Record kernel and user stacks of each transition.")
@click.option(
    "--rotate-size", metavar="SIZE", default=None,
    callback=lambda ctx, param, value: _rotation_arg("parse_size", param, value),
    help="With -o: start a new file when the log would pass SIZE (e.g. 100M, 1G).",
)
@click.option(
    "--rotate-age", metavar="AGE", default=None,
    callback=lambda ctx, param, value: _rotation_arg("parse_age", param, value),
    help="With -o: start a new file when the log is this old (e.g. 1h, 1d).",
)
@click.option(
    "--keep", type=click.IntRange(min=0), default=None, metavar="N",
    help="With --rotate-*: keep the N newest rotated files (gzipped), delete older ones.",
)
@click.option(
    "--buffer-mb", type=click.IntRange(min=1, max=1024), default=16, show_default=True,
    metavar="MB", callback=lambda ctx, param, value: _power_of_two(param, value),
    help="Kernel ring buffer size, a power of two: what it holds (~7,000 events a MB) is "
    "what a burst can outrun the agent by before events are lost (and counted). It adds "
    "this much to the agent's RSS. The summary says how full it came.",
)
@click.option(
    "--nice", "nice", type=click.IntRange(min=-20, max=19), default=DEFAULT_NICE,
    show_default=True, metavar="N",
    help="Scheduling priority of the agent while it traces. Raised by default, as auditd does, "
    "so that it keeps draining the kernel buffer when the traced workload saturates every "
    "CPU (it needs a fraction of one); 0 leaves it as it was started.",
)
@click.option(
    "--realtime/--no-realtime", default=True, show_default=True,
    help="Drain the kernel buffer at the lowest real-time priority (SCHED_RR 1): it runs as "
    "soon as events wait, where a normal priority can wait 100 ms and more for a CPU the "
    "workload saturates. Only the draining thread: /proc lookups run at normal priority. "
    "Refused (no CAP_SYS_NICE, no real-time budget): a warning, and --nice alone.",
)
def trace(fmt, output, leak_after, duration, pids, ports, states, stacks, rotate_size,
          rotate_age, keep, buffer_mb, nice, realtime) -> None:
    """Show every TCP state transition on this host, with CLOSE_WAIT timing and leaks.

    \b
    Examples:
      sudo tcpwatch trace
      sudo tcpwatch trace --port 8080 --leak-after 10
      sudo tcpwatch trace --format ndjson --state CLOSE_WAIT > cw.ndjson
      sudo tcpwatch trace -o /var/log/tcpwatch.ndjson --duration 3600
      sudo tcpwatch trace -o /var/log/tcpwatch.ndjson --rotate-size 100M --keep 10
    """
    from tcpwatch import loader

    if (rotate_size or rotate_age or keep is not None) and not output:
        raise click.UsageError("--rotate-size, --rotate-age and --keep need -o PATH")
    if keep is not None and not (rotate_size or rotate_age):
        raise click.UsageError("--keep needs --rotate-size or --rotate-age")

    try:
        warnings = loader.preflight()
    except loader.LoaderError as exc:
        raise Fatal(str(exc)) from None
    sinks = _open_sinks(fmt, output, rotate_size, rotate_age, keep)
    source = loader.KernelSource(
        loader.Options(stacks=stacks, pids=tuple(pids), ports=tuple(ports), states=tuple(states),
                       ring_pages=_ring_pages(buffer_mb * 256))
    )
    stop_requested = []
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.append(1))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    # SIGHUP (logrotate): the log file reopens PATH at its next flush; nothing else stops.
    reopeners = [s.request_reopen for s in sinks if hasattr(s, "request_reopen")]
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: [r() for r in reopeners])
    # Before the start-up: on a busy host the compile finishes sooner, and the events that
    # pile up between switching them on and the first drain are fewer.
    warnings = [*warnings, *_set_nice(nice)]
    try:
        try:
            opened = source.open()
        except loader.LoaderError as exc:
            raise Fatal(str(exc)) from None
        rt_ok = False
        if realtime:  # tried now, to say so in the start record; on for the drain loop only
            refused = _set_realtime(True)
            rt_ok = not refused and not _set_realtime(False)
            warnings += refused
        summary = _run(source, opened, warnings, sinks, leak_after, duration, pids, ports,
                       states, stacks, stop_requested, realtime=rt_ok)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        source.close()
    if fmt != "table":  # the table prints its own summary line
        peak = summary.get("buffer_peak_pct")
        click.echo(
            f"tcpwatch: {summary['events']} events, {summary['close_waits']} CLOSE_WAIT exits, "
            f"{summary['leaks']} leaks, {summary['lost']} lost"
            + ("" if peak is None else f" (kernel buffer at most {peak:g}% full)"),
            err=True,
        )


def _set_nice(nice: int) -> list[str]:
    """Lower the agent's nice value to `nice` (never raise it); a warning if refused.

    On a host whose CPUs the traced workload saturates, a drain that waits ~150 ms for a CPU
    let an 8 MB ring (~0.15 s of a loopback churn) overflow: measured in scripts/bench,
    drains of the agent at nice 0 spent 20-33 ms runnable but not running.
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        return [f"could not set the agent's nice value to {nice} ({exc.strerror}): it may "
                "fall behind a workload that saturates the CPUs"]
    return []


def _set_realtime(on: bool) -> list[str]:
    """Put the calling thread (the one that drains the kernel buffer) in SCHED_RR at priority
    1, the lowest real-time one, or back to the normal policy (its nice value stays). Threads
    it starts get the normal policy (SCHED_RESET_ON_FORK): holder lookups in /proc can take
    seconds of CPU. Only the drain loop runs so: not the compile, not the /proc snapshot of
    sockets already in CLOSE_WAIT, not the lookups at exit. A warning if refused.

    Measured in scripts/bench (6 rounds each, saturating churn, 16 MB ring): at nice -5 the
    buffer peaked at 24-69 % (drains waited up to 113 ms on the run queue), at nice -15 at
    22-41 %, in SCHED_RR at 7.3-7.5 %: one wakeup's worth of events. The drain is bounded
    (what the buffer holds) and the kernel keeps 5 % of each CPU for normal tasks.
    """
    try:
        if on:
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:
        return [f"could not drain at real-time priority ({exc.strerror}): under a workload "
                "that saturates the CPUs the agent may fall behind (see --realtime)"]
    return []


def _power_of_two(param: click.Parameter, value: int) -> int:
    if value & (value - 1):
        raise click.BadParameter(f"{value} is not a power of two (1, 2, 4, 8, ...)",
                                 param=param)
    return value


def _ring_pages(pages: int = 2048) -> int:
    """Ring buffer size in pages (4 KiB); TCPWATCH_RING_PAGES overrides it (benchmarks force
    losses with a tiny one). bcc wants a power of two."""
    raw = os.environ.get("TCPWATCH_RING_PAGES", str(pages))
    if not raw.isdigit() or int(raw) < 1 or int(raw) & (int(raw) - 1):
        raise Fatal(f"TCPWATCH_RING_PAGES={raw!r} must be a power of two, e.g. 1, 64, 2048")
    return int(raw)


def _rotation_arg(parser: str, param: click.Parameter, value: str | None):
    """--rotate-size/--rotate-age text -> bytes/seconds (sinks.ndjson.parse_*), or a usage error."""
    if value is None:
        return None
    from tcpwatch.sinks import ndjson

    try:
        return getattr(ndjson, parser)(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _open_sinks(fmt: str, output: str | None, rotate_size: int | None = None,
                rotate_age: float | None = None, keep: int | None = None) -> list:
    from tcpwatch.sinks.ndjson import NdjsonSink, Rotation, open_ndjson
    from tcpwatch.sinks.table import ROWS_PER_S, TableSink

    sinks: list = []
    if fmt == "ndjson":
        sinks.append(NdjsonSink(sys.stdout.buffer))
    else:
        tty = sys.stdout.isatty()
        width = min(100, shutil.get_terminal_size().columns) if tty else 100
        # With -o the file has every record; the screen is for a person (rate-limited).
        sinks.append(TableSink(sys.stdout, color=tty, width=width,
                               rows_per_s=ROWS_PER_S if output else None, elsewhere=output))
    if output:
        try:
            sinks.append(open_ndjson(output, rotation=Rotation(rotate_size, rotate_age, keep)))
        except OSError as exc:
            raise Fatal(f"cannot write {output}: {exc.strerror}") from None
    return sinks


def _run(source, opened, warnings, sinks, leak_after, duration, pids, ports, states, stacks,
         stop_requested, realtime: bool = False) -> dict:
    from tcpwatch import heap, loader, procnet
    from tcpwatch.aggregate import Aggregator
    from tcpwatch.classify import Causes
    from tcpwatch.pipeline import TraceLoop, pid_filter
    from tcpwatch.timefmt import rfc3339

    offset = loader.mono_to_wall_ns()
    resolver = procnet.Resolver(states=procnet.RESOLVE_STATES)
    agg = Aggregator(
        leak_after_s=leak_after,
        mono_to_wall_ns=offset,
        resolve=resolver.resolve,
        symbolize=source.symbolize if stacks else None,
        causes=Causes.from_hooks(opened.hooks),
    )
    loop = TraceLoop(source, agg, sinks, keep=pid_filter(pids) if pids else None,
                     background_resolve=True)
    if loop.fast is not None and not loop.fast.compiled:
        why = ("turned off by TCPWATCH_FASTLINES=0" if os.environ.get("TCPWATCH_FASTLINES") == "0"
               else "not built (install gcc and python3-dev, then reinstall)")
        warnings = [*warnings, f"tcpwatch._fastlines {why}: transitions are written by the "
                    "slower pure-Python path"]
    now = time.monotonic_ns()
    start = {
        "event": "start",
        "ts": rfc3339(now + offset),
        "v": SCHEMA_VERSION,
        "version": __version__,
        "hostname": socket.gethostname(),
        "kernel": os.uname().release,
        "pid": os.getpid(),
        "hooks": opened.hooks,
        "leak_after_s": leak_after,
        "filters": {
            "pid": list(pids),
            "port": list(ports),
            "state": [schema.state_name(s) for s in states],
        },
        "startup_s": round(opened.startup_s, 3),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "realtime": realtime,
        "warnings": warnings + opened.warnings,
    }
    # Snapshot before `start` is out: whoever waits for `start` to make a socket must not
    # see it reported as pre-existing. Sockets caught both ways are reconciled by the
    # aggregator (the kernel's entry time wins).
    seen = None
    if not states or schema.CLOSE_WAIT in states:
        seen = _existing(procnet, ports)
    try:
        loop.emit([start])
        if seen is not None:  # their records, one at a time (there may be 100,000s)
            loop.emit(agg.iter_existing(*seen, now, consume=True))
            # Done with the snapshot: do not keep it, or the heap it grew, for the whole run.
            seen = None
            heap.trim()
        for sink in sinks:
            sink.flush()
        loop.stopping = bool(stop_requested)
        _install_stop(loop, stop_requested)
        if realtime:
            _set_realtime(True)
        summary = loop.run(duration, after_loop=(lambda: _set_realtime(False)) if realtime
                           else None)
        loop.close()
    except BrokenPipeError:
        # stdout went away (e.g. `| head`): nothing more to say, and nothing to say it to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    return summary


def _install_stop(loop, stop_requested: list) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, loop.stop)
    if stop_requested:
        loop.stop()


def _existing(procnet, ports) -> tuple[list, dict]:
    """Sockets already in CLOSE_WAIT, in every reachable network namespace, and their
    holders: (entries, inode -> holders)."""
    entries = procnet.snapshot({schema.CLOSE_WAIT})
    if ports:
        entries = [e for e in entries if e.lport in ports or e.rport in ports]
    return entries, procnet.holders_of({e.inode for e in entries if e.inode})



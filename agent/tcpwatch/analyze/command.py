"""`tcpwatch analyze`: the click command (loaded lazily by cli.LAZY_COMMANDS)."""

from __future__ import annotations

import sys

import click

from tcpwatch import schema
from tcpwatch.cli import CONTEXT, Fatal, pid_port_options, state_option


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from tcpwatch.analyze.timeparse import parse_when

    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command(context_settings=CONTEXT)
@click.argument("logs", nargs=-1, required=True, metavar="LOG...")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="A report for people, or one JSON document for programs.",
)
@click.option("--since", callback=_when, metavar="TIME",
              help="Only what happened from TIME on: RFC 3339 or an age, e.g. 2h, 1d.")
@click.option("--until", callback=_when, metavar="TIME",
              help="Only what happened up to TIME (sockets still open then count as open).")
@pid_port_options
@state_option(
    "Only transitions from or to this state (repeatable); CLOSE_WAIT figures need it "
    "among them.",
)
@click.option(
    "--leak-after", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="CLOSE_WAIT age at the end that counts as a leak (default: the log's own).",
)
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rows per table in the text report.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              default=None, metavar="FILE.png|FILE.svg",
              help="Also draw the histogram and timeline to a picture (needs matplotlib).")
def analyze(logs, fmt, since, until, pids, ports, states, leak_after, limit, plot_path) -> None:
    """Answer "what happened?" from NDJSON logs written by `tcpwatch trace -o`.

    Reads files (rotated ones too: .gz, .zst), quoted globs, or - for stdin, oldest
    first, in constant memory; no root needed. Corrupt lines are counted and skipped.

    \b
    Examples:
      tcpwatch analyze /var/log/tcpwatch.ndjson
      tcpwatch analyze '/var/log/tcpwatch.ndjson*' --since 12h --port 5432
      tcpwatch analyze trace.ndjson.gz --format json | jq '.open[] | select(.leaked)'
      zcat old.ndjson.gz | tcpwatch analyze - --plot cw.png
    """
    from tcpwatch.analyze import inputs, report
    from tcpwatch.analyze.engine import Analyzer, IncompatibleLog, Options

    if since is not None and until is not None and since > until:
        raise click.UsageError("--since is later than --until")
    if plot_path:
        from tcpwatch.analyze import plot

        plot.check(plot_path)  # before reading gigabytes
    sources, problems = inputs.expand(list(logs))
    if all(s.path is not None for s in sources):
        sources.sort(key=inputs.order_key)
    opts = Options(
        pids=frozenset(pids), ports=frozenset(ports),
        states=frozenset(schema.state_name(s) for s in states),
        since=since, until=until, leak_after_s=leak_after,
    )
    try:
        result = Analyzer(opts).run(sources)
    except IncompatibleLog as exc:
        raise Fatal(str(exc)) from None
    for note in problems + result.notes:
        _warn(note)
    if result.corrupt:
        _warn(f"{result.corrupt} corrupt line{'s' if result.corrupt != 1 else ''} skipped"
              + ("; the first:" if result.corrupt_examples else ""))
        for example in result.corrupt_examples:
            click.echo(f"  {example}", err=True)
    if not result.records:
        names = ", ".join(logs)
        raise Fatal(f"nothing usable read from {names}")
    if fmt == "json":
        sys.stdout.buffer.write(report.as_json(result))
        sys.stdout.flush()
    else:
        click.echo(report.as_text(result, limit), nl=False)
    if plot_path:
        plot.draw(result, plot_path)


def _warn(message: str) -> None:
    click.echo(f"tcpwatch: warning: {message}", err=True)
